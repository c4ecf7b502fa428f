"""Export a checkpoint as a Hugging Face LLaMA folder (``LlamaForCausalLM`` + ``LlamaTokenizer``).

    python scripts/export_hf.py --run-dir runs/tiny --out exports/tiny            # the latest good checkpoint
    python scripts/export_hf.py --run-dir runs/llama_1b --step 10000 --out exports/llama_1b --dtype bf16

Any checkpoint works (single, fsdp, ddp, deepspeed; any world size): DCP reads the model's tensors whole, one
safetensors shard at a time (``--max-shard-size``), so memory stays at one shard, never model + optimizer. The
checkpoint is proven against its manifests first. The folder gets ``config.json``, ``generation_config.json``,
``model.safetensors`` (or shards + ``model.safetensors.index.json``) and the run's sentencepiece model as
``tokenizer.model`` with its ``tokenizer_config.json``; ``transformers`` is not needed to write it. It is written
under ``OUT.tmp`` and renamed when complete; an existing OUT is refused unless ``--overwrite``, and even then only
a previous export is replaced (recognised by the ``lotus_export.json`` every export carries, listing its files):
never the run directory, a folder inside it or holding it, the current directory, or a folder with other files.

Evaluate: ``lm_eval --model hf --model_args pretrained=OUT --tasks hellaswag``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader  # noqa: E402

from lotus_dist.distributed.modes import single_process  # noqa: E402
from lotus_dist.data.tokenizer import hf_tokenizer_files, load_tokenizer  # noqa: E402
from lotus_dist.errors import UserError, exit_status  # noqa: E402
from lotus_dist.model.hf import INDEX_FILE, hf_config, hf_name, plan_shards, shard_file_names  # noqa: E402
from lotus_dist.model.llama import Llama, LlamaConfig  # noqa: E402
from lotus_dist.train.checkpoint import STEP_DIR, Checkpointer  # noqa: E402
from lotus_dist.train.config import load_config  # noqa: E402

# torch 2.6 words it without "disabled, "
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = "lotus_export.json"  # written into every export: only a folder holding it may be replaced
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count."""
    raw = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if raw.endswith(unit):
            number = raw[: -len(unit)].strip()
            break
    else:
        unit, number = "B", raw
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        raise UserError(f"--max-shard-size: '{text}' is not a size (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise UserError(f"--max-shard-size: '{text}' must be positive")
    return int(value)


def choose_checkpoint(run_dir: Path, step: int | None) -> Path:
    if not run_dir.is_dir():
        raise UserError(f"--run-dir: '{run_dir}' is not a directory")
    checkpointer = Checkpointer(run_dir, keep=1, mode=single_process("cpu"))  # it verifies every file itself
    found = checkpointer.checkpoints()
    if not found:
        raise UserError(f"--run-dir: {run_dir} has no complete checkpoint under checkpoints/")
    steps = [int(STEP_DIR.match(p.name).group(1)) for p in found]
    if step is None:
        path = found[-1]
    elif step in steps:
        path = found[steps.index(step)]
    else:
        raise UserError(f"--step {step}: no complete checkpoint of that step in {checkpointer.root} "
                        f"(complete: {', '.join(map(str, steps))})")
    problem = checkpointer.verify(path)
    if problem:
        older = [s for s in steps if s < int(STEP_DIR.match(path.name).group(1))]
        raise UserError(f"checkpoint {path} is damaged ({problem})"
                        + (f"; export an older one with --step {older[-1]}" if older else ""))
    return path


def run_tokenizer(run_dir: Path, override: str | None):
    """The sentencepiece model the run trained with (its config.yaml's data.tokenizer), or ``--tokenizer``."""
    if override:
        return load_tokenizer(override)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise UserError(f"{config} is missing: pass the run's sentencepiece model with --tokenizer")
    return load_tokenizer(load_config(str(config), []).data.tokenizer)


def follow_umask(folder: Path) -> None:
    """Give every file under ``folder`` (and the folder) the mode the umask gives a new file (0644 under the usual
    022): safetensors writes its files 0600, which other users of a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def not_an_export(folder: Path) -> str | None:
    """Why ``folder`` may not be deleted as a previous export (None: it is one, holding only the files its marker
    lists)."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
        if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):  # not assert: -O drops it
            raise ValueError(f"{MARKER}'s files is not a list of names")
    except FileNotFoundError:
        # exports written before the marker existed are not told apart from a user's folder: the user decides
        return (f"it has no {MARKER}, so it is not an export of this script (or one from before exports carried "
                f"that file); remove it yourself if it may go, or choose another --out")
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MARKER} cannot be read; remove the folder yourself if it may go, or choose another --out"
    for entry in sorted(folder.iterdir()):
        if entry.name != MARKER and (entry.name not in files or (entry.is_dir() and not entry.is_symlink())):
            return f"it holds {entry.name}, which the export did not write; move that away or choose another --out"
    return None


def check_out(run_dir: Path, out: Path, overwrite: bool) -> tuple[Path, Path]:
    """The export's folder and its working folder ``OUT.tmp``, symlinks and '..' resolved; UserError for an --out
    whose replacement could delete anything but a previous export."""
    run, target = run_dir.resolve(), out.resolve()
    shown = str(out) if str(out) == str(target) else f"{out} (= {target})"
    hint = f"choose a folder outside the run, e.g. --out exports/{run.name}"
    if target == run:
        raise UserError(f"--out: {shown} is the run directory itself; replacing it would delete the run's "
                        f"checkpoints: {hint}")
    if run in target.parents:
        raise UserError(f"--out: {shown} lies inside the run directory {run}: {hint}")
    if target in run.parents:
        raise UserError(f"--out: {shown} holds the run directory {run}; replacing it would delete the run: {hint}")
    tmp = target.with_name(target.name + ".tmp")
    if tmp.resolve() == run or tmp.resolve() in run.parents:
        raise UserError(f"--out: the export is written under {tmp} first, which is (or holds) the run directory "
                        f"{run}: {hint}")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserError(f"--out: {shown} is the current directory{'' if target == cwd else ' or holds it'}: "
                        f"name a new folder, e.g. --out exports/{run.name}")
    if target.exists() and not target.is_dir():
        raise UserError(f"--out: {shown} is a file, not a folder: name a new folder (or a previous export, with "
                        f"--overwrite)")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise UserError(f"--out: {out} exists and is not empty (pass --overwrite to replace a previous export)")
        problem = not_an_export(target)
        if problem:
            raise UserError(f"--out: --overwrite refuses to delete {shown}: {problem}")
    if os.path.lexists(tmp):  # a leftover of an interrupted export is deleted; anything else stays
        problem = ("it is a link or a file, not a folder" if tmp.is_symlink() or not tmp.is_dir()
                   else not_an_export(tmp) if any(tmp.iterdir()) else None)
        if problem:
            raise UserError(f"--out: the export's working folder {tmp} is in the way: {problem}")
    return target, tmp


def export(run_dir: Path, out: Path, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = 5 * 10**9, tokenizer: str | None = None, overwrite: bool = False,
           log=print) -> Path:
    target, tmp = check_out(run_dir, out, overwrite)
    path = choose_checkpoint(run_dir, step)
    train_state = json.loads((path / "train_state.json").read_text())
    cfg = LlamaConfig(**train_state["model"])
    tok = run_tokenizer(run_dir, tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer {tok.path} has {tok.vocab_size} pieces but the model's vocabulary is "
                        f"{cfg.vocab_size}: pass the run's tokenizer with --tokenizer")

    with torch.device("meta"):
        names = [name for name, _ in Llama(cfg).named_parameters()]
    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [n for n in names if f"model.{n}" not in saved]
    if missing:
        raise UserError(f"checkpoint {path} has no model.{missing[0]} (is it a lotus_dist LLaMA checkpoint?)")
    meta = {n: saved[f"model.{n}"] for n in names}
    saved_dtypes = {m.properties.dtype for m in meta.values()}
    out_dtype = DTYPES[dtype] if dtype else (torch.float32 if torch.float32 in saved_dtypes else saved_dtypes.pop())
    nbytes = {n: meta[n].size.numel() * out_dtype.itemsize for n in names}
    shards = plan_shards(((n, nbytes[n]) for n in names), max_shard_bytes)
    files = shard_file_names(len(shards))
    tokenizer_files = hf_tokenizer_files(tok, cfg.max_seq_len)
    marker = {"lotus_dist_export": 1, "run_dir": str(run_dir.resolve()), "step": train_state["step"],
              "complete": False, "files": sorted([*files, *([INDEX_FILE] if len(files) > 1 else []), "config.json",
                                                  "generation_config.json", "tokenizer.model", *tokenizer_files])}

    shutil.rmtree(tmp, ignore_errors=True)  # check_out found it absent, empty or an export's leftover
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {tmp} ({e.strerror or e})") from None
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # first: a leftover is recognised as ours
    from safetensors.torch import save_file

    log(f"exporting {path} ({sum(nbytes.values()) / 2**20:.1f} MiB as {out_dtype}, {len(files)} file(s)) to {out}")
    started = time.perf_counter()
    weight_map = {}
    for i, (shard, file) in enumerate(zip(shards, files), 1):
        state = {f"model.{n}": torch.empty(meta[n].size, dtype=meta[n].properties.dtype) for n in shard}
        dcp.load(state, storage_reader=FileSystemReader(str(path)))  # only these keys are read
        tensors = {hf_name(n): state[f"model.{n}"].to(out_dtype).contiguous() for n in shard}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        log(f"  [{i}/{len(files)}] {file}: {len(shard)} tensors, {sum(nbytes[n] for n in shard) / 2**20:.1f} MiB "
            f"({time.perf_counter() - started:.1f} s)")
        del state, tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    config = hf_config(cfg, dtype=out_dtype, bos_id=tok.bos_id, eos_id=tok.eos_id)
    config["lotus_dist"] = {"run_dir": str(run_dir), "step": train_state["step"], "tokens": train_state["tokens"],
                            "optim": train_state.get("optim_method")}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}.items()
                  if v is not None}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    shutil.copyfile(tok.path, tmp / "tokenizer.model")
    for name, text in tokenizer_files.items():
        (tmp / name).write_text(text)
    (tmp / MARKER).write_text(json.dumps({**marker, "complete": True}, indent=2) + "\n")

    follow_umask(tmp)
    if target.is_dir():
        problem = any(target.iterdir()) and not_an_export(target)  # again: it may have changed meanwhile
        if problem:
            raise UserError(f"--out: --overwrite refuses to delete {target}: {problem} (the new export is in {tmp})")
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"done: {out} (step {train_state['step']}); load with transformers.AutoModelForCausalLM.from_pretrained")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path, help="the run directory (run.dir)")
    parser.add_argument("--out", required=True, type=Path, help="the folder to write")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype in the export (default: as saved, fp32 when any tensor is fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--tokenizer", default=None,
                        help="sentencepiece model (default: the run's data.tokenizer from its config.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace a previous export in --out (only a folder holding its {MARKER})")
    args = parser.parse_args(argv)
    return exit_status(lambda: export(args.run_dir, args.out, step=args.step, dtype=args.dtype,
                                      max_shard_bytes=parse_size(args.max_shard_size), tokenizer=args.tokenizer,
                                      overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
