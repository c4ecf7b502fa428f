#!/usr/bin/env python
"""Fit at scale, measured: the start-up peak per rank against the model, a resume's against a fresh start's, and each
rank's optimizer state against the capacity planner, for the paths that shard (meta start-up, the FSDP fallback,
sharded projectors).

    python scripts/bench_sharding.py                 # ~4 min on 2 CPU cores (gloo; several ranks share the cores)
    python scripts/bench_sharding.py --resume-only   # the resume table alone (scripts/peak_pretrain.py per step)

Every figure comes from a real ``pretrain.py`` run under torchrun: ``startup_peak_bytes`` / ``model_bytes`` from the
startup record of metrics.jsonl (the most tensor bytes any rank held before step 1), and ``optimizer_state_bytes``
from rank 0's step record (rank 0 holds the largest shards), next to ``dry_run``'s numbers for the same config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.train.config import load_config, merge_overrides  # noqa: E402
from lotus_dist.train.metrics import read_events, read_metrics  # noqa: E402

STARTUP = ["train.micro_batch_size=1", "train.seq_len=64", "train.steps=1", "train.eval_every=0",
           "data.source=embedded", "data.tokenizer=embedded", "data.val_tokens=4096", "log.progress=false",
           "log.tensorboard=false", "checkpoint.every=0"]
STATE = ["train.seq_len=32", "train.steps=2", "train.eval_every=0", "log.progress=false", "log.tensorboard=false",
         "checkpoint.every=0", "optim.rank=16", "optim.verify_gap=1"]


def run(config: str, world: int, overrides: list[str], run_dir: Path, entry: Path = REPO / "pretrain.py",
        env: dict | None = None) -> None:
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={world}"]
    cmd = [*launcher, str(entry), "--config", str(REPO / config),
           *merge_overrides(overrides, [f"run.dir={run_dir}"])]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


def mib(b: float) -> str:
    return f"{b / 2**20:8.1f}"


def startup_table(work: Path, worlds: list[int]) -> None:
    print("## start-up peak per rank (llama_60m, vocab 32000; model built on meta, each rank initialises its shards)")
    print(f"{'world':>5} {'model MiB':>10} {'peak MiB':>9} {'peak/model':>10} {'bound MiB':>9}  (bound = model/W + "
          f"largest matrix + 5 % of the model)")
    for world in worlds:
        run_dir = work / f"startup_w{world}"
        run("configs/llama_60m.yaml", world, [*STARTUP, f"train.batch_size={world}"], run_dir)
        (rec,) = read_events(run_dir, "startup")
        model, peak = rec["model_bytes"], rec["startup_peak_bytes"]
        largest = 32000 * 512 * 4  # the embedding (and lm_head)
        bound = model / world + largest + 0.05 * model
        print(f"{world:>5} {mib(model):>10} {mib(peak):>9} {peak / model:>10.3f} {mib(bound):>9}")


def run_peaks(config: str, world: int, overrides: list[str], run_dir: Path) -> dict:
    """``run`` under peak_pretrain.py: {rank: {step: {"peak_bytes", "start_bytes"}}} of that launch's steps."""
    out = run_dir.parent / f"{run_dir.name}_peaks_{len(list(run_dir.parent.glob(run_dir.name + '_peaks_*')))}"
    run(config, world, overrides, run_dir, entry=REPO / "scripts/peak_pretrain.py", env={"PEAK_OUT": str(out)})
    return {int(p.stem[4:]): {r["step"]: r for r in json.loads(p.read_text())} for p in out.glob("rank*.json")}


def resume_table(work: Path, world: int = 2) -> None:
    """A fresh start against a resume of the same run at step 2 (llama_60m): the start-up record of each, the
    peak of step 3 in the resumed run against an uninterrupted one, and the load's wall time."""
    print(f"\n## resume vs fresh start per rank (llama_60m, {world} ranks; checkpoint at step 2, resumed for step 3)")
    overrides = [*STARTUP, f"train.batch_size={world}", "train.steps=3", "checkpoint.every=2"]
    straight = run_peaks("configs/llama_60m.yaml", world, overrides, work / "straight")
    run("configs/llama_60m.yaml", world, [*overrides, "train.stop_at=2"], work / "resumed")
    resumed = run_peaks("configs/llama_60m.yaml", world, overrides, work / "resumed")
    fresh, resume = read_events(work / "resumed", "startup")
    model = resume["model_bytes"]
    held = max(r[3]["start_bytes"] for r in straight.values())  # weights + optimizer state at step 3
    bound = held + 32000 * 512 * 4 + 0.05 * model
    step_straight = max(r[3]["peak_bytes"] for r in straight.values())
    step_resumed = max(r[3]["peak_bytes"] for r in resumed.values())
    print(f"{'':<32} {'MiB':>9}  (bound = weights + optimizer state on a rank + largest matrix + 5 % of the model)")
    for label, value in (("fresh start-up peak", fresh["startup_peak_bytes"]),
                         ("resume start-up peak", resume["startup_peak_bytes"]),
                         ("weights + optimizer state", held), ("bound", bound),
                         ("step 3 peak, uninterrupted", step_straight), ("step 3 peak, resumed", step_resumed)):
        print(f"{label:<32} {mib(value):>9}")
    from lotus_dist.distributed.capacity import dry_run

    planned = dry_run(load_config(REPO / "configs/llama_60m.yaml", merge_overrides(overrides, [f"dist.world_size={world}"])),
                      out=lambda line: None)["lotus"]["resume"]
    print(f"{'planned resume (dry run)':<32} {mib(planned):>9}")
    print(f"resume / bound {resume['startup_peak_bytes'] / bound:.3f}, step peak resumed / uninterrupted "
          f"{step_resumed / step_straight:.3f}, load {resume['load_s']:.2f} s (slowest rank)")


def state_table(work: Path) -> None:
    from lotus_dist.distributed.capacity import dry_run

    print("\n## optimizer state on rank 0: measured vs planned (tiny, r=16, lotus; world 3 makes the four down_proj")
    print("## matrices fallbacks: 344 columns do not split over 3 ranks)")
    print(f"{'case':<34} {'measured MiB':>12} {'planned MiB':>11} {'ratio':>6}")
    for name, world, extra in (("world 2", 2, []), ("world 3 (fallback)", 3, []),
                               ("world 3 (fallback), projectors=shard", 3, ["optim.projectors=shard"])):
        overrides = [*STATE, f"train.batch_size={2 * world}", "train.micro_batch_size=2", *extra]
        run_dir = work / f"state_{name.replace(' ', '_').replace(',', '').replace('(', '').replace(')', '')}"
        run("configs/tiny.yaml", world, overrides, run_dir)
        measured = read_metrics(run_dir)[-1]["optimizer_state_bytes"]
        planned = dry_run(load_config(REPO / "configs/tiny.yaml", merge_overrides(overrides, [f"dist.world_size={world}"])),
                          out=lambda line: None)["lotus"]["optimizer"]
        print(f"{name:<34} {mib(measured):>12} {mib(planned):>11} {measured / planned:>6.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="1,2,4", help="world sizes of the start-up table (default 1,2,4)")
    parser.add_argument("--resume-only", action="store_true", help="only the resume table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as tmp:
        work = Path(tmp)
        if not args.resume_only:
            startup_table(work, [int(w) for w in args.worlds.split(",")])
        resume_table(work)
        if not args.resume_only:
            state_table(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
