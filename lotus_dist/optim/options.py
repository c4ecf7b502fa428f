"""The low-rank options: their defaults (the Lotus method), their allowed values and the check of a param group's."""

from __future__ import annotations

import math
from typing import Any

from .subspace import PROJ_TYPES, SOLVERS
from .switching import POLICIES

# The Lotus method (docs/algorithms.md section 8); gamma None = the switch policy's own default.
LOWRANK_DEFAULTS: dict[str, Any] = dict(
    scale=0.25,
    proj_type="std",
    solver="rsvd",
    switch="displacement",
    update_gap=200,
    gamma=None,
    verify_gap=50,
    t_min=50,
    window=50,
    moments="keep",
    residual="none",
    oversample=8,
    power_iters=2,
    geodesic_step=0.1,
    reference_dtype="bf16",  # the displacement policy's d_init: bf16 (half the bytes) or fp32 (exact)
    seed=0,
)
MOMENT_POLICIES = ("keep", "reset", "rotate", "rotate_subtrack")
RESIDUALS = ("none", "fira")
REFERENCE_DTYPES = ("bf16", "fp32")
CHOICES: dict[str, tuple[str, ...]] = {
    "proj_type": PROJ_TYPES,
    "solver": SOLVERS,
    "switch": tuple(POLICIES),
    "moments": MOMENT_POLICIES,
    "residual": RESIDUALS,
    "reference_dtype": REFERENCE_DTYPES,
}
_POSITIVE_INT = ("rank", "update_gap", "verify_gap", "t_min", "window")
_NONNEG_INT = ("oversample", "power_iters", "seed")
_POSITIVE_FLOAT = ("gamma", "geodesic_step")


def check_options(opts: dict, prefix: str = "") -> None:
    """Raise ValueError naming ``prefix + key`` for a bad low-rank option."""
    for key, allowed in CHOICES.items():
        if key in opts and opts[key] not in allowed:
            raise ValueError(f"{prefix}{key}: {opts[key]!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE_INT + _NONNEG_INT:
        v = opts.get(key)
        if v is None and key != "rank":
            continue
        if key in opts and (not isinstance(v, int) or isinstance(v, bool) or v < (1 if key in _POSITIVE_INT else 0)):
            kind = "a positive" if key in _POSITIVE_INT else "a non-negative"
            raise ValueError(f"{prefix}{key}: expected {kind} integer, got {v!r}")
    for key in _POSITIVE_FLOAT + ("scale",):
        v = opts.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{prefix}{key}: expected a positive number, got {v!r}")
