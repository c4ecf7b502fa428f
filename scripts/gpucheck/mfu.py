"""MFU of the speed section: the model FLOPs of one token and the GPU's peak, both lotus_dist's (the trainer's
``mfu`` in metrics.jsonl reads the same formula and table)."""

from __future__ import annotations


def model_flops_per_token(model, seq: int) -> float:
    """Training FLOPs of one token: 6 N (N: the weights that multiply, the embedding table excluded) + the
    attention scores' 12 L d T (forward QK^T and AV, 2 x 2 L d T, times 3 for forward + backward)."""
    from lotus_dist.model.llama import flops_per_token  # the one formula, shared with the planner's step time

    return flops_per_token(model.cfg, seq)


def peak_flops(ctx: dict) -> tuple[float, str]:
    """The GPU's datasheet dense bf16 peak (lotus_dist/train/throughput.py's table), else the measured matmul
    yardstick of the environment section."""
    from lotus_dist.train.throughput import datasheet_tflops

    known = datasheet_tflops(ctx.get("gpu_name", ""))
    if known is not None:
        return known[1] * 1e12, f"{known[0]} bf16 dense peak {known[1]:.0f} TFLOP/s"
    measured = ctx.get("yardstick_tflops", 1.0) * 1e12
    return measured, f"the measured matmul yardstick, {measured / 1e12:.3g} TFLOP/s"
