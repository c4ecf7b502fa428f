"""The one precision rule (lotus_dist/precision.py) and the places that read it."""

from __future__ import annotations

import pytest
import torch

from lotus_dist.distributed.fsdp import mixed_precision
from lotus_dist.precision import computes_in_bf16

# train.dtype x device type -> bf16 compute: bf16 on CUDA for auto/bf16, on CPU only when asked for
RULE = [("auto", "cuda", True), ("bf16", "cuda", True), ("fp32", "cuda", False),
        ("auto", "cpu", False), ("bf16", "cpu", True), ("fp32", "cpu", False)]


@pytest.mark.parametrize("dtype, device_type, bf16", RULE)
def test_the_rule_and_fsdp_mixed_precision_agree(dtype, device_type, bf16):
    assert computes_in_bf16(dtype, device_type) is bf16
    param_dtype, reduce_dtype = mixed_precision(dtype, device_type)
    assert param_dtype == (torch.bfloat16 if bf16 else None)
    assert reduce_dtype == (torch.float32 if bf16 else None)  # dist.reduce_dtype=fp32: the default


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown train.dtype 'fp16' \(known: auto, fp32, bf16\)"):
        computes_in_bf16("fp16", "cuda")
    with pytest.raises(ValueError, match="unknown train.dtype 'fp16'"):
        mixed_precision("fp16", "cpu")
