#!/usr/bin/env python
"""Measured peak memory of one training step for adamw, galore, lotus and lotus with the optimizer in backward.

A training step is forward + backward + optimizer step on one micro-batch, measured by
``lotus_dist.train.peak_memory.PeakMemory`` (CUDA: the allocator's peak; CPU: an account of tensor storage at op
granularity). Each method runs alone in the process: its model and optimizer are built, one warm-up step creates
the optimizer state and the first bases, and the next (steady, no switch) step is measured; then all of it is
freed before the next method. Figures are absolute, so a peak includes the weights and the optimizer state.

``lotus+per_layer`` updates each unit (a transformer block, each other parameter alone) from post-accumulate-grad
hooks and frees its gradients at once (``lotus_dist.optim.in_backward``): the full gradients of the projected
matrices never exist together. The check line says whether its peak sits at least their size below plain lotus.
That holds while gradients, not activations, set the peak: per-layer updates cannot lower the peak of the backward
itself (activations, the logits and their gradient, the lm_head gradient), which is why the table is printed for
two micro-batch shapes, and with activation checkpointing (``+ac``: one block's activations at a time).
"fwd+bwd" is the peak during forward and backward (for per-layer, updates included).

    python scripts/bench_memory.py                        # llama_60m, micro-batches 1 x 64 and 1 x 256 (CPU: ~2 min)
    python scripts/bench_memory.py --model tiny --shapes 4x128 --rank 32
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.model.llama import Llama, llama_config  # noqa: E402
from lotus_dist.optim import build_optimizer, memory_report, route_parameters  # noqa: E402
from lotus_dist.distributed.modes import single_process  # noqa: E402
from lotus_dist.train.config import OptimConfig, TrainConfig  # noqa: E402
from lotus_dist.train.peak_memory import PeakMemory  # noqa: E402
from lotus_dist.train.step import StepEngine, resolve_autocast  # noqa: E402

# method -> (OptimConfig keys, optimizer in backward, activation checkpointing)
METHODS = {
    "adamw": (dict(name="adamw", lr=1e-3), False, False),
    "galore": (dict(name="galore"), False, False),
    "lotus": (dict(name="lotus"), False, False),
    "lotus+per_layer": (dict(name="lotus"), True, False),
    "lotus+per_layer+ac": (dict(name="lotus"), True, True),
}
MIB = 2**20


def make_batch(vocab: int, batch: int, seq: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq + 1), generator=g).to(device)


def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def measure(cfg, opts: dict, per_layer: bool, recompute: bool, rank: int, batch: torch.Tensor, autocast) -> dict:
    """Peak bytes of one steady step of one method (the trainer's step, lotus_dist/train/step.py); everything it
    built is garbage when this returns."""
    torch.manual_seed(0)
    with batch.device:
        model = Llama(cfg)  # built on the device: no full-size copy through the host
    model.activation_checkpointing = recompute
    # Fixed and displacement switching only ever switch on schedule; a huge gap keeps the measured step steady.
    opt = build_optimizer(model, OptimConfig(rank=rank, **opts, update_gap=10**9, verify_gap=10**9))
    measured, phases = PeakMemory(batch.device), {}

    def after_backward():  # the fwd+bwd peak, read inside the measured step
        if phases.get("measuring"):
            phases["backward"] = measured.peak_so_far()

    engine = StepEngine(model, opt, single_process(batch.device), grad_clip=TrainConfig().grad_clip,
                        per_layer=per_layer, autocast=autocast, after_backward=after_backward)
    engine.step(itertools.repeat(batch))  # warm-up: optimizer state and the first bases
    gc.collect()
    with measured:
        phases["measuring"] = True
        engine.step(itertools.repeat(batch))
    if engine.in_backward is not None:
        engine.in_backward.remove()
    projected, _ = route_parameters(model)
    # per-layer: the updates run inside backward, so the whole step is its fwd+bwd
    return {"peak": measured.peak_bytes, "backward": phases.get("backward", measured.peak_bytes),
            "start": measured.start_bytes, "state": memory_report(opt)["total"],
            "weights": nbytes(model.parameters()), "projected_grads": nbytes(p for _, p in projected)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama_60m")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--shapes", default="1x64,1x256", help="micro-batch shapes, rows x sequence length")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = resolve_autocast("auto", device)  # the trainer's default: bf16 on CUDA, fp32 on CPU
    cfg = llama_config(args.model)
    for shape in args.shapes.split(","):
        rows_, seq = (int(x) for x in shape.lower().split("x"))
        batch = make_batch(cfg.vocab_size, rows_, seq, device)
        rows = {name: measure(cfg, opts, per_layer, recompute, args.rank, batch, autocast)
                for name, (opts, per_layer, recompute) in METHODS.items()}
        report(args, device, rows_, seq, rows)
    return 0


def report(args, device, batch: int, seq: int, rows: dict) -> None:
    print(f"{args.model}, micro-batch {batch} x {seq}, rank {args.rank}, {device}: peak of one steady step "
          f"(fwd + bwd + optimizer), MiB")
    print(f"{'method':19s} {'peak':>9s} {'fwd+bwd':>9s} {'at start':>9s} {'step adds':>10s} {'weights':>9s} "
          f"{'opt state':>10s}")
    for name, r in rows.items():
        print(f"{name:19s} {r['peak'] / MIB:9.1f} {r['backward'] / MIB:9.1f} {r['start'] / MIB:9.1f} "
              f"{(r['peak'] - r['start']) / MIB:10.1f} {r['weights'] / MIB:9.1f} {r['state'] / MIB:10.1f}")
    grads = rows["lotus"]["projected_grads"]
    for name in ("lotus+per_layer", "lotus+per_layer+ac"):
        saving = rows["lotus"]["peak"] - rows[name]["peak"]
        print(f"{name} saves {saving / MIB:.1f} MiB of peak vs lotus ({saving / rows['lotus']['peak']:.1%}); the "
              f"projected matrices' full gradients are {grads / MIB:.1f} MiB: saving >= that size: "
              f"{'yes' if saving >= grads else 'NO (the backward peak above sets the floor)'}")
    # The evidence goal "peak bytes of gradients + states": peak minus weights (activations included, so an upper bound)
    beyond = {name: r["peak"] - r["weights"] for name, r in rows.items()}
    print("peak minus weights (gradients + states + activations) vs galore: " + ", ".join(
        f"{name} {beyond[name] / beyond['galore']:.2f}" for name in ("lotus", "lotus+per_layer", "lotus+per_layer+ac")))
    print()


if __name__ == "__main__":
    sys.exit(main())
