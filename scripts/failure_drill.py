#!/usr/bin/env python
"""Failure drill: run pretrain.py as a user would, with bad values, damaged checkpoints and signals, and print a
Markdown table of what each case gave (exit code and the line the user sees). docs/results.md shows its output.

    python scripts/failure_drill.py                 # every case, ~10 min on 2 CPU cores
    python scripts/failure_drill.py --only lock,bitflip

Each case is a real ``pretrain.py`` process (one process, CPU, the tiny model of the tests) in a fresh run
directory under --work; the tests in tests/train/test_failures.py and tests/distributed/test_resilience.py assert
the same behaviour (this script shows it).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # the tests' helpers: SMALL (the drill shows what the tests assert on it)

from lotus_dist.train.config import merge_overrides  # noqa: E402  (after the path, for a plain checkout)
from lotus_dist.train.faults import flip_bit  # noqa: E402
from lotus_dist.train.metrics import read_metrics  # noqa: E402
from pretrain_runs import SMALL as TESTS_SMALL  # noqa: E402

SMALL = merge_overrides(TESTS_SMALL, ["train.eval_every=0"])


class Drill:
    def __init__(self, work: Path):
        self.work = work
        self.cache = work / "cache"

    def args(self, run_dir: Path, *extra: str) -> list[str]:
        """The drill's base overrides, then the case's (which replace them key by key)."""
        return merge_overrides(SMALL, [f"data.cache_dir={self.cache}", f"run.dir={run_dir}"], list(extra))

    def start(self, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
        cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(REPO / "configs/tiny.yaml"),
               *self.args(run_dir, *extra)]
        full_env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        full_env.pop("LOTUS_FAULT", None)
        full_env.update(env or {})
        return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def run(self, run_dir: Path, *extra: str, env: dict | None = None) -> tuple[int, str, str]:
        proc = self.start(run_dir, *extra, env=env)
        out, err = proc.communicate(timeout=600)
        return proc.returncode, out, err

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path


def shown(code: int, out: str, err: str) -> str:
    """The line a user reads: the error line, else the warning, else the last line of the output."""
    for text in (err, out):
        for prefix in ("error: ", "warning: "):
            lines = [l for l in text.splitlines() if l.startswith(prefix)]
            if lines:
                return lines[0]
    tail = [l for l in out.splitlines() if l.strip()]
    return tail[-1] if tail else ""


def steps_of(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def listing(run_dir: Path) -> str:
    root = run_dir / "checkpoints"
    return ", ".join(sorted(p.name for p in root.iterdir())) if root.is_dir() else "none"


def damage_case(d: Drill, name: str, file: str, harm) -> tuple[str, int, str]:
    run_dir = d.fresh(name)
    d.run(run_dir, "train.steps=8", "checkpoint.every=4", "checkpoint.keep=3")
    harm(run_dir / "checkpoints/step_00000008" / file)
    code, out, err = d.run(run_dir, "train.steps=10", "checkpoint.every=4", "checkpoint.keep=3")
    resumed = next((l for l in out.splitlines() if l.startswith("resumed from")), "not resumed")
    return (f"latest checkpoint (step 8 of 4, 8): {name.replace('_', ' ')} `{file}`; rerun", code,
            f"{shown(code, out, err)} / {resumed.split('/')[-1]} / checkpoints: {listing(run_dir)}")


CASES = {}


def case(key: str):
    def register(fn):
        CASES[key] = fn
        return fn
    return register


@case("nan_weight")
def _(d):
    run_dir = d.fresh("nan_weight")
    code, out, err = d.run(run_dir, "train.steps=8", "checkpoint.every=2", "checkpoint.keep=1",
                           env={"LOTUS_FAULT": "nan_weight:rank=0:step=5"})
    return ("NaN written into a weight after step 5 (loss still finite), checkpoint.every=2, keep=1", code,
            f"{shown(code, out, err)} / checkpoints: {listing(run_dir)}")


@case("bitflip")
def _(d):
    return damage_case(d, "bit_flipped", "__0_0.distcp", flip_bit)


@case("truncated")
def _(d):
    return damage_case(d, "truncated", "__0_0.distcp", lambda p: os.truncate(p, p.stat().st_size // 2))


@case("deleted")
def _(d):
    return damage_case(d, "deleted", "__0_0.distcp", Path.unlink)


@case("metadata")
def _(d):
    return damage_case(d, "deleted", ".metadata", Path.unlink)


@case("train_state")
def _(d):
    return damage_case(d, "emptied", "train_state.json", lambda p: p.write_text(""))


@case("all_damaged")
def _(d):
    run_dir = d.fresh("all_damaged")
    d.run(run_dir, "train.steps=8", "checkpoint.every=4")
    for step in (4, 8):
        flip_bit(run_dir / f"checkpoints/step_{step:08d}/__0_0.distcp")
    code, out, err = d.run(run_dir, "train.steps=10")
    return "both checkpoints bit-flipped; rerun", code, f"{shown(code, out, err)} / checkpoints: {listing(run_dir)}"


@case("my_best")
def _(d):
    run_dir = d.fresh("run_with_my_best")
    (run_dir / "checkpoints/my_best").mkdir(parents=True)
    (run_dir / "checkpoints/my_best/notes.txt").write_text("mine")
    d.run(run_dir, "train.steps=6", "checkpoint.every=2", "checkpoint.keep=1")
    code, out, err = d.run(run_dir, "train.steps=6", "checkpoint.resume=false")
    return ("`checkpoints/my_best/` made by the user; a run with keep=1, then a rerun with checkpoint.resume=false",
            code, f"{shown(code, out, err)} / checkpoints: {listing(run_dir)}")


@case("sigkill")
def _(d):
    run_dir = d.fresh("sigkill")
    first, _, _ = d.run(run_dir, "train.steps=6", "checkpoint.every=4", env={"LOTUS_FAULT": "after_step:rank=0:step=3"})
    code, out, err = d.run(run_dir, "train.steps=6", "checkpoint.every=4")
    return ("SIGKILL after step 3 (before the first checkpoint), then the same command", code,
            f"first exit {first}; metrics steps after the rerun: {steps_of(run_dir)}")


@case("sigint")
def _(d):
    run_dir = d.fresh("sigint")
    proc = d.start(run_dir, "train.steps=100000", "checkpoint.every=0")
    while (not steps_of(run_dir) or steps_of(run_dir)[-1] < 3) and proc.poll() is None:
        time.sleep(0.1)  # wait for step 3 in metrics.jsonl
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    said = next((l for l in out.splitlines() if "received" in l), shown(proc.returncode, out, err))
    return "Ctrl-C (SIGINT) during training", proc.returncode, f"{said} / checkpoints: {listing(run_dir)}"


@case("skip_forever")
def _(d):
    run_dir = d.fresh("skip_forever")
    code, out, err = d.run(run_dir, "train.steps=200", "train.on_nonfinite=skip",
                           env={"LOTUS_FAULT": "nan_grad:rank=0:step=3-200"})
    return "train.on_nonfinite=skip with a NaN gradient at every step from 3", code, shown(code, out, err)


@case("lock")
def _(d):
    run_dir = d.fresh("locked_run")
    run_dir.mkdir()
    with open(run_dir / "run.lock", "w") as held:
        held.write(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": "the drill"}))
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, out, err = d.run(run_dir, "train.steps=2")
    return "a second run on a run.dir whose lock is held", code, shown(code, out, err)


@case("resume_changed")
def _(d):
    run_dir = d.fresh("resume_changed")
    d.run(run_dir, "train.steps=2")
    rows = []
    for change in ("optim.rank=4", "train.batch_size=16", "train.seq_len=64"):
        code, out, err = d.run(run_dir, "train.steps=4", change)
        rows.append((f"resume with `{change}`", code, shown(code, out, err)))
    for change in ("optim.switch=fixed", "optim.residual=fira", "optim.solver=online_pca"):
        code, out, err = d.run(run_dir, "train.steps=4", change)
        rows.append((f"resume with `{change}` (a part with its own state)", code, shown(code, out, err)))
    code, out, err = d.run(run_dir, "train.steps=4", "optim.lr=0.005", "optim.weight_decay=0.5")
    history = [l for l in (run_dir / "config.yaml").read_text().splitlines() if l.startswith("# - ")]
    applied = next((l for l in out.splitlines() if l.startswith("resume applies")), "no line")
    saved = json.loads((run_dir / "checkpoints/step_00000004/train_state.json").read_text())["optim_groups"]
    rows.append(("resume with `train.steps=4 optim.lr=0.005 optim.weight_decay=0.5`", code,
                 f"{applied} / next checkpoint's weight_decay: {sorted({g['weight_decay'] for g in saved})} / "
                 f"config.yaml history: `{history[-1][4:]}`"))
    return rows


@case("legacy_truncated")
def _(d):
    run_dir = d.fresh("legacy_truncated")
    d.run(run_dir, "train.steps=8", "checkpoint.every=4", "checkpoint.keep=3")
    last = run_dir / "checkpoints/step_00000008"
    (last / "manifest_rank_00000.json").unlink()  # as written before manifests existed: only loading finds damage
    (last / "COMPLETE").write_text("step 8\n")
    os.truncate(last / "__0_0.distcp", (last / "__0_0.distcp").stat().st_size // 2)
    code, out, err = d.run(run_dir, "train.steps=10", "checkpoint.every=4", "checkpoint.keep=3")
    resumed = next((l for l in out.splitlines() if l.startswith("resumed from")), "not resumed")
    return ("legacy checkpoint (no manifest) with a truncated `__0_0.distcp`; rerun", code,
            f"{shown(code, out, err)} / {resumed.split('/')[-1]}")


@case("full_disk")
def _(d):
    run_dir = d.fresh("full_disk")
    run_dir.mkdir()
    cmd = [sys.executable, str(REPO / "pretrain.py"), "--config", str(REPO / "configs/tiny.yaml"),
           *d.args(run_dir, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=1")]
    # a 24 MB tmpfs holds one checkpoint of this model (~17 MB), not two; mounted in a namespace of its own
    script = f"mount -t tmpfs -o size=24m tmpfs {run_dir} || exit 99; {' '.join(cmd)}; code=$?; ls {run_dir}/checkpoints; exit $code"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True)
    what = "run.dir on a 24 MB tmpfs: the step-2 checkpoint fits, the step-4 one does not"
    if proc.returncode == 99 or "unshare" in proc.stderr[:200]:
        return what, "-", f"not run: cannot mount a tmpfs here ({proc.stderr.strip()[:120]})"
    return what, proc.returncode, f"{shown(proc.returncode, proc.stdout, proc.stderr)} / checkpoints: " \
                                  f"{proc.stdout.split()[-1] if proc.stdout.split() else 'none'}"


@case("init_from_gone")
def _(d):
    base = d.fresh("init_from_source")
    d.run(base, "train.steps=2")
    export = d.fresh("init_from_export")
    subprocess.run([sys.executable, str(REPO / "scripts/export_hf.py"), "--run-dir", str(base), "--out", str(export)],
                   cwd=REPO, capture_output=True, check=True)
    run_dir = d.fresh("init_from_run")
    d.run(run_dir, "train.steps=2", f"model.init_from={export}")
    shutil.rmtree(export)
    code, out, err = d.run(run_dir, "train.steps=4", f"model.init_from={export}")
    said = next((l for l in out.splitlines() if "init_from is not read" in l), "")
    return ("resume of a run started from `model.init_from`, the folder deleted since", code,
            f"{said} / {shown(code, out, err)}")


def export(run_dir: Path, out, *flags: str) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, str(REPO / "scripts/export_hf.py"), "--run-dir", str(run_dir), "--out",
                           str(out), *flags], cwd=REPO, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@case("export")
def _(d):
    run_dir = d.fresh("export_run")
    d.run(run_dir, "train.steps=2")
    mine = d.fresh("export_mine")
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (d.work / "a_file.txt").write_text("x")
    rows = []
    for what, out in [("the run directory itself", run_dir), ("the run's parent `RUN/..`", run_dir / ".."),
                      ("a folder inside the run", run_dir / "checkpoints"), ("a folder of the user's", mine),
                      ("a file", d.work / "a_file.txt")]:
        code, out_text, err = export(run_dir, out, "--overwrite")
        rows.append((f"`export_hf.py --overwrite --out` {what}", code,
                     f"{shown(code, out_text, err)} / run's checkpoints: {listing(run_dir)}"))
    return rows


def hf_folder(d: Drill, name: str, edit) -> Path:
    """A copy of one exported run's Hugging Face folder, with ``edit(config dict)`` applied to its config.json."""
    source = d.work / "hf_source"
    if not source.exists():
        run_dir = d.fresh("hf_source_run")
        d.run(run_dir, "train.steps=2")
        export(run_dir, source)
    folder = d.fresh(f"{name}_hf")
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))
    return folder


@case("init_from_mismatch")
def _(d):
    rows = []
    for what, edit in [("`hidden_act: gelu`", lambda c: {**c, "hidden_act": "gelu"}),
                       ("`rope_scaling` (llama3, factor 8)", lambda c: {**c, "rope_scaling": {"rope_type": "llama3",
                                                                                              "factor": 8.0}}),
                       ("another `num_attention_heads`", lambda c: {**c, "num_attention_heads": 2}),
                       ("a JSON list", lambda c: [c])]:
        folder = hf_folder(d, "mismatch", edit)
        code, out, err = d.run(d.fresh("mismatch_run"), "train.steps=1", f"model.init_from={folder}")
        rows.append((f"`model.init_from` whose config.json has {what}", code, shown(code, out, err)))
    return rows


@case("deepspeed_json")
def _(d):
    ds = d.work / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 0.1}))
    code, out, err = d.run(d.fresh("ds"), "train.steps=1", f"dist.deepspeed_config={ds}")
    return "`dist.deepspeed_config=ds.json` without `dist.mode=deepspeed`", code, shown(code, out, err)


def c4_mirror(d: Drill, name: str, shards: int = 3) -> Path:
    """A local C4-format mirror (``c4-{train,validation}.*.json.gz``) of the embedded corpus's documents."""
    from lotus_dist.data.corpus import embedded_documents

    root = d.fresh(name)
    root.mkdir(parents=True)
    docs = embedded_documents()[:600]
    for i in range(shards):
        lines = [json.dumps({"text": t, "url": "u", "timestamp": "t"}) + "\n" for t in docs[i::shards]]
        (root / f"c4-train.{i:05d}-of-{shards:05d}.json.gz").write_bytes(gzip.compress("".join(lines).encode()))
    val = "".join(json.dumps({"text": t, "url": "u", "timestamp": "t"}) + "\n" for t in docs[-40:])
    (root / "c4-validation.00000-of-00001.json.gz").write_bytes(gzip.compress(val.encode()))
    return root


@case("data_damage")
def _(d):
    rows = []
    corrupt = c4_mirror(d, "mirror_corrupt")
    shard = corrupt / "c4-train.00001-of-00003.json.gz"
    lines = gzip.decompress(shard.read_bytes()).splitlines(keepends=True)
    c = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing; a block of the reserved type 3 after 50 good lines,
    head = c.compress(b"".join(lines[:50])) + c.flush(zlib.Z_FULL_FLUSH)  # as a bit flip in a download leaves it
    tail = c.compress(b"".join(lines[50:])) + c.flush()
    shard.write_bytes(head + b"\x06" + tail[1:])
    empty = c4_mirror(d, "mirror_empty")
    (empty / "c4-train.00002-of-00003.json.gz").write_bytes(b"")
    for what, mirror in [("one shard's deflate stream broken after 50 documents", corrupt), ("one zero-byte shard", empty)]:
        run_dir = d.fresh("damaged_data_run")
        code, out, err = d.run(run_dir, "train.steps=2", "data.source=c4", f"data.path={mirror}")
        warning = next((l for l in (out + err).splitlines() if str(mirror) in l), "nothing said about the shard")
        rows.append((f"`data.source=c4` mirror with {what}", code, f"{warning} / {shown(code, out, '')}"))
    return rows


@case("data_inputs")
def _(d):
    from tokenizer_copies import swapped_model  # a model of the embedded tokenizer's size and EOS, two ids swapped

    rows = []
    code, out, err = d.run(d.fresh("vocab"), "train.steps=1", "model.vocab_size=100")
    rows.append(("`model.vocab_size=100` (the tokenizer has more ids)", code, shown(code, out, err)))
    offline = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(d.fresh("empty_hf_home"))}
    code, out, err = d.run(d.fresh("no_net"), "train.steps=1", "data.source=c4", env=offline)
    rows.append(("`data.source=c4` without `data.path`, no network", code, shown(code, out, err)))
    code, out, err = d.run(d.fresh("no_net_tok"), "train.steps=1", "data.tokenizer=hf:google-t5/t5-base", env=offline)
    rows.append(("`data.tokenizer=hf:google-t5/t5-base`, no network, empty cache", code, shown(code, out, err)))
    run_dir = d.fresh("tokenizer_change")
    d.run(run_dir, "train.steps=2")
    other = swapped_model(d.work / "swapped.model")
    code, out, err = d.run(run_dir, "train.steps=4", f"data.tokenizer={other}")
    rows.append(("resume with another tokenizer of the same vocabulary size", code, shown(code, out, err)))
    return rows


@case("indexed_damage")
def _(d):
    mirror = c4_mirror(d, "mirror_for_indexed")
    (mirror / "c4-train.00002-of-00003.json.gz").write_bytes(b"")  # preprocessing skips and names it
    output = d.fresh("indexed")
    proc = subprocess.run([sys.executable, str(REPO / "scripts/preprocess_c4.py"), "--input", str(mirror), "--output",
                           str(output), "--workers", "1"], cwd=REPO, capture_output=True, text=True)
    rows = [("`preprocess_c4.py` of a mirror with a zero-byte shard", proc.returncode,
             shown(proc.returncode, proc.stdout, proc.stderr))]
    if proc.returncode:
        return rows
    bins = sorted(output.glob("*train*.bin"))
    for what, harm in [("a `.bin` cut to half its size", lambda b: os.truncate(b, b.stat().st_size // 2)),
                       ("a `.idx` overwritten with garbage", lambda b: b.with_suffix(".idx").write_bytes(b"garbage" * 8))]:
        saved = {p: p.read_bytes() for p in (bins[0], bins[0].with_suffix(".idx"))}
        harm(bins[0])
        code, out, err = d.run(d.fresh("indexed_run"), "train.steps=1", "data.source=indexed",
                               f"data.path={bins[0].with_suffix('')}")
        rows.append((f"`data.source=indexed` with {what}", code, shown(code, out, err)))
        for p, data in saved.items():
            p.write_bytes(data)
    return rows


BAD = ["optim.name=lion", "model.name=llama_3b", "optim.lr=-0.01", "optim.lr=.nan", "optim.betas=[0.9]",
       "optim.betas=[0.9,1.5]", "log.every=0", "data.val_tokens=0 train.eval_every=10", "checkpoint.every=-1",
       "train.eval_every=-1", "train.stop_at=0", "train.stop_at=-3", "dist.replicate=3", "data.shuffle_buffer=-5",
       "optim.rank=100", "run.dir=/proc/no/such/dir"]


@case("bad_values")
def _(d):
    rows = []
    for bad in BAD:
        run_dir = d.fresh("bad")
        code, out, err = d.run(run_dir, *bad.split(), "train.steps=1")
        rows.append((f"`{bad}`", code, shown(code, out, err) if code else
                     next((l for l in out.splitlines() if l.startswith("note:")), shown(code, out, err))))
    empty = d.work / "empty.yaml"
    empty.write_text("# nothing\n")
    for what, argv in [("an empty config file", ["--config", str(empty)]),
                       ("`optim.lr=0.1 optim.lr=0.2` (a key given twice)", ["optim.lr=0.1", "optim.lr=0.2"])]:
        proc = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *argv], cwd=REPO, capture_output=True,
                              text=True)
        rows.append((what, proc.returncode, shown(proc.returncode, proc.stdout, proc.stderr)))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated cases (default all: {', '.join(CASES)})")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args(argv)
    chosen = [c for c in args.only.split(",") if c] or list(CASES)
    unknown = sorted(set(chosen) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="lotus_drill_"))
    drill = Drill(work)
    print("| case | exit | what the user sees |\n|---|---|---|")
    for key in chosen:
        started = time.perf_counter()
        result = CASES[key](drill)
        for what, code, seen in result if isinstance(result, list) else [result]:
            seen = seen.replace(str(work) + "/", "").replace("|", "\\|")
            print(f"| {what} | {code} | {seen} |", flush=True)
        print(f"  {key}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
