"""What the trainer logs of an optimizer's state: its bytes, its subspace switches, its failed basis solves."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from .reference_codes import REFERENCE_KEYS
from .state_codes import SCALE_KEYS
from .tensors import _local

# memory_report's classes of state tensors
MOMENT_KEYS = frozenset({"exp_avg", "exp_avg_sq", "v_row", "v_col"}) | SCALE_KEYS  # int8: codes and scales
PROJECTOR_KEYS = frozenset({"projector"})


def memory_report(optimizer: Optimizer) -> dict[str, int]:
    """Bytes of optimizer state held by this process: moments, projectors, other tensors, total; and ``reference``,
    the part of ``other`` that is the displacement policy's switch reference (optim.reference_dtype)."""
    out = {"moments": 0, "projectors": 0, "other": 0, "reference": 0}
    for st in optimizer.state.values():
        for key, value in st.items():
            if not isinstance(value, torch.Tensor):
                continue
            t = _local(value)
            nbytes = t.numel() * t.element_size()
            cls = "moments" if key in MOMENT_KEYS else "projectors" if key in PROJECTOR_KEYS else "other"
            out[cls] += nbytes
            if key in REFERENCE_KEYS:
                out["reference"] += nbytes
    out["total"] = out["moments"] + out["projectors"] + out["other"]
    return out


def switch_report(optimizer: Optimizer) -> dict[str, int]:
    """Subspace switches (bases computed after the first) per projected matrix, keyed by a stable name, as this
    rank's state holds them. Under the owner backend other ranks' counts are mirrors: ``gathered_switch_report``."""
    names = getattr(optimizer, "param_names", {})
    out: dict[str, int] = {}
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("rank") is None:
            continue
        for pi, p in enumerate(group["params"]):
            st = optimizer.state.get(p, {})
            out[names.get(id(p), f"group{gi}.param{pi}")] = max(int(st.get("n_bases", 0)) - 1, 0)
    return out


def gathered_switch_report(optimizer: Optimizer) -> dict[str, int]:
    """``switch_report`` with every rank's counts: a collective under the owner backend (its ``sync_switch_counts``,
    one all-reduce and host sync when counts changed since the last report), which every rank must call alike."""
    sync = getattr(optimizer, "sync_switch_counts", None)
    if callable(sync):
        sync()
    return switch_report(optimizer)


def solver_fallback_report(optimizer: Optimizer) -> int:
    """Basis solves that failed and fell back (kept the previous basis, or a random first one), in total."""
    return sum(int(st.get("solver_fallbacks", 0)) for st in optimizer.state.values())
