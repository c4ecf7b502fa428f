"""How the trainer runs across processes: one object per ``dist.mode`` with the same small interface.

A mode holds the facts of the launch (``rank``, ``world_size``, ``device``, ``backend``) and its collectives, and
nothing one call leaves for a later one to read: what ``parallelize`` decides for a model (the FSDP plan and mesh,
the owner backend's buckets and weight dtype, DeepSpeed's config) comes back as a ``ParallelContext`` that the
caller hands to ``build_optimizer`` and to the step (``no_sync``, ``gradients``), and the owner backend's gradient
reducer belongs to its optimizer. The one thing a mode keeps is what ``close`` must tear down (DeepSpeed's engine).

``parallelize`` takes the model as the trainer builds it, on the ``meta`` device: each mode shards it first where
it shards (FSDP2), then gives it storage on its device and initialises it (``materialize``: every rank writes only
its own shards, and gets the weights one process would for the same seed). A model that already has storage is
used as it is.

The trainer only calls ``parallelize``, ``build_optimizer``, ``update_units`` (optim.per_layer), ``no_sync``,
``gradients``, ``all_reduce_mean``, ``all_reduce_sum``, ``all_gather_object``, ``barrier``, ``close``
and reads ``rank``, ``world_size``, ``device``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from pathlib import Path

import torch
import torch.distributed as dist

from lotus_dist.distributed.owner_buckets import check_fits
from lotus_dist.distributed.owner_optimizer import BUCKET_MB, build_owner_optimizer
from lotus_dist.distributed.runtime import Runtime, build_mesh, init_distributed
from lotus_dist.errors import UserError
from lotus_dist.precision import computes_in_bf16


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """What ``parallelize`` decided for one model, read by ``build_optimizer`` and by the step's ``no_sync``. The
    default is the single process's (nothing sharded, nothing deferred)."""

    plan: object = None  # fsdp: the side-aware sharding plan (sharding_plan.Plan)
    reduce_last: bool = False  # fsdp: dist.reduce_last_micro_batch (reduce on a step's last micro-batch only)
    bucket_mb: float = BUCKET_MB  # ddp/deepspeed: dist.bucket_mb, the owner layout's gradient buckets
    weights_dtype: torch.dtype | None = None  # ddp/deepspeed: bf16 weights on every rank, fp32 masters on owners
    grad_accum: int = 1  # ddp/deepspeed: micro-batches per step (the start-up memory check counts their buffers)
    deepspeed_config: dict | None = None  # deepspeed: the checked DeepSpeed JSON the engine starts from
    replica_sync: str = "full"  # fsdp: dist.replica_sync as resolved (replica_sync.resolve_replica_sync)
    traffic: object = None  # fsdp: FSDP2's gradient reductions, counted per micro-batch (replica_sync.FsdpTraffic)


class SingleProcess:
    """``dist.mode=single``: one process, the reference semantics every other mode must reproduce."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.rank, self.world_size, self.device = runtime.rank, runtime.world_size, runtime.device
        self.local_rank, self.backend = runtime.local_rank, runtime.backend  # the rank on this machine; None alone

    def log(self, line: str) -> None:
        """A start-up line said once for the job (by rank 0)."""
        if self.rank == 0:
            print(line, flush=True)

    def parallelize(self, model, cfg) -> tuple[torch.nn.Module, ParallelContext]:
        """The model on this rank, materialised (and sharded where the mode shards), with what was decided."""
        return self.materialize(model, cfg), ParallelContext()

    def materialize(self, model, cfg, local_part=None):
        """Storage on this rank's device for a model built on ``meta`` (its shards, once sharded), initialised by
        ``init_parameters`` one parameter at a time, or loaded from the Hugging Face folder ``model.init_from``
        the same way; a model that has storage already is returned untouched."""
        if not any(p.is_meta for p in model.parameters()):
            return model
        from lotus_dist.model.hf import load_hf_weights
        from lotus_dist.model.llama import init_parameters

        model.to_empty(device=self.device)
        if cfg.model.init_from:
            self.log(f"initialising the model from {cfg.model.init_from} (model.init_from)")
            load_hf_weights(model, cfg.model.init_from, local_part, log=self.log)
        else:
            init_parameters(model, cfg.seed, local_part)
        return model

    def build_optimizer(self, model, optim_cfg, ctx: ParallelContext):
        from lotus_dist.optim import build_optimizer

        return build_optimizer(model, optim_cfg)

    def update_units(self, model):
        """The parameter groups optim.per_layer updates together inside backward (see optim/in_backward.py)."""
        from lotus_dist.optim import units_of

        return units_of(model)

    def no_sync(self, model, optimizer, ctx: ParallelContext, last: bool):
        """A context around one micro-batch's forward and backward (``last``: the step's last)."""
        return contextlib.nullcontext()

    def gradients(self, model, optimizer) -> list[torch.Tensor]:
        """This rank's gradients after backward (the norm and clipping work on these)."""
        return [p.grad for p in model.parameters() if p.grad is not None]

    def all_reduce_mean(self, tensor):
        return tensor

    def all_reduce_sum(self, tensor):
        return tensor

    def all_gather_object(self, obj) -> list:
        """``obj`` of every rank, in rank order (start-up decisions and error lines, never per step)."""
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        self.runtime.destroy()


def single_process(device: torch.device) -> SingleProcess:
    """The single-process mode on ``device`` without a launch (benchmarks and tests that step one process)."""
    return SingleProcess(Runtime(rank=0, world_size=1, local_rank=0, device=torch.device(device), backend=None,
                                 is_distributed=False))


class Collective(SingleProcess):
    """Collectives over the default process group, shared by every multi-process mode."""

    def update_units(self, model):
        raise UserError(f"optim.per_layer=true works with dist.mode=single and fsdp, not {type(self).__name__}: "
                        "here whole matrices are updated by their owner rank after the gradient all-reduce")

    def all_reduce_mean(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / self.world_size

    def all_reduce_sum(self, tensor):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()


FALLBACKS_FILE = "plan_fallbacks.txt"  # in the run directory: each fallback matrix of the plan, one a line


def write_fallbacks(plan, run_dir) -> str | None:
    """Write the plan's fallback matrices to the run directory (a large model has dozens: the log gets one line);
    returns the file's path, or None when there is none (or no run directory: a mode used outside the trainer)."""
    lines = plan.fallback_details()
    if not lines or not Path(run_dir).is_dir():
        return None
    path = Path(run_dir) / FALLBACKS_FILE
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class FullyShardedDataParallel(Collective):
    """``dist.mode=fsdp``: FSDP2 per block with the side-aware plan (HSDP when ``dist.replicate > 1``)."""

    def parallelize(self, model, cfg):
        from lotus_dist.distributed.fsdp import apply_fsdp, local_part, mixed_precision
        from lotus_dist.distributed.replica_sync import FsdpTraffic, resolve_replica_sync
        from lotus_dist.distributed.sharding_plan import method_geometry, plan_for_model
        from lotus_dist.optim.methods import method_rank

        mesh = build_mesh(self.runtime, cfg.dist.replicate)
        proj_type, solver = method_geometry(cfg.optim)  # the method's, with the config's keys applied
        plan = plan_for_model(model, self.world_size, method_rank(cfg.optim), proj_type, solver,
                              replicate=cfg.dist.replicate)
        param_dtype, reduce_dtype = mixed_precision(cfg.train.dtype, self.device, cfg.dist.reduce_dtype)
        details = write_fallbacks(plan, cfg.run.dir) if self.rank == 0 else None
        sync = resolve_replica_sync(cfg.dist.replica_sync, cfg.dist.replicate, cfg.optim, self.log)
        model = apply_fsdp(model, mesh, plan, param_dtype=param_dtype, reduce_dtype=reduce_dtype, log_fn=self.log,
                           details=details, projected_mesh=mesh["shard"] if sync == "lowrank" else None)
        model = self.materialize(model, cfg, local_part)  # sharded first: no rank ever holds the whole model
        traffic = FsdpTraffic(model, plan, reduce_dtype.itemsize if reduce_dtype is not None else None)
        return model, ParallelContext(plan=plan, reduce_last=cfg.dist.reduce_last_micro_batch, replica_sync=sync,
                                      traffic=traffic)

    def no_sync(self, model, optimizer, ctx: ParallelContext, last: bool):
        if ctx.traffic is not None:  # what FSDP2 reduces after this micro-batch's backward
            ctx.traffic.count(all_reduce=last or not ctx.reduce_last)
        if ctx.reduce_last:
            from lotus_dist.distributed.fsdp import set_gradient_sync

            set_gradient_sync(model, last)
        return contextlib.nullcontext()

    def update_units(self, model):
        from lotus_dist.optim import units_of

        return units_of(model, root_as_one_unit=True)  # FSDP2 reduce-scatters the root's gradients together

    def build_optimizer(self, model, optim_cfg, ctx: ParallelContext):
        from lotus_dist.distributed.fsdp_optimizer import (build_sharded_optimizer, mesh_of, owner_refresh_replaces_rsvd,
                                                    resolve_projectors)

        if owner_refresh_replaces_rsvd(optim_cfg):
            # a solver change the user should see: the exact SVD is what every projector refresh now computes
            self.log(f"optim.refresh=owner: {optim_cfg.name}'s projectors are refreshed by an exact SVD on each "
                     f"matrix's owner rank instead of the distributed rsvd")
        projectors, why = resolve_projectors(optim_cfg, ctx.plan)
        if optim_cfg.name != "adamw":  # adamw keeps no projectors
            self.log(f"optim.projectors={optim_cfg.projectors}: {projectors} ({why})")
        optim_cfg = dataclasses.replace(optim_cfg, projectors=projectors)
        optimizer = build_sharded_optimizer(model, optim_cfg, ctx.plan, mesh_of(model))
        if ctx.replica_sync == "lowrank":  # the replica mean of R (the consumed step runs it)
            from lotus_dist.distributed.replica_sync import ReplicaSync

            mesh = mesh_of(model)
            optimizer.replicas = ReplicaSync(mesh.get_group(0), mesh.size(0))
        return optimizer


class OwnerDataParallel(Collective):
    """``dist.mode=ddp``: the model whole on every rank, its gradients reduce-scattered to their owners from
    backward hooks (the optimizer's ``OwnerReducer``: on the step's last micro-batch; earlier ones accumulate in
    fp32 buckets), the optimizer state and update on the owners (``OwnerOptimizer``), the weights all-gathered back.
    After backward a rank holds the gradients of its own parameters only, so the trainer's norm (each owned
    gradient counted once, summed over the ranks) is the global one."""

    def parallelize(self, model, cfg):
        ctx = ParallelContext(
            bucket_mb=cfg.dist.bucket_mb,
            grad_accum=max(1, cfg.train.batch_size // (cfg.train.micro_batch_size * self.world_size)),
            # bf16 weights where the trainer computes in bf16 (train.dtype=bf16, or auto on CUDA)
            weights_dtype=torch.bfloat16 if computes_in_bf16(cfg.train.dtype, self.device.type) else None)
        return self.materialize(model, cfg), ctx  # whole on every rank, initialised (in fp32) as one process would

    def build_optimizer(self, model, optim_cfg, ctx: ParallelContext):
        optimizer = build_owner_optimizer(model, optim_cfg, bucket_mb=ctx.bucket_mb, weights_dtype=ctx.weights_dtype)
        # refused on every rank alike (shapes only) before the first step, rather than out of memory in it
        check_fits(optimizer.predicted_bytes(ctx.grad_accum)["total"], self.device_bytes(),
                   "the weights, the step's gradient buffers and the optimizer state, without activations")
        optimizer.reduce_in_backward()
        return optimizer

    def device_bytes(self) -> int | None:
        """The accelerator's memory (None on a CPU: no check)."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return None

    def gradients(self, model, optimizer) -> list[torch.Tensor]:
        return optimizer.gradients()

    def no_sync(self, model, optimizer, ctx: ParallelContext, last: bool):
        return optimizer.reducing(last)


def _imported(module: str, name: str):
    """A mode class imported on first use: deepspeed.py imports this module (OwnerDataParallel)."""
    return lambda runtime: getattr(importlib.import_module(module), name)(runtime)


MODES = {
    "single": SingleProcess,
    "fsdp": FullyShardedDataParallel,
    "ddp": OwnerDataParallel,
    "deepspeed": _imported("lotus_dist.distributed.deepspeed", "DeepSpeedMode"),
}


def build_parallelism(cfg):
    runtime = init_distributed(cfg.dist)
    mode = cfg.dist.mode
    if mode == "auto":
        mode = "fsdp" if runtime.world_size > 1 else "single"
    if mode not in MODES:
        runtime.destroy()
        raise UserError(f"dist.mode={mode} is not available yet (available: {', '.join(MODES)})")
    if mode != "single" and not runtime.is_distributed:
        raise UserError(f"dist.mode={mode} needs a torchrun launch (torchrun --nproc_per_node=N pretrain.py ...); "
                        "use dist.mode=auto or single for one process")
    replicate = cfg.dist.replicate
    if replicate > 1 and (mode != "fsdp" or runtime.world_size % replicate):
        runtime.destroy()
        raise UserError(f"dist.replicate={replicate} (HSDP) needs dist.mode=fsdp on a world size that is a multiple "
                        f"of {replicate}; this run is dist.mode={mode} on {runtime.world_size} rank(s)")
    return MODES[mode](runtime)
