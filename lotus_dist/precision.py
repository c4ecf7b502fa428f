"""The one precision rule: does a run compute in bf16? (``train.dtype`` x the device type).

A bottom-layer module (it imports nothing of lotus_dist): the trainer's autocast, FSDP2's mixed precision, the owner
backend's bf16 weights, the DeepSpeed config and the capacity planner all read this rule, so they cannot disagree.
"""

from __future__ import annotations

TRAIN_DTYPES = ("auto", "fp32", "bf16")  # train.dtype


def computes_in_bf16(train_dtype: str, device_type: str) -> bool:
    """bf16 autocast on CUDA for ``auto`` or ``bf16``; fp32 on CPU unless ``bf16`` is asked for explicitly.

    ``device_type`` is a device's ``.type`` ("cuda", "cpu", ...). An unknown ``train_dtype`` is a ValueError.
    """
    if train_dtype not in TRAIN_DTYPES:
        raise ValueError(f"unknown train.dtype '{train_dtype}' (known: {', '.join(TRAIN_DTYPES)})")
    return train_dtype == "bf16" or (train_dtype == "auto" and device_type == "cuda")


__all__ = ["computes_in_bf16", "TRAIN_DTYPES"]
