"""``dist.replica_sync=lowrank`` under HSDP: replicas exchange R = project(G), not G, for every projected matrix
(docs/distributed.md).

The wiring (fsdp.py ``apply_fsdp(projected_mesh=...)``): each block's projected Linear weights are one FSDP2 unit on
the *shard* sub-mesh only, so FSDP2 reduce-scatters them inside the shard group and never all-reduces them across
replicas: each replica holds its own partial (per-replica mean) gradient shard. Plain parameters (norms,
embedding, lm_head) keep the 2-D mesh and FSDP2's all-reduce. ``ReplicaSync`` is then the optimizer's replica mean
(optim/consumed_step.py): one flat all-reduce of the step's R (and, on refresh steps, of the switching matrices'
gradient shards) over the replicate group. Ranks of one replicate group share their shard index, so their buffers
have the same size whatever the shard sizes; an element more keeps the collective non-empty on an empty shard.

``FsdpTraffic``: FSDP2's own gradient reductions, counted per mesh dim from its units' padded shard sizes (its
collectives are not issued through the counted path).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.counters import COUNTERS, nbytes
from lotus_dist.optim.consumed_step import Replicas
from lotus_dist.optim.methods import resolve_parts

from .matrix_comm import GROUP_DIMS, counted

REPLICA_SYNCS = ("full", "lowrank")


def full_gradient_reason(optim_cfg) -> str | None:
    """Why ``optim_cfg``'s method needs every replica's full gradient on ordinary steps (None: it reads only R)."""
    parts = resolve_parts(optim_cfg)
    if parts is None or optim_cfg.name == "projfactor":
        return f"optim.name={optim_cfg.name} projects no matrix by a basis"
    if parts.get("residual", "none") != "none":
        return f"its residual ({parts['residual']}) reads the full gradient every step"
    if parts.get("solver") == "online_pca":
        return "optim.solver=online_pca updates its projector from the full gradient every step"
    if parts.get("switch") == "path_efficiency":
        return "optim.switch=path_efficiency sketches the full gradient every step"
    return None


def resolve_replica_sync(setting: str, replicate: int, optim_cfg, log) -> str:
    """The replica sync a run uses: ``lowrank`` where asked, under HSDP, for a method that reads only R; otherwise
    ``full``, said in one log line."""
    if setting not in REPLICA_SYNCS:
        raise ValueError(f"dist.replica_sync: {setting!r} is not one of {', '.join(REPLICA_SYNCS)}")
    if setting == "full":
        return "full"
    if replicate == 1:
        log("dist.replica_sync=lowrank: no replicas (dist.replicate=1), nothing to exchange: full")
        return "full"
    why = full_gradient_reason(optim_cfg)
    if why is not None:
        log(f"dist.replica_sync=lowrank falls back to full: {why}")
        return "full"
    return "lowrank"


class ReplicaSync(Replicas):
    """The mean over the HSDP replicate ``group`` (``replicas`` ranks) of the step's tensors, in one all-reduce per
    dtype; counted in ``replica_comm_bytes`` and ``replica_projected_comm_bytes`` (all it carries is projected)."""

    def __init__(self, group, replicas: int):
        self.group, self.replicas = group, replicas
        GROUP_DIMS[id(group)] = ("replica", "replica_projected")

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        if not by_dtype:  # every rank of the group alike (the same matrices switch): no collective at all
            return
        for dtype, ts in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            flat = torch.cat([t.reshape(-1) for t in ts] + [ts[0].new_zeros(1)])
            counted("all_reduce", nbytes(flat), self.group)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.replicas)
            for t, piece in zip(ts, flat.split([t.numel() for t in ts] + [1])):
                t.copy_(piece.view_as(t))


class FsdpTraffic:
    """FSDP2's gradient reductions per micro-batch, in bytes of the reduced tensors: every unit reduce-scatters its
    padded shards in the shard group; a unit on the 2-D mesh all-reduces its shard across replicas (on the
    micro-batches that reduce, ``count``'s ``all_reduce``)."""

    def __init__(self, model: nn.Module, plan, reduce_bytes: int | None):
        self.shard_bytes = 0  # whole (unsharded, padded) tensors reduce-scattered, per micro-batch
        self.replica_bytes = 0  # shards all-reduced across replicas
        self.replica_projected_bytes = 0
        self.shard_world = self.replicas = 1
        for name, p in model.named_parameters():
            mesh = p.device_mesh
            w = mesh.size(mesh.ndim - 1)
            self.shard_world = w
            elem = reduce_bytes or p.element_size()
            rows = -(-p.shape[0] // w) if p.dim() else 1
            shard = rows * (p.numel() // max(p.shape[0], 1)) * elem if p.dim() else elem
            if plan.placement(name).dim == 1 and p.dim() == 2:  # an even Shard(1): no padding
                shard = p.numel() // w * elem
            self.shard_bytes += shard * w
            if mesh.ndim == 2:
                self.replicas = mesh.size(0)
                self.replica_bytes += shard
                if name in plan.matrices:
                    self.replica_projected_bytes += shard

    def count(self, all_reduce: bool) -> None:
        COUNTERS.collective("reduce_scatter", self.shard_bytes, self.shard_world, ("shard",), optim=False)
        if all_reduce and self.replicas > 1:
            COUNTERS.collective("all_reduce", self.replica_bytes - self.replica_projected_bytes, self.replicas,
                                ("replica",), optim=False)
            COUNTERS.collective("all_reduce", self.replica_projected_bytes, self.replicas,
                                ("replica", "replica_projected"), optim=False)


def replica_step_bytes(plan, reduce_bytes: int = 4, state_bytes: int = 4) -> dict[str, dict[str, float]]:
    """Planned bytes one rank sends across replicas on an ordinary step (ring all-reduce, 2 (R-1)/R of the tensor),
    for ``full`` and ``lowrank``: ``projected`` (the gradient shard, or R: this rank's long-side rows x r, in the
    state dtype) and ``plain`` (every other parameter's shard, all-reduced by FSDP2 in both). Refresh steps add
    the switching matrices' gradient shards under lowrank (not counted here)."""
    ring = 2 * (plan.replicate - 1) / plan.replicate
    w = plan.shard_size
    full = plain = lowrank = 0.0
    for mp in plan.matrices.values():
        m, n = mp.shape
        full += (-(-m // w) * n if mp.shard_dim == 0 else m * (n // w)) * reduce_bytes
        long = mp.shape[mp.state_dim]
        lowrank += -(-long // w) * mp.rank * state_bytes  # a fallback's slice too: its state is sharded by columns
    for shape in plan.unprojected.values():
        rows = shape[0] if shape else 1
        plain += -(-rows // w) * (math.prod(shape) // max(rows, 1)) * reduce_bytes
    return {"full": {"projected": ring * full, "plain": ring * plain},
            "lowrank": {"projected": ring * lowrank, "plain": ring * plain}}


def projected_modules(block: nn.Module, projected: set[str], prefix: str) -> list[nn.Module]:
    """The modules of ``block`` (its FQN ``prefix``) whose own parameters are all projected matrices."""
    out = []
    for name, module in block.named_modules(prefix=prefix):
        own = [f"{name}.{n}" for n, _ in module.named_parameters(recurse=False)]
        if own and all(n in projected for n in own):
            out.append(module)
    return out


__all__ = ["FsdpTraffic", "REPLICA_SYNCS", "ReplicaSync", "full_gradient_reason", "projected_modules",
           "replica_step_bytes",
           "resolve_replica_sync"]
