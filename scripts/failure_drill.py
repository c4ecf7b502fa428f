#!/usr/bin/env python
"""Failure drill: run pretrain.py as a user would, with bad values, damaged checkpoints and signals, and print a
Markdown table of what each case gave (exit code and the line the user sees). docs/results.md shows its output.

    python scripts/failure_drill.py                 # every case, ~3 min on 2 CPU cores
    python scripts/failure_drill.py --only lock,bitflip

Each case is a real ``pretrain.py`` process (one process, CPU, the tiny model of the tests) in a fresh run
directory under --work; the tests in tests/train/test_failures.py and tests/distributed/test_resilience.py assert
the same behaviour (this script shows it).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.train.config import merge_overrides  # noqa: E402  (after the path, for a plain checkout)
from lotus_dist.train.faults import flip_bit  # noqa: E402
from lotus_dist.train.metrics import read_metrics  # noqa: E402
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "train.seq_len=32",
         "train.batch_size=8", "train.micro_batch_size=4", "data.val_tokens=2048", "log.every=1",
         "log.tensorboard=false", "log.progress=false", "optim.rank=8", "train.eval_every=0"]


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
    code, out, err = d.run(run_dir, "train.steps=4", "optim.lr=0.005")
    history = [l for l in (run_dir / "config.yaml").read_text().splitlines() if l.startswith("# - ")]
    rows.append(("resume with `train.steps=4 optim.lr=0.005`", code, f"config.yaml history: `{history[-1][4:]}`"))
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
