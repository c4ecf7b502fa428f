"""The low-rank optimizer on FSDP2 DTensor parameters (docs/design.md, docs/algorithms.md section 11).

``build_sharded_optimizer`` builds the ordinary ``LowRankAdamW`` and plugs the distributed parts in:

- a ``MatrixComm`` per projected matrix (matrix_comm.py) from the plan's side / shard dim / fallback / owner;
- a ``StatsComm``: the step's one batched all-reduce of switch statistics, on check steps only;
- state-dict hooks: the step keeps the low-rank state as plain local tensors, but ``state_dict()`` hands them out
  as DTensors with their global shape (moments ``Shard`` along their long side: the weight's own placement,
  except for a fallback matrix, whose r x n state is sharded by columns while its weight is sharded by rows;
  replicated projectors ``Replicate()``, sharded projectors ``Shard(0)``), so DCP stores per-rank-distinct
  tensors (plain tensors with one key are deduplicated!) and reshards them across world sizes;
  ``load_state_dict`` turns them back into local tensors. Scalars (step, tau, n_bases, ...) stay primitives.

Plain parameters are AdamW on their local shards (the fused kernel, no communication).

Solvers: ``rsvd`` always runs in the distributed sketch form (it equals the one-process rsvd to rounding). The
exact ``svd`` (galore, fira, online_pca's first basis, and rsvd methods under ``optim.refresh=owner``) refreshes on
the plan's owner rank: G is gathered there, LAPACK solves it exactly as one process would (GaLore's own sign
choices included, which a moment-keeping method depends on), and the projector is broadcast. Trade-off against a
distributed Gram eigendecomposition (all-reduce of the short x short Gram): one m x n gather per refresh (every
T = 200 steps) and solves serialised on LPT-balanced owners, instead of differing from fp32 svd by eps·σ₁/gap and
needing a long x long Gram for the fallback matrices.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lotus_dist.errors import UserError
from lotus_dist.optim import LowRankAdamW, ProjFactor, build_optimizer
from lotus_dist.optim.methods import resolve_parts
from lotus_dist.optim.reference_codes import REFERENCE_KEYS
from lotus_dist.optim.state_codes import SCALE_KEYS

from .matrix_comm import GROUP_DIMS, PROJECTOR_LAYOUTS, MatrixComm, StatsComm
from .sharding_plan import Plan, choose_projectors, projector_peak_bytes

# Low-rank state tensors shaped like R (the long side kept: a reference's codes and per-index scales, int8 moments'
# scales: one per long-side index, so sharded like the codes) and like the projector.
MOMENT_LIKE = frozenset({"exp_avg", "exp_avg_sq", "pe_acc", "pe_sketch"}) | REFERENCE_KEYS | SCALE_KEYS
PROJECTOR_LIKE = frozenset({"projector", "pca_exp_avg", "pca_exp_avg_sq"})


@dataclass(frozen=True)
class _Layout:
    """How one projected matrix's local state tensors become DTensors in ``state_dict()``."""

    mesh: DeviceMesh
    moment_placements: tuple
    state_dim: int
    long_size: int  # global size of the sharded state dim
    projector_placements: tuple
    projector_shape: tuple[int, int]

    def to_dtensor(self, key: str, t):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or isinstance(t, DTensor):
            return t
        if key in MOMENT_LIKE:
            shape = list(t.shape)
            shape[self.state_dim] = self.long_size
            placements = self.moment_placements
        elif key in PROJECTOR_LIKE:
            # rows are what is sharded; columns are the local tensor's (int8 codes carry their row scales there)
            shape, placements = [self.projector_shape[0], t.shape[1]], self.projector_placements
        else:
            return t
        size = torch.Size(shape)
        stride = (size[1], 1)
        return DTensor.from_local(t, self.mesh, placements, run_check=False, shape=size, stride=stride)


def _check_supported(group: dict, fallback: bool, name: str) -> None:
    if fallback and group["solver"] == "online_pca":
        raise UserError(f"optim.solver=online_pca is not supported for the fallback matrix {name} (Shard(0) with a "
                        f"left projector) under dist.mode=fsdp; use a world size that divides its columns, or "
                        f"dist.mode=single")


def _solver(optim_cfg) -> str | None:
    """The method's solver with ``optim.solver`` applied (``resolve_parts``); None for adamw (no projected group)."""
    return (resolve_parts(optim_cfg) or {}).get("solver")


def owner_refresh_replaces_rsvd(optim_cfg) -> bool:
    """Whether ``optim.refresh=owner`` swaps the method's rsvd solver for the exact SVD on each matrix's owner."""
    if getattr(optim_cfg, "refresh", "distributed") != "owner":
        return False
    return _solver(optim_cfg) == "rsvd"


def resolve_projectors(optim_cfg, plan: Plan) -> tuple[str, str]:
    """``optim.projectors`` for this plan (``auto`` decided by ``sharding_plan.choose_projectors``, which also refuses
    ``shard`` for a solver that trains its projector in place) and why, for the log."""
    setting = getattr(optim_cfg, "projectors", "auto")
    if setting not in ("auto", *PROJECTOR_LAYOUTS):
        raise UserError(f"optim.projectors: {setting!r} is not one of auto, {', '.join(PROJECTOR_LAYOUTS)}")
    per_layer = bool(getattr(optim_cfg, "per_layer", False))
    choice = choose_projectors(setting, plan, per_layer=per_layer, solver=_solver(optim_cfg))
    def size(kind: str) -> str:
        b = projector_peak_bytes(plan, kind, per_layer)["total"]
        return f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"

    why = (f"per-rank projector peak {size('replicate')} replicated, {size('shard')} sharded over {plan.shard_size} "
           f"with {'one unit' if per_layer else 'one'} gathered at a time")
    return choice, why


def build_sharded_optimizer(model: nn.Module, optim_cfg, plan: Plan, mesh: DeviceMesh) -> torch.optim.Optimizer:
    """The optimizer of ``optim_cfg`` for a model sharded by ``apply_fsdp(model, mesh, plan)``.

    Collective and deterministic: every rank of ``mesh`` must call it with the same model and config.
    """
    projectors, _ = resolve_projectors(optim_cfg, plan)
    if owner_refresh_replaces_rsvd(optim_cfg):
        optim_cfg = dataclasses.replace(optim_cfg, solver="svd")
    opt = build_optimizer(model, optim_cfg)
    if isinstance(opt, ProjFactor):
        raise UserError("optim.name=projfactor is not supported under dist.mode=fsdp yet (use dist.mode=single)")
    group = mesh.get_group(mesh.ndim - 1)  # the shard group; under HSDP each replica group works alone
    opt.stats_comm = StatsComm(group)
    GROUP_DIMS[id(group)] = ("shard",)
    names = {id(p): n for n, p in model.named_parameters()}
    layouts: dict[int, _Layout] = {}
    for g in opt.param_groups:
        if g.get("rank") is None:
            continue
        for p in g["params"]:
            name = names[id(p)]
            mp = plan.matrices.get(name)
            if mp is None or not isinstance(p, DTensor):
                raise ValueError(f"projected parameter {name} is not a planned FSDP2 DTensor")
            side, r = LowRankAdamW._geometry(p, g)
            last = p.placements[-1]
            if side != mp.side or not (isinstance(last, Shard) and last.dim == mp.shard_dim):
                raise ValueError(f"{name}: optimizer side {side} / placement {p.placements} disagree with the plan "
                                 f"(side {mp.side}, Shard({mp.shard_dim}))")
            _check_supported(g, mp.fallback, name)
            comm = MatrixComm(group, mp.shape, side, r, mp.shard_dim, mp.fallback, mp.owner, projectors)
            opt.set_comm(p, comm)
            # the parameter's own mesh: 1-D (shard) for a projected weight under dist.replica_sync=lowrank
            replicated = tuple(Replicate() for _ in range(p.device_mesh.ndim))
            proj_pl = replicated if projectors == "replicate" else replicated[:-1] + (Shard(0),)
            layouts[id(p)] = _Layout(
                mesh=p.device_mesh,
                moment_placements=replicated[:-1] + (Shard(mp.state_dim),),  # the fallback's too: by columns
                state_dim=mp.state_dim,
                long_size=mp.shape[mp.state_dim],
                projector_placements=proj_pl,
                projector_shape=comm.full_projector,
            )

    params = [p for g in opt.param_groups for p in g["params"]]

    def to_dtensors(optimizer, state_dict):
        # Optimizer.state_dict() shares the live per-parameter dicts: build new ones, never mutate.
        state = {}
        for key, st in state_dict["state"].items():
            layout = layouts.get(id(params[key])) if isinstance(key, int) else None
            state[key] = {k: layout.to_dtensor(k, v) for k, v in st.items()} if layout else st
        return {**state_dict, "state": state}

    opt.register_state_dict_post_hook(to_dtensors)
    return opt


def mesh_of(model: nn.Module) -> DeviceMesh:
    """The device mesh FSDP2 put the model's parameters on."""
    p = next(model.parameters())
    if not isinstance(p, DTensor):
        raise ValueError("the model is not sharded: apply_fsdp first")
    return p.device_mesh


__all__ = ["build_sharded_optimizer", "mesh_of", "resolve_projectors", "MOMENT_LIKE", "PROJECTOR_LIKE"]
