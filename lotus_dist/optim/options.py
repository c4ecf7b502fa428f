"""The low-rank options, one schema: each key's type (a ``Literal`` of its allowed values, or a bounded number), its
default (the Lotus method) and a one-line doc. ``LOWRANK_DEFAULTS``, ``CHOICES`` and ``check_options`` derive from
it, and the run config annotates its ``optim.*`` part keys with the same types (train/config.py), so an allowed
value is written once: in the tuple beside its implementation."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional

from .apollo import APOLLO_RESIDUALS
from .reference_codes import REFERENCE_DTYPES
from .state_codes import STATE_DTYPES
from .subspace import PROJ_TYPES, SOLVERS
from .switching import POLICIES

MOMENT_POLICIES = ("keep", "reset", "rotate", "rotate_subtrack")
# What of the full gradient reaches W beside (or, for APOLLO, instead of) the projected update: APOLLO's rule is a
# residual value, not a part of its own, because like Fira's it is a function of (G, R, N) after the same low-rank
# Adam step and keeps the same limiter state; any solver and switch policy combine with it (optim/apollo.py).
RESIDUALS = ("none", "fira", *APOLLO_RESIDUALS)
PROJECTOR_DTYPES = ("fp32", "bf16", "int8")  # (typing caches Optional[] of equal Literals as one: the order of
# STATE_DTYPES, so either annotation reads the same)

# Literal types built from the tuples at run time (a static checker cannot evaluate that: hence the ignores); the
# config and the checks below read their values with typing.get_args.
ProjType = Literal[PROJ_TYPES]  # type: ignore[valid-type]
Solver = Literal[SOLVERS]  # type: ignore[valid-type]
SwitchPolicy = Literal[tuple(POLICIES)]  # type: ignore[valid-type]
MomentPolicy = Literal[MOMENT_POLICIES]  # type: ignore[valid-type]
Residual = Literal[RESIDUALS]  # type: ignore[valid-type]
ReferenceDtype = Literal[REFERENCE_DTYPES]  # type: ignore[valid-type]
StateDtype = Literal[STATE_DTYPES]  # type: ignore[valid-type]
ProjectorDtype = Literal[PROJECTOR_DTYPES]  # type: ignore[valid-type]

REQUIRED = object()  # the "default" of an option every low-rank group must give (its rank)


@dataclass(frozen=True)
class Option:
    type: Any  # a Literal of the allowed values, int, float or bool
    default: Any  # the Lotus method's value (REQUIRED: none); a number option with a default accepts None
    doc: str
    bound: str = "positive"  # numbers: positive (ints >= 1, floats > 0 and finite) or non-negative (ints >= 0)

    @property
    def choices(self) -> Optional[tuple]:
        """The allowed values of a Literal-typed option; None for a number."""
        return typing.get_args(self.type) if typing.get_origin(self.type) is Literal else None


OPTIONS: dict[str, Option] = {
    "rank": Option(int, REQUIRED, "r, the projected dimension (clipped to a matrix's projected side)"),
    "scale": Option(float, 0.25, "alpha, the scale of the projected update (APOLLO: sqrt(alpha) scales its update)"),
    "proj_type": Option(ProjType, "std", "which side the projector sits on (std: the short one, reverse_std: "
                                         "the long one)"),
    "solver": Option(Solver, "rsvd", "how a refresh computes the new basis (gaussian: APOLLO's N(0, 1/r) "
                                     "projection, not orthonormalised)"),
    "switch": Option(SwitchPolicy, "displacement", "when the basis is refreshed"),
    "update_gap": Option(int, 200, "T of the fixed policy: steps between refreshes"),
    "gamma": Option(float, None, "threshold of displacement / path_efficiency (None: displacement 2 / update_gap, path_efficiency 0.5)"),
    "verify_gap": Option(int, 50, "eta of the displacement policy: steps between switch checks"),
    "t_min": Option(int, 50, "minimum interval of path_efficiency"),
    "window": Option(int, 50, "w of path_efficiency"),
    "moments": Option(MomentPolicy, "keep", "what the moments do at a switch (rotate: LDAdam; rotate_subtrack: "
                                            "SubTrack++'s code)"),
    "residual": Option(Residual, "none", "fira: add Fira's scaled residual of the gradient outside the subspace; "
                                         "apollo_channel / apollo_tensor: the update is APOLLO's raw gradient scaled "
                                         "per channel / per tensor by |N|/|R|, instead of the projected one"),
    "oversample": Option(int, 8, "p of rsvd", bound="non-negative"),
    "power_iters": Option(int, 2, "q of rsvd", bound="non-negative"),
    "geodesic_step": Option(float, 0.1, "eta_g of grasswalk"),
    "reference_dtype": Option(ReferenceDtype, "bf16", "the displacement policy's stored reference d_init (bf16: "
                                                      "half the bytes; fp32: exact; int4: 4-bit codes per "
                                                      "long-side index, 1/16 of the moments' bytes)"),
    "state_dtype": Option(StateDtype, "fp32", "how the Adam moments of every group (plain ones too) are stored: "
                                             "fp32, bf16, or int8 block-wise codes (optim/state_codes.py)"),
    "projector_dtype": Option(ProjectorDtype, "fp32", "the stored projector (bf16: half the bytes; int8: a quarter, "
                                                      "codes with a scale per row; rounded once when a basis is "
                                                      "stored; solvers and products run in fp32)"),
    "fused": Option(bool, False, "step the projected matrices of one shape, side, dtype and state format together "
                                 "(stacked: kernels per step grow with those groups, not with matrices; "
                                 "optim/fused_step.py)"),
    "seed": Option(int, 0, "seed of every random basis (with the matrix index and the switch count)",
                   bound="non-negative"),
}

# The Lotus method (docs/algorithms.md section 8); gamma None = the switch policy's own default.
LOWRANK_DEFAULTS: dict[str, Any] = {k: o.default for k, o in OPTIONS.items() if o.default is not REQUIRED}
CHOICES: dict[str, tuple[str, ...]] = {k: o.choices for k, o in OPTIONS.items() if o.choices is not None}


def check_options(opts: dict, prefix: str = "") -> None:
    """Raise ValueError naming ``prefix + key`` for a bad low-rank option."""
    for key, option in OPTIONS.items():
        v = opts.get(key)
        if key not in opts or (v is None and option.choices is None and option.default is not REQUIRED):
            continue  # absent, or None for a number that has a default (gamma None: the policy's own)
        if option.choices is not None:
            if v not in option.choices:
                raise ValueError(f"{prefix}{key}: {v!r} is not one of {', '.join(option.choices)}")
        elif option.type is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{prefix}{key}: expected true/false, got {v!r}")
        elif option.type is int:
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if option.bound == "positive" else 0):
                raise ValueError(f"{prefix}{key}: expected a {option.bound} integer, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{prefix}{key}: expected a positive number, got {v!r}")
    rounded = opts.get("projector_dtype")
    if rounded in ("bf16", "int8") and opts.get("solver") == "online_pca":
        # its projector takes an Adam step every step, far below a rounded format's resolution: the steps would round away
        raise ValueError(f"{prefix}projector_dtype={rounded} does not fit {prefix}solver=online_pca (its per-step "
                         f"Adam update of the projector is below {rounded}'s resolution); use "
                         f"{prefix}projector_dtype=fp32")
