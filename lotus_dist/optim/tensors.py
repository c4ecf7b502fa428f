"""How the optimizer holds its tensors: a DTensor's local shard, the dtype of each state tensor, ‖t‖² in fp32."""

from __future__ import annotations

import torch

from . import reference_codes
from .projector_codes import PACKED_DTYPE

# statistics kept in fp32 whatever the param dtype
FP32_KEYS = frozenset({"pe_acc", "pe_sketch", "fira_norm"}) | reference_codes.FP32_KEYS
# kept in the dtype they were saved in (optim.reference_dtype, optim.projector_dtype)
OWN_DTYPE_KEYS = reference_codes.OWN_DTYPE_KEYS | {"projector"}


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Moments, projectors and statistics are fp32 at least whatever the parameter dtype (bf16 ones stall: V moves by
    (1 - β2) = 1e-3 of itself a step, below bf16's 2^-8; bf16 projectors drift from orthonormal); fp64 stays fp64."""
    return torch.promote_types(param_dtype, torch.float32)


def projector_dtype(name: str, param_dtype: torch.dtype) -> torch.dtype:
    """The stored projector's dtype: bf16, int8's packed codes (uint8, optim/projector_codes.py), or ``fp32`` = the
    state dtype. Either way it is used in the state dtype (``LowRankAdamW._use_projector`` upcasts a bf16 one and
    decodes int8 codes, one matrix at a time)."""
    return {"bf16": torch.bfloat16, "int8": PACKED_DTYPE}.get(name) or state_dtype(param_dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view), else t: the projected math runs on local tensors, so a weight sharded
    along its long side keeps R, the moments and the back-projection local (docs/algorithms.md section 11)."""
    to_local = getattr(t, "to_local", None)  # duck-typed: optim never imports torch.distributed
    return to_local() if callable(to_local) else t


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² in fp32 without a t-sized temporary (``t.float().square()`` would allocate one: a per-layer step
    would then hold two lm_head-sized buffers at its peak)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dtype=torch.float32).square()
    return torch.linalg.vector_norm(t).float().square()  # fp32 as is; fp64 (tests) in fp64


def closure_loss(closure):
    """torch's ``step(closure)`` contract: the loss the closure recomputes (with grad enabled), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
