#!/usr/bin/env python
"""End-to-end training step time of adamw, galore and lotus on one model, measured side by side in one run.

A training step here is the trainer's (lotus_dist/train/step.py: forward, backward, the loss and gradient norm in
one reduction and host sync, clipping at the trainer's default, optimizer step) on one micro-batch of token blocks,
the model's dtype fp32 on CPU or bf16 autocast on CUDA. Methods are interleaved round by round, so a
change in the machine's load hits all of them alike; medians over rounds are reported, plus ratios to adamw.

Steady steps and refresh steps are timed separately and combined as the amortised time per step:
``steady + (refresh - steady) / interval`` with GaLore's T = 200 and Lotus' adaptive interval (>= eta = 50 and
<= ~2/gamma = 200; shown at 50 and 200).

    python scripts/bench_train.py                     # llama_60m, micro-batch 4 x 256 (CPU: a few minutes)
    python scripts/bench_train.py --model tiny --batch 8 --seq 128 --rounds 5

``--compile tiny,llama_60m`` measures instead, per model, lotus eager against lotus with its blocks compiled
(train.compile: lotus_dist.model.llama.compile_blocks), interleaved round by round: steady tokens/s side by side
and their ratio; the first (compiling) step is reported apart.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.distributed.modes import single_process  # noqa: E402
from lotus_dist.model.llama import Llama, compile_blocks, llama_config  # noqa: E402
from lotus_dist.optim import build_optimizer  # noqa: E402
from lotus_dist.train.config import OptimConfig, TrainConfig  # noqa: E402
from lotus_dist.train.step import StepEngine, resolve_autocast  # noqa: E402

METHODS = {"adamw": dict(name="adamw", lr=1e-3), "galore": dict(name="galore"), "lotus": dict(name="lotus")}


def make_batch(vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_step(engine: StepEngine, batch: torch.Tensor) -> float:
    """Wall time of one training step (the trainer's: lotus_dist/train/step.py) on ``batch``."""
    sync(batch.device)
    start = time.perf_counter()
    engine.step(itertools.repeat(batch))
    sync(batch.device)
    return time.perf_counter() - start


def start(cfg, opts: dict, rank: int, device, autocast, compiled: bool = False) -> StepEngine:
    """A fresh model (seed 0) and its optimizer in the trainer's step engine; ``compiled``: train.compile."""
    torch.manual_seed(0)
    with device:
        model = Llama(cfg)  # built on the device: no full-size copy through the host
    if compiled:
        compile_blocks(model)
    # Fixed and displacement switching only ever switch on schedule; a huge gap keeps these steps steady.
    ocfg = OptimConfig(rank=rank, **opts, update_gap=10**9, verify_gap=10**9)
    return StepEngine(model, build_optimizer(model, ocfg), single_process(device), grad_clip=TrainConfig().grad_clip,
                      autocast=autocast)


def compile_comparison(args, device, autocast) -> int:
    """Eager vs compiled lotus per model, side by side: steady tokens/s (median of interleaved rounds), ratio."""
    print(f"lotus eager vs train.compile=true, micro-batch {args.batch} x {args.seq}, rank {args.rank}, {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (median)")
    print(f"{'model':10s} {'eager tok/s':>12s} {'compiled tok/s':>15s} {'compiled / eager':>17s} "
          f"{'first step eager / compiled s':>30s}")
    for name in args.compile.split(","):
        cfg = llama_config(name)
        batch = make_batch(cfg.vocab_size, args.batch, args.seq, device)
        runs = {}
        for compiled in (False, True):
            engine = start(cfg, METHODS["lotus"], args.rank, device, autocast, compiled)
            first = timed_step(engine, batch)  # every basis; compiled: the compile too
            timed_step(engine, batch)  # warm-up
            runs[compiled] = {"engine": engine, "first": first, "steady": []}
        for _ in range(args.rounds):
            for run in runs.values():
                run["steady"].append(timed_step(run["engine"], batch))
        tokens = args.batch * args.seq
        eager, compiled = (tokens / statistics.median(runs[c]["steady"]) for c in (False, True))
        print(f"{name:10s} {eager:12,.0f} {compiled:15,.0f} {compiled / eager:17.2f} "
              f"{runs[False]['first']:14.1f} / {runs[True]['first']:.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed steady steps per method (medians reported)")
    p.add_argument("--compile", metavar="MODELS", help="comma-separated models: lotus eager vs compiled instead")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = resolve_autocast("auto", device)  # the trainer's default: bf16 on CUDA, fp32 on CPU
    if args.compile:
        return compile_comparison(args, device, autocast)
    cfg = llama_config(args.model)
    batch = make_batch(cfg.vocab_size, args.batch, args.seq, device)
    runs = {}
    for name, opts in METHODS.items():
        engine = start(cfg, opts, args.rank, device, autocast)
        refresh = timed_step(engine, batch)  # the first step computes every basis
        timed_step(engine, batch)  # warm-up
        runs[name] = {"engine": engine, "refresh": refresh, "steady": []}
    for _ in range(args.rounds):
        for name, run in runs.items():
            run["steady"].append(timed_step(run["engine"], batch))

    print(f"{args.model}, micro-batch {args.batch} x {args.seq}, rank {args.rank}, {device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds (median)")
    print(f"{'method':8s} {'steady s':>9s} {'refresh s':>10s} {'amortised s (interval)':>32s} {'vs adamw':>9s}")
    base = statistics.median(runs["adamw"]["steady"])
    for name, run in runs.items():
        steady = statistics.median(run["steady"])
        if name == "adamw":
            amort = f"{steady:.3f}"
        else:
            intervals = (200,) if name == "galore" else (50, 200)
            amort = ", ".join(f"{steady + (run['refresh'] - steady) / t:.3f} ({t})" for t in intervals)
        print(f"{name:8s} {steady:9.3f} {run['refresh']:10.3f} {amort:>32s} {steady / base:9.2f}")
    g, l = runs["galore"], runs["lotus"]
    print(f"refresh lotus / galore: {l['refresh'] / g['refresh']:.2f} (rsvd vs svd for every basis, incl. fwd/bwd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
