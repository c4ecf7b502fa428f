"""Section 4: peak allocated of one steady training step for adamw, galore, lotus, lotus + per-layer updates and
+ activation checkpointing; and (peak - weights) against galore. Each (shape, method) is an item."""

from __future__ import annotations

import torch

import bench_memory  # its measure(): one steady step's peak
from bench_train import make_batch
from lotus_dist.model.llama import llama_config

from .items import Check
from .plan import autocast_for
from .report import fmt_bytes

MEMORY_METHODS = {  # (OptimConfig keys, optimizer in backward, activation checkpointing)
    "adamw": (dict(name="adamw", lr=1e-3), False, False),
    # galore's state does not depend on the solver that made its basis: rsvd spares the warm-up's svd time
    "galore": (dict(name="galore", solver="rsvd"), False, False),
    "lotus": (dict(name="lotus"), False, False),
    "lotus+per_layer": (dict(name="lotus"), True, False),
    "lotus+per_layer+ac": (dict(name="lotus"), True, True),
}


def section_memory(run: Check) -> None:
    """Two micro-batch shapes: a one-row one, where activations are negligible and 'beyond weights' is the
    gradients + optimizer state (the paper's quantity), and a training shape."""
    plan = run.plan
    name, overrides, rank, shapes = plan.memory_model
    cfg = llama_config(name, **overrides)
    for rows_, seq in shapes:
        batch = make_batch(cfg.vocab_size, rows_, seq, plan.device)
        measured = {}
        for method, (opts, per_layer, recompute) in MEMORY_METHODS.items():
            done, got = run.attempt(f"memory of {method} at {rows_} x {seq}", plan.needs["memory"],
                                    plan.limits["memory"],
                                    lambda: bench_memory.measure(cfg, opts, per_layer, recompute, rank, batch,
                                                                 autocast_for(plan.device)))
            if done:
                measured[method] = got
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
        if measured:
            memory_table(run.report, name, rank, rows_, seq, measured)


def memory_table(report, name: str, rank: int, rows_: int, seq: int, measured: dict) -> None:
    ref = measured.get("galore")
    rows = []
    for method, r in measured.items():
        beyond = r["peak"] - r["weights"]
        vs = f"{beyond / (ref['peak'] - ref['weights']) - 1:+.1%}" if ref else "-"
        rows.append([method, fmt_bytes(r["peak"]), fmt_bytes(r["backward"]), fmt_bytes(r["weights"]),
                     fmt_bytes(r["state"]), fmt_bytes(beyond), vs])
    report.add(f"**{name}**, micro-batch {rows_} x {seq}, rank {rank}, bf16 autocast, fp32 weights: peak allocated "
               f"of one steady step (forward + backward + optimizer). 'beyond weights' = gradients + optimizer "
               f"state + activations at the peak (the paper claims -40 % gradient + state memory vs GaLore):")
    report.add()
    report.table(["method", "peak", "fwd+bwd peak", "weights", "opt state", "beyond weights", "beyond vs galore"],
                 rows)
    if "lotus" in measured:
        report.add(f"The projected matrices' full gradients are {fmt_bytes(measured['lotus']['projected_grads'])}; "
                   f"per-layer updates free each unit's gradients as soon as it has stepped.")
        report.add()
