"""``optim.projector_dtype=int8`` (docs/algorithms.md section 4): a stored projector as int8 codes with one fp32
scale per stored row, packed into one uint8 tensor of shape (rows, cols + 4) whose last 4 bytes of a row hold the
row's scale. One tensor, row-major like the fp32 projector: ``optim.projectors=shard`` slices it by rows, gathers,
DCP saves and reshards it like any other row-sharded state, and a block never crosses a shard boundary.

A row is one index of the projected side for a left projector A (m x r: r entries a block), one basis vector for a
right projector B (r x n: n entries a block). Codes are signed absmax-linear in [-127, 127]: each entry is within
half a step (absmax / 254 of its row) of the fp32 basis, which is solved in fp32, rounded once when stored and
decoded to the working dtype (one matrix at a time) to be used, as a bf16 one is upcast.
"""

from __future__ import annotations

import torch

CODE_MAX = 127
SCALE_BYTES = 4  # one fp32 scale per row, appended to the row's codes
PACKED_DTYPE = torch.uint8


def stored_shape(shape: tuple[int, int], name: str) -> tuple[int, int]:
    """The stored tensor's shape for a projector (piece) of ``shape`` under ``optim.projector_dtype=name``."""
    rows, cols = shape
    return (rows, cols + SCALE_BYTES) if name == "int8" else (rows, cols)


def is_packed(stored: torch.Tensor) -> bool:
    return stored.dtype == PACKED_DTYPE


def encode(P: torch.Tensor) -> torch.Tensor:
    """The packed codes (rows, cols + 4) of projector P (rows, cols)."""
    P = P.float()
    scale = P.abs().amax(dim=1, keepdim=True) / CODE_MAX
    codes = (P / torch.where(scale > 0, scale, torch.ones_like(scale))).round_().clamp_(-CODE_MAX, CODE_MAX)
    return torch.cat([codes.to(torch.int8).view(PACKED_DTYPE), scale.contiguous().view(PACKED_DTYPE)], dim=1)


def decode(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The projector in ``dtype`` from its packed codes."""
    codes = packed[:, :-SCALE_BYTES].view(torch.int8)
    scale = packed[:, -SCALE_BYTES:].contiguous().view(torch.float32)
    return codes.to(dtype).mul_(scale.to(dtype))


def working(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored (or gathered) projector in the working ``dtype``: decoded from int8 codes, else cast."""
    return decode(stored, dtype) if is_packed(stored) else stored.to(dtype)


def stored_bytes(rows: int, cols: int, element_bytes: int, name: str) -> int:
    """Bytes of a stored projector (piece) of rows x cols: ``element_bytes`` a code or value, plus int8's scales."""
    return rows * cols * element_bytes + (rows * SCALE_BYTES if name == "int8" else 0)


__all__ = ["decode", "encode", "is_packed", "stored_bytes", "stored_shape", "working"]
