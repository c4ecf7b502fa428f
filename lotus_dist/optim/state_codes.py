"""How the Adam moments are stored (``optim.state_dtype``, docs/algorithms.md section 4): fp32, bf16, or block-wise
int8, with the update always computed in the working dtype (fp32; fp64 for an fp64 parameter).

int8 stores a moment as plain tensors, codes plus one fp32 scale per block, so they shard, save, load and reshard
like any other state tensor (``exp_avg`` holds the codes, ``exp_avg_scale`` the scales):

- M (``exp_avg``): signed absmax-linear, int8 codes in [-127, 127], scale = absmax / 127 of the block;
- V (``exp_avg_sq``): stored as sqrt(V), unsigned, uint8 codes in [0, 255], scale = max sqrt(V) / 255 of the
  block: the square root halves V's dynamic range in bits, so the small values Adam divides by keep resolution. A
  positive V never decodes to zero (its code is at least 1): M / (sqrt(V) + eps) cannot blow up on a rounding.

A block never crosses a shard boundary: it runs across the dimension that is never sharded, and the scale keeps
the sharded one. For a low-rank moment (R-shaped, the long side kept and sharded) a block is the r entries of one
long-side index; for a plain parameter's moment (FSDP2 shards dim 0) a block is one dim-0 row. A scale tensor has
size 1 along the block's dimensions, so its shape says what a block is, and it is sharded like its codes.

Tensors under ``MIN_ELEMENTS`` elements (norms, small matrices) stay in the working dtype, as do 1-D tensors under
int8 (a row of a 1-D tensor would be one element); the choice is made on the global shape, so every rank and every
world size stores the same format.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

STATE_DTYPES = ("fp32", "bf16", "int8")
MIN_ELEMENTS = 4096
MOMENTS = ("exp_avg", "exp_avg_sq")
SCALE_SUFFIX = "_scale"
SCALE_KEYS = frozenset(k + SCALE_SUFFIX for k in MOMENTS)
# load_state_dict keeps these in the dtype they were saved in (torch would cast codes to the parameter's dtype)
STORED_KEYS = frozenset(MOMENTS) | SCALE_KEYS
CODE_MAX = {"exp_avg": 127, "exp_avg_sq": 255}
CODE_DTYPE = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
SCALE_BYTES = 4  # one fp32 scale per block


def group_format(group: dict) -> str:
    """A param group's ``optim.state_dtype``; fp32 for a group loaded from a checkpoint written before the option."""
    return group.get("state_dtype", "fp32")


def storage(name: str, shape: tuple[int, ...]) -> str:
    """The format a moment of global ``shape`` is stored in under ``optim.state_dtype=name``: "fp32" (the working
    dtype), "bf16" or "int8"."""
    if name == "fp32" or math.prod(shape) < MIN_ELEMENTS or (name == "int8" and len(shape) < 2):
        return "fp32"
    return name


def moment_bytes(name: str, shape: tuple[int, ...], local_numel: int, local_blocks: int,
                 work_bytes: int = 4) -> int:
    """Bytes of both moments on one rank: ``shape`` is the global one (it decides the format), ``local_numel`` and
    ``local_blocks`` (long-side indices, or dim-0 rows) this rank's. What ``allocate`` allocates, for the planner."""
    fmt = storage(name, shape)
    if fmt == "int8":
        return 2 * (local_numel + SCALE_BYTES * local_blocks)
    return 2 * local_numel * (2 if fmt == "bf16" else work_bytes)


def allocate(st: dict, name: str, shape: tuple[int, ...], zeros: Callable[[torch.dtype, bool], torch.Tensor],
             work_dtype: torch.dtype, keys: tuple[str, ...] = MOMENTS) -> None:
    """Zero moments ``keys`` in ``st`` for a state of global ``shape``; ``zeros(dtype, scale)`` makes one tensor
    (the scale's shape when ``scale``: size 1 along the block's dimensions)."""
    fmt = storage(name, shape)
    for key in keys:
        if fmt == "int8":
            st[key] = zeros(CODE_DTYPE[key], False)
            st[key + SCALE_SUFFIX] = zeros(torch.float32, True)
        else:
            st[key] = zeros(torch.bfloat16 if fmt == "bf16" else work_dtype, False)


def keeps_dtype(key: str, value: torch.Tensor) -> bool:
    """Whether a loaded state tensor keeps the dtype it was saved in (torch's load would cast it to the
    parameter's): int8 codes, their scales, bf16 moments."""
    return key in SCALE_KEYS or (key in MOMENTS and (not value.is_floating_point() or value.dtype == torch.bfloat16))


def stored_as(name: str, shape: tuple[int, ...], work_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a moment is held in, None for int8 codes (the fused AdamW kernel needs it to equal the weight's)."""
    fmt = storage(name, shape)
    return None if fmt == "int8" else torch.bfloat16 if fmt == "bf16" else work_dtype


def load(st: dict, work_dtype: torch.dtype, local: Callable = lambda t: t,
         keys: tuple[str, ...] = MOMENTS) -> list[torch.Tensor]:
    """The moments ``keys`` (M, V) in the working dtype: the state tensors themselves when stored in it (updated
    in place), else decoded copies (give them back with ``store``). ``local``: a DTensor's local shard."""
    return [_decode(st, key, work_dtype, local) for key in keys]


def store(st: dict, values: list[torch.Tensor], local: Callable = lambda t: t, keep: torch.Tensor | None = None,
          keys: tuple[str, ...] = MOMENTS) -> None:
    """Write the updated ``load`` values back (nothing to do for tensors updated in place). ``keep`` (a device
    bool): where it is True the stored codes and scales are left exactly as they were (a masked unit)."""
    for key, X in zip(keys, values):
        held = local(st[key])
        if X is held or (X.dtype == held.dtype and X.data_ptr() == held.data_ptr()):  # updated in place
            continue
        if key + SCALE_SUFFIX not in st:
            new = X.to(held.dtype)
            held.copy_(new if keep is None else torch.where(keep, held, new))
            continue
        scale = local(st[key + SCALE_SUFFIX])
        codes, s = _rounded(key, X, block_dims(scale.shape))
        if keep is not None:
            codes, s = torch.where(keep, held, codes), torch.where(keep, scale, s)
        held.copy_(codes)
        scale.copy_(s)


def _decode(st: dict, key: str, work_dtype: torch.dtype, local: Callable) -> torch.Tensor:
    held = local(st[key])
    if key + SCALE_SUFFIX in st:
        return decode(key, held, local(st[key + SCALE_SUFFIX])).to(work_dtype)
    return held if held.dtype == work_dtype else held.to(work_dtype)


def load_stacked(states: list[dict], work_dtype: torch.dtype,
                 keys: tuple[str, ...] = MOMENTS) -> list[torch.Tensor]:
    """``load`` of k states alike (same shape and format) at once: each moment as a k x ... stack in the working
    dtype (a copy: give it back with ``store_stacked``), decoded as ``load`` decodes each (optim/fused_step.py)."""
    out = []
    for key in keys:
        held = torch.stack([st[key] for st in states])
        if key + SCALE_SUFFIX in states[0]:
            held = decode(key, held, torch.stack([st[key + SCALE_SUFFIX] for st in states]))
        out.append(held.to(work_dtype))
    return out


def store_stacked(states: list[dict], values: list[torch.Tensor], keep: torch.Tensor | None = None,
                  keys: tuple[str, ...] = MOMENTS) -> None:
    """``store`` of ``load_stacked``'s stacks into each state, with the same codes and scales ``store`` writes."""
    for key, X in zip(keys, values):
        held = [st[key] for st in states]
        if key + SCALE_SUFFIX not in states[0]:
            parts = [(X.to(held[0].dtype), held)]
        else:
            scales = [st[key + SCALE_SUFFIX] for st in states]
            codes, s = _rounded(key, X, tuple(d + 1 for d in block_dims(scales[0].shape)))
            parts = [(codes.to(held[0].dtype), held), (s, scales)]
        for new, targets in parts:
            if keep is not None:
                new = torch.where(keep, torch.stack(targets), new)
            torch._foreach_copy_(targets, list(new.unbind(0)))


def block_dims(scale_shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The dimensions a block spans: where the scale has size 1."""
    return tuple(d for d, n in enumerate(scale_shape) if n == 1)


def encode(key: str, X: torch.Tensor, scale_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp32 scales) of moment ``key`` with value X (V for ``exp_avg_sq``: its square root is coded)."""
    q, scale = _rounded(key, X, block_dims(scale_shape))
    return q.to(CODE_DTYPE[key]), scale


def _rounded(key: str, X: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes as fp32 integers (``copy_`` into the code tensor converts them exactly) and the scales of blocks
    spanning ``dims``."""
    top = CODE_MAX[key]
    X = X.float()
    if key == "exp_avg_sq":
        X = X.sqrt()  # V >= 0: an EMA of squares, and the rotations' V takes an abs
        amax = X.amax(dim=dims, keepdim=True) if dims else X.clone()
    else:
        amax = X.abs().amax(dim=dims, keepdim=True) if dims else X.abs()
    scale = amax / top
    q = (X / torch.where(scale > 0, scale, torch.ones_like(scale))).round_().clamp_(-top, top)
    if key == "exp_avg_sq":
        torch.maximum(q, X.sign_(), out=q)  # a positive V keeps a positive code (X is a temporary here)
    return q, scale


def decode(key: str, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 value of moment ``key`` (V for ``exp_avg_sq``) from its codes and scales."""
    X = codes.float().mul_(scale)
    return X.square_() if key == "exp_avg_sq" else X


__all__ = ["MIN_ELEMENTS", "MOMENTS", "SCALE_KEYS", "STATE_DTYPES", "STORED_KEYS", "allocate", "decode", "encode",
           "group_format", "keeps_dtype", "load", "load_stacked", "moment_bytes", "storage", "store", "store_stacked", "stored_as"]
