"""MFU of a run: the model FLOPs it trains per second against the device's dense bf16 peak.

The FLOPs of one token are the model's (``lotus_dist.model.llama.flops_per_token``: 6 N + the attention scores,
shared with the planner's step time and the GPU check); the peak is ``train.peak_tflops`` or the datasheet value
of a known CUDA device (``PEAK_BF16_TFLOPS``, the GPU check's table too). No peak, no MFU: a CPU's is not a
datasheet number, so a CPU run logs ``mfu`` only when ``train.peak_tflops`` is given.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor datasheets, no sparsity), matched in order against the CUDA
# device name (torch.cuda.get_device_name): a variant before its family ("H100 PCIe" before "H100", which is SXM).
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (the name is e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),  # fp32 accumulation (330 with fp16 accumulation)
    ("A10G", 70.0),
)


def datasheet_tflops(device_name: str) -> tuple[str, float] | None:
    """(table key, dense bf16 TFLOP/s) of the first ``PEAK_BF16_TFLOPS`` key in ``device_name``, else None."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return key, tflops
    return None


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """FLOP/s of one ``device``: ``peak_tflops`` when given, else its datasheet peak (CUDA only), else None."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    known = datasheet_tflops(torch.cuda.get_device_name(device))
    return None if known is None else known[1] * 1e12


def mfu(flops_per_token: float, tokens: float, seconds: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: ``tokens`` trained by ``devices`` devices in ``seconds``, against ``peak`` each."""
    return flops_per_token * tokens / (max(seconds, 1e-12) * devices * peak)


__all__ = ["PEAK_BF16_TFLOPS", "datasheet_tflops", "mfu", "peak_flops"]
