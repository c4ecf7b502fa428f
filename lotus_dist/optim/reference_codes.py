"""The displacement policy's stored switch reference D (``optim.reference_dtype``) and the sums it contributes.

``bf16`` / ``fp32``: D dense and R-shaped (``d_init``). ``int4`` (docs/algorithms.md section 5): D quantised per
long-side index. A block is the r entries D_j of one long-side index j, so blocks never cross a shard boundary at any
world size and the codes shard, save and reshard exactly like a moment. Per block: its largest entry kept exact in
fp32 (``d_top``; its code is -8, so its position costs nothing), the others as 4-bit codes q = round(7 x / m) in
[-7, 7] with m the block's second-largest magnitude (two's-complement nibbles, two per uint8 along r: ``d_codes``),
one fp32 scale s_j = ‖rest_j‖² / ⟨rest_j, q_j⟩ (``d_scale``) and ‖D_j‖² in fp32 (``d_norm_sq``). Gradient blocks
are dominated by their first coefficients (the top singular directions), so the exact top entry gives the rest a
finer grid; the scale makes ⟨D_j, D̂_j⟩ = ‖D_j‖², i.e. the noise e = D̂ − D is orthogonal to D in every block. The
estimator ⟨R, D̂⟩ / (‖R‖ ‖D‖) is then exact when R ∝ D, and its error is ⟨R⊥, e⟩ / (‖R‖ ‖D‖): R's part
orthogonal to D against the quantisation noise. Both sums stay partial sums over this rank's long-side indices.

Bytes per long-side index: r/2 + 12, against 8·r for the two fp32 moments (7.4 % at r = 128, 6.5 % at r = 512).
"""

from __future__ import annotations

import math

import torch

from .subspace import lowrank_shape

REFERENCE_DTYPES = ("bf16", "fp32", "int4")
LEVELS = 7  # int4 codes -7..7 (-8 unused: symmetric around 0)
DENSE_KEY = "d_init"
INT4_KEYS = ("d_codes", "d_scale", "d_top", "d_norm_sq")
TOP_CODE = -8  # marks a block's largest entry, stored exactly in d_top
REFERENCE_KEYS = frozenset({DENSE_KEY, *INT4_KEYS})  # every key a reference may store (R-shaped: the long side kept)
OWN_DTYPE_KEYS = frozenset({DENSE_KEY, "d_codes"})  # kept in the dtype they were saved in (bf16 / the state's, uint8)
FP32_KEYS = frozenset({"d_scale", "d_top", "d_norm_sq"})  # fp32 whatever the parameter dtype


def layout(piece: tuple[int, int], side: str, r: int, name: str, state_dtype: torch.dtype) -> dict:
    """key -> (shape, dtype) of the reference of one matrix piece (``piece``: the long side this rank's state
    covers), for ``optim.reference_dtype`` = ``name``; ``state_dtype`` is the exact (fp32) form's dtype."""
    if name == "int4":
        return {"d_codes": (lowrank_shape(piece, side, (r + 1) // 2), torch.uint8),
                "d_scale": (lowrank_shape(piece, side, 1), torch.float32),
                "d_top": (lowrank_shape(piece, side, 1), torch.float32),
                "d_norm_sq": (lowrank_shape(piece, side, 1), torch.float32)}
    return {DENSE_KEY: (lowrank_shape(piece, side, r), torch.bfloat16 if name == "bf16" else state_dtype)}


def allocate(state: dict, piece, side: str, r: int, name: str, state_dtype: torch.dtype, device) -> None:
    for key, (shape, dtype) in layout(piece, side, r, name, state_dtype).items():
        state[key] = torch.zeros(shape, dtype=dtype, device=device)


def reference_bytes(long: int, r: int, name: str, state_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one matrix's reference over ``long`` long-side indices (the planner's count, from ``layout``)."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in layout((long, r), "right", r, name, state_dtype).values())


def _blocks(t: torch.Tensor, side: str) -> torch.Tensor:
    """A view with one row per long-side index: (long, k) of an R-shaped (k, long) or (long, k) tensor."""
    return t.T if side == "left" else t


def _side(state: dict, R: torch.Tensor) -> str:
    """The projected side, read from the shapes: ``d_norm_sq`` is (1, long) beside a left R (r, long), (long, 1)
    beside a right R (long, r); the two agree only for a 1 x 1 R, where both sides read the same."""
    return "right" if tuple(state["d_norm_sq"].shape) == (R.shape[0], 1) else "left"


def store(state: dict, R: torch.Tensor) -> None:
    """D = R (this rank's piece), in the state's form."""
    if DENSE_KEY in state:
        state[DENSE_KEY].copy_(R)
        return
    side = _side(state, R)
    D = _blocks(R, side).float()
    top_at = D.abs().argmax(dim=1, keepdim=True)
    top = D.gather(1, top_at)
    rest = D.scatter(1, top_at, 0.0)
    amax = rest.abs().amax(dim=1, keepdim=True)
    q = torch.round(rest * (LEVELS / amax.clamp_min(torch.finfo(torch.float32).tiny))).nan_to_num_(0.0)
    q = q.clamp_(-LEVELS, LEVELS)
    norm_sq = rest.square().sum(dim=1, keepdim=True)
    dq = (rest * q).sum(dim=1, keepdim=True)  # > 0 unless rest is zero: q has rest's signs and one entry ±7
    _blocks(state["d_scale"], side).copy_(torch.where(dq > 0, norm_sq / dq.clamp_min(1e-38), 0.0))
    _blocks(state["d_top"], side).copy_(top)
    _blocks(state["d_norm_sq"], side).copy_(norm_sq + top.square())
    _blocks(state["d_codes"], side).copy_(pack(q.scatter_(1, top_at, float(TOP_CODE))))


def pack(q: torch.Tensor) -> torch.Tensor:
    """Integer-valued (long, r) floats in [-8, 7] -> (long, ceil(r/2)) uint8: entry 2k in the low nibble, 2k+1 in
    the high one (two's complement, so zero bytes decode to zeros)."""
    nib = (q.to(torch.int8) & 15).to(torch.uint8)
    if nib.shape[1] % 2:
        nib = torch.cat([nib, nib.new_zeros(nib.shape[0], 1)], dim=1)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack(codes: torch.Tensor, r: int) -> torch.Tensor:
    """``pack``'s inverse: (long, ceil(r/2)) uint8 -> (long, r) fp32 in [-8, 7]."""
    nibs = torch.stack([codes & 15, codes >> 4], dim=2).reshape(codes.shape[0], -1)[:, :r]
    return ((nibs ^ 8).to(torch.float32) - 8.0)


def _decode(state: dict, side: str, r: int) -> torch.Tensor:
    """D̂ as (long, r) fp32 blocks."""
    q = unpack(_blocks(state["d_codes"], side), r)
    return torch.where(q == TOP_CODE, _blocks(state["d_top"], side), q * _blocks(state["d_scale"], side))


def decoded(state: dict, side: str, r: int) -> torch.Tensor:
    """D̂ in R's layout, fp32 (tests and diagnostics)."""
    if DENSE_KEY in state:
        return state[DENSE_KEY].float()
    D = _decode(state, side, r)
    return D.T if side == "left" else D


def sums(state: dict, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(⟨R, D̂⟩, ‖D‖²) in fp32, partial sums over this rank's piece."""
    Rf = R.float()
    if DENSE_KEY in state:
        Df = state[DENSE_KEY].float()
        return (Rf * Df).sum(), Df.square().sum()
    side = _side(state, R)
    Rb = _blocks(Rf, side)
    return (Rb * _decode(state, side, Rb.shape[1])).sum(), state["d_norm_sq"].sum()


__all__ = ["REFERENCE_DTYPES", "REFERENCE_KEYS", "allocate", "decoded", "layout", "reference_bytes", "store", "sums"]
