"""FSDP2 wiring: ``fully_shard`` per transformer block, then the root, with the plan's side-aware placements.

Parameters become DTensors on the mesh: ``Shard(d)`` on a 1-D ``("shard",)`` mesh, ``(Replicate(), Shard(d))``
on the 2-D HSDP mesh ``("replicate", "shard")``. The optimizer reads the placement back from each parameter
(``p.placements``); the plan says why it is what it is.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lotus_dist.precision import computes_in_bf16

from .compat import sum_reductions_on_gloo  # importing compat also shims torch 2.6's FSDP2 on CPU
from .sharding_plan import Plan

log = logging.getLogger(__name__)


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # dist.reduce_dtype


def mixed_precision(train_dtype: str, device: torch.device | str,
                    reduce: str = "fp32") -> tuple[torch.dtype | None, torch.dtype | None]:
    """(param_dtype, reduce_dtype) for FSDP2 from ``train.dtype`` and ``dist.reduce_dtype``.

    bf16 compute on CUDA for ``auto``/``bf16``; an explicit ``bf16`` is honoured on CPU too; ``fp32`` (and
    ``auto`` on CPU) means no casting. Gradients are reduced in ``reduce`` (fp32 by default; bf16 halves the
    reduce-scatter / all-reduce bytes at bf16 rounding of each reduction). Sharded master weights and the
    reduced gradient shards stay in the parameters' own dtype (fp32).
    """
    if reduce not in REDUCE_DTYPES:
        raise ValueError(f"unknown dist.reduce_dtype '{reduce}' (known: {', '.join(REDUCE_DTYPES)})")
    if computes_in_bf16(train_dtype, torch.device(device).type):  # raises on an unknown train.dtype
        return torch.bfloat16, REDUCE_DTYPES[reduce]
    return None, (None if reduce == "fp32" else REDUCE_DTYPES[reduce])


def set_gradient_sync(model: nn.Module, last: bool) -> None:
    """``dist.reduce_last_micro_batch``: before each micro-batch's backward, reduce only on the ``last``.

    Flat FSDP: no reduce-scatter before the last micro-batch (``set_requires_gradient_sync``; the unsharded
    gradients accumulate on each rank). HSDP: the reduce-scatter inside the shard group still runs every
    micro-batch, so gradients stay sharded; only the all-reduce across replicas waits (``set_requires_all_reduce``).
    """
    mesh = next(model.parameters()).device_mesh
    if mesh.ndim == 2:
        model.set_requires_all_reduce(last)
    else:
        model.set_requires_gradient_sync(last)


def _check_mesh(mesh: DeviceMesh, plan: Plan) -> None:
    if mesh.ndim not in (1, 2):
        raise ValueError(f"expected a 1-D (shard) or 2-D (replicate, shard) mesh, got {mesh.ndim}-D")
    shard = mesh.size(mesh.ndim - 1)
    replicate = mesh.size(0) if mesh.ndim == 2 else 1
    if (mesh.size(), replicate) != (plan.world_size, plan.replicate):
        raise ValueError(
            f"plan is for world {plan.world_size} = {plan.replicate} x {plan.shard_size}, "
            f"mesh is {mesh.size()} = {replicate} x {shard}"
        )


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    plan: Plan,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
    log_fn: Callable[[str], None] | None = None,
    details: str | None = None,
    projected_mesh: DeviceMesh | None = None,
) -> nn.Module:
    """Shard ``model`` (a ``Llama``: blocks in ``model.layers``) in place with FSDP2 and return it.

    Each block is its own FSDP unit (one all-gather / reduce-scatter per block), the root unit holds the
    embeddings, final norm and lm_head. The root is not resharded after forward: backward starts with lm_head,
    so resharding it would only buy an immediate re-gather. A 2-D mesh gives HSDP.

    ``projected_mesh`` (HSDP's shard sub-mesh, ``dist.replica_sync=lowrank``): each block's projected Linear
    weights form one more unit, on that mesh alone, so FSDP2 does not all-reduce them across replicas
    (distributed/replica_sync.py); the block's other parameters stay on ``mesh``.
    """
    _check_mesh(mesh, plan)
    plan.bind(model)  # before fully_shard replaces the parameters by DTensors
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    common = dict(mesh=mesh, shard_placement_fn=plan.shard_placement_fn, mp_policy=mp)
    units = []
    for i, block in enumerate(model.layers):
        if projected_mesh is not None:
            from .replica_sync import projected_modules

            linears = projected_modules(block, set(plan.matrices), f"layers.{i}")
            if linears:
                out = fully_shard(linears, reshard_after_forward=reshard_after_forward,
                                  **{**common, "mesh": projected_mesh})
                units += out if isinstance(out, list) else [out]
        fully_shard(block, reshard_after_forward=reshard_after_forward, **common)
    fully_shard(model, reshard_after_forward=False, **common)
    # gloo's AVG reduce-scatter sums in several torch releases (pytorch/pytorch#162338): average by hand there.
    sum_reductions_on_gloo([*model.layers, model, *units], mesh)
    emit = log_fn or log.info
    for line in plan.summary(details):  # ``details``: the file naming each fallback matrix, if one was written
        emit(line)
    return model


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a parameter's whole value) for the DTensor parameter ``p``: for every
    ``Shard(d)`` placement, chunk ``d`` as DTensor and FSDP2 lay shards out (``torch.chunk``, uneven tail ranks
    shorter or empty) and take this rank's coordinate on that mesh dim; ``Replicate`` keeps it whole."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return full
    part = full
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            chunks = torch.chunk(part, p.device_mesh.size(mesh_dim), dim=placement.dim)
            index = p.device_mesh.get_local_rank(mesh_dim)
            part = chunks[index] if index < len(chunks) else part.narrow(placement.dim, 0, 0)
    return part


def check_placements(model: nn.Module, plan: Plan) -> None:
    """Assert every parameter carries the placement the plan asked for (a cheap start-up self-check)."""
    from torch.distributed.tensor import DTensor, Shard

    for name, p in model.named_parameters():
        if not isinstance(p, DTensor):
            raise AssertionError(f"{name} is not a DTensor: FSDP was not applied to it")
        want = plan.placement(name)
        got = p.placements[-1]
        if not (isinstance(got, Shard) and got.dim == want.dim):
            raise AssertionError(f"{name}: placement {p.placements}, the plan wants {want}")


__all__ = ["apply_fsdp", "mixed_precision", "check_placements", "local_part", "set_gradient_sync", "REDUCE_DTYPES"]
