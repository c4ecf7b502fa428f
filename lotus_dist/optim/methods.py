"""Named methods (docs/algorithms.md section 8) -> parts, and parameter routing.

A method is a row of ``METHODS``; every part key of ``OptimConfig`` that is not None overrides the row
(``optim.solver=rsvd optim.switch=fixed`` is the Lotus ablation). Routing: the 2-D weights of the attention and
MLP projections are projected; embeddings, norms, lm_head (and anything else) get plain AdamW.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from .lowrank import LowRankAdamW
from .options import LOWRANK_DEFAULTS, check_options
from .projfactor import ProjFactor
from .subspace import projected_dim, side_for

PROJECTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Part keys of OptimConfig that a method fills; None in the config = the method's value.
PART_KEYS = tuple(LOWRANK_DEFAULTS) + ("granularity",)

_LOWRANK = {k: v for k, v in LOWRANK_DEFAULTS.items() if k != "seed"}
METHODS: dict[str, dict[str, Any] | None] = {
    "adamw": None,  # full rank: no projected group
    "galore": {**_LOWRANK, "solver": "svd", "switch": "fixed", "moments": "keep", "residual": "none"},
    "lotus": {**_LOWRANK, "solver": "rsvd", "switch": "displacement", "moments": "keep", "residual": "none"},
    "lotus_rho": {**_LOWRANK, "solver": "rsvd", "switch": "path_efficiency", "moments": "keep", "residual": "none"},
    "golore": {**_LOWRANK, "solver": "random", "switch": "fixed", "moments": "keep", "residual": "none"},
    "grassjump": {**_LOWRANK, "solver": "random", "switch": "fixed", "moments": "rotate", "residual": "fira"},
    "grasswalk": {**_LOWRANK, "solver": "grasswalk", "switch": "fixed", "moments": "rotate", "residual": "fira"},
    "osd": {**_LOWRANK, "solver": "online_pca", "switch": "every_step", "moments": "keep", "residual": "none"},
    "fira": {**_LOWRANK, "solver": "svd", "switch": "fixed", "moments": "keep", "residual": "fira"},
    "projfactor": {"granularity": 1, "update_gap": 200},
    # APOLLO / APOLLO-Mini (apollo-torch 1.0.3): Gaussian projection refreshed every T, moments kept, the raw gradient
    # scaled channel- / tensor-wise; alpha 1 / 128 (sqrt(alpha) multiplies the update)
    "apollo": {**_LOWRANK, "solver": "gaussian", "switch": "fixed", "moments": "keep", "residual": "apollo_channel",
               "scale": 1.0},
    "apollo_mini": {**_LOWRANK, "solver": "gaussian", "switch": "fixed", "moments": "keep",
                    "residual": "apollo_tensor", "scale": 128.0},
}
# A method whose rank is part of its definition (APOLLO-Mini: rank 1) ignores optim.rank; tensor-wise scaling at
# another rank is optim.name=apollo optim.residual=apollo_tensor. APOLLO's own rank is optim.rank: the paper's d/4
# is what configs/*.yaml give (tiny 32, llama_60m 128, llama_1b 512).
FIXED_RANKS = {"apollo_mini": 1}


def method_rank(optim_cfg) -> int:
    """The rank r a run projects at: the method's fixed one, else ``optim.rank``."""
    return FIXED_RANKS.get(optim_cfg.name, optim_cfg.rank)


def is_projected(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight of an attention/MLP projection; wrapper prefixes (FSDP, compile) do not matter."""
    parts = name.split(".")
    return p.dim() == 2 and len(parts) >= 2 and parts[-2] in PROJECTED_MODULES and parts[-1] == "weight"


def route_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(projected, plain) lists of (name, parameter) with requires_grad, in model order."""
    projected, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (projected if is_projected(name, p) else plain).append((name, p))
    return projected, plain


def resolve_parts(optim_cfg) -> dict[str, Any] | None:
    """The method's parts with the config's non-None part keys applied; validated, errors name ``optim.<key>``."""
    name = optim_cfg.name
    if name not in METHODS:
        raise ValueError(f"optim.name: unknown method {name!r} (known: {', '.join(METHODS)})")
    base = METHODS[name]
    if base is None:
        return None
    parts = dict(base)
    for key in PART_KEYS:
        value = getattr(optim_cfg, key, None)
        if value is not None and key != "seed":
            parts[key] = value
    parts["seed"] = getattr(optim_cfg, "seed", 0)
    check_options({**parts, "rank": method_rank(optim_cfg)}, prefix="optim.")
    g = parts.get("granularity")
    if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
        raise ValueError(f"optim.granularity: expected a positive integer, got {g!r}")
    return parts


def rank_above_size(model: nn.Module, optim_cfg) -> list[tuple[str, tuple[int, int], int]]:
    """(name, shape, rank used) of the projected matrices whose projected side is smaller than ``optim.rank``:
    the optimizer clips the rank to that side (a full-rank projection, no memory saved on that matrix)."""
    parts = resolve_parts(optim_cfg)
    if parts is None:
        return []
    rank = method_rank(optim_cfg)
    projected, _ = route_parameters(model)
    out = []
    for name, p in projected:
        shape = tuple(p.shape)
        if "granularity" in parts:  # projfactor: the rank of the reshaped (m·c) x (n/c) gradient
            side_len = shape[1] // parts["granularity"]
        else:
            side_len = projected_dim(shape, side_for(shape, parts["proj_type"]))
        if rank > side_len:
            out.append((name, shape, side_len))
    return out


def build_optimizer(model: nn.Module, optim_cfg, names: Mapping[torch.Tensor, str] | None = None) -> LowRankAdamW:
    """The optimizer of ``optim_cfg`` (an OptimConfig) for ``model``.

    Returns a LowRankAdamW (a ProjFactor for ``projfactor``) with group 0 = projected matrices (``rank`` set, the
    method's parts as keys) and group 1 = everything else (plain AdamW); ``adamw`` gives a single plain group.
    ``names`` maps parameter -> name for ``switch_report`` (default: ``model.named_parameters()`` names).
    """
    parts = resolve_parts(optim_cfg)
    lr, betas, eps, wd = optim_cfg.lr, tuple(optim_cfg.betas), optim_cfg.eps, optim_cfg.weight_decay
    if len(betas) != 2:
        raise ValueError(f"optim.betas: expected two numbers, got {list(betas)}")
    projected, plain = route_parameters(model)
    # every group's moments, plain ones too (the plain groups take it as the optimizer's default)
    stored = {"state_dtype": getattr(optim_cfg, "state_dtype", None) or LOWRANK_DEFAULTS["state_dtype"]}
    check_options(stored, prefix="optim.")
    if parts is None:
        groups = [{"params": [p for _, p in projected + plain]}]
        opt = LowRankAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **stored)
    else:
        cls = ProjFactor if optim_cfg.name == "projfactor" else LowRankAdamW
        groups = []
        if projected:
            groups.append({"params": [p for _, p in projected], "rank": method_rank(optim_cfg), **parts})
        if plain:
            groups.append({"params": [p for _, p in plain]})
        if cls is ProjFactor:
            for name, p in projected:
                if p.shape[1] % parts["granularity"]:
                    raise ValueError(
                        f"optim.granularity: {parts['granularity']} does not divide the input dimension "
                        f"{p.shape[1]} of {name}"
                    )
        opt = cls(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **stored)
    given = {id(p): n for p, n in (names or {}).items()}
    opt.param_names = {id(p): given.get(id(p), n) for n, p in projected + plain}
    if getattr(optim_cfg, "refresh_batch_mb", None) is not None:  # else LowRankAdamW's REFRESH_BATCH_BYTES
        opt.refresh_batch_bytes = max(1, int(optim_cfg.refresh_batch_mb * 2**20))
    return opt


__all__ = ["FIXED_RANKS", "METHODS", "PROJECTED_MODULES", "PART_KEYS", "build_optimizer",
           "is_projected", "method_rank", "rank_above_size", "route_parameters"]
