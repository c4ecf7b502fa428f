"""MFU of the speed section: the model FLOPs of one token and the GPU's peak. (If lotus_dist grows a shared
FLOP formula for the planner, ``model_flops_per_token`` is the one function to replace with it.)"""

from __future__ import annotations

# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity); other GPUs use the measured matmul yardstick.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def model_flops_per_token(model, seq: int) -> float:
    """Training FLOPs of one token: 6 N (N: the weights that multiply, the embedding table excluded) + the
    attention scores' 12 L d T (forward QK^T and AV, 2 x 2 L d T, times 3 for forward + backward)."""
    from lotus_dist.model.llama import flops_per_token  # the one formula, shared with the planner's step time

    return flops_per_token(model.cfg, seq)


def peak_flops(ctx: dict) -> tuple[float, str]:
    name = ctx.get("gpu_name", "")
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, f"{key} bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
    measured = ctx.get("yardstick_tflops", 1.0) * 1e12
    return measured, f"the measured matmul yardstick, {measured / 1e12:.3g} TFLOP/s"
