"""``dist.mode=deepspeed``: the DeepSpeed engine (launcher, communication, gradient all-reduce) with ZeRO stage 0 and
the owner backend (``owner.OwnerOptimizer``) for optimizer-state sharding.

DeepSpeed's ZeRO stages 1-3, and its ``bf16``/``fp16`` optimizer wrappers, hand the optimizer flat 1-D partitions
of the parameters that cut matrices apart: no projection method can work on those, so they are refused. bf16 on
CUDA is the trainer's ``torch.autocast`` over fp32 master weights (what DeepSpeed's ``torch_autocast`` section does),
exactly as in every other mode.

How the trainer's loop (``model(x, y)``, ``loss.backward()``, ``clip_grad_norm_``, ``optimizer.step()``) maps onto
the engine: ``wrap_model`` returns the engine's module (so checkpoint FQNs are the plain model's and a DeepSpeed run
resumes under FSDP2, DDP or one process, and back); the gradients of the last micro-batch are all-reduced by the
engine (``allreduce_gradients`` at the accumulation boundary) when ``no_sync(model, last=True)`` exits, i.e.
before the trainer clips; ``optimizer.step()`` is the owner step. Checkpoints go through our DCP path, not
DeepSpeed's.

Compiled op: on the CPU accelerator DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``)
JIT-compiles ``deepspeed_shm_comm`` (``csrc/cpu/comm/shm*.cpp``, a shared-memory all-reduce for intra-node CPU
inference) with ninja on first start, 1-2 minutes. Gloo does our all-reduces, so it is marked incompatible before
the engine starts and never built; ``LOTUS_DS_SHM=1`` keeps DeepSpeed's default (then set ``TORCH_EXTENSIONS_DIR``
to a persistent directory to compile it once).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from lotus_dist.counters import COUNTERS
from lotus_dist.distributed.modes import Collective
from lotus_dist.distributed.owner import BUCKET_MB, build_owner_optimizer
from lotus_dist.errors import UserError

_CUT = "flat 1-D partitions of the parameters that cut matrices apart, which no low-rank projection can use"


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise UserError(f"dist.mode=deepspeed needs DeepSpeed: pip install 'lotus_dist[deepspeed]' ({e})") from None
    return deepspeed


def _disable_shm_comm(deepspeed) -> None:
    """Keep DeepSpeed's CPU accelerator from JIT-compiling its shared-memory all-reduce op (module docstring)."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("LOTUS_DS_SHM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(cfg, world_size: int, device_type: str = "cpu") -> dict:
    """The engine config: ``dist.deepspeed_config`` (a JSON file) with the batch keys filled from ours, or one
    generated from ours. Refuses what would cut matrices apart, and batch settings that contradict ours."""
    t = cfg.train
    grad_accum = t.batch_size // (t.micro_batch_size * world_size)
    ours = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": t.batch_size,
    }
    if cfg.dist.deepspeed_config:
        path = Path(cfg.dist.deepspeed_config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"dist.deepspeed_config: cannot read {path} as JSON ({e})") from None
        if not isinstance(ds, dict):
            raise UserError(f"dist.deepspeed_config: {path} must hold a JSON object")
        for key, value in ours.items():
            if ds.get(key, value) != value:
                raise UserError(f"dist.deepspeed_config: {key}={ds[key]} in {path} contradicts this run's "
                                f"{value} (from train.batch_size, train.micro_batch_size and the world size)")
            ds[key] = value
    else:
        ds = {
            **ours,
            # The trainer clips with train.grad_clip after the all-reduce; the engine sees the same value.
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,  # our metrics logger reports
            "wall_clock_breakdown": False,
        }
        if t.dtype == "bf16" or (t.dtype == "auto" and device_type == "cuda"):  # trainer.resolve_autocast's rule
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # applied by the trainer's autocast
    check_config(ds)
    return ds


def check_config(ds: dict) -> None:
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage:
        raise UserError(f"dist.mode=deepspeed: ZeRO stage {stage} is not supported: DeepSpeed's ZeRO stages hand "
                        f"the optimizer {_CUT}; use stage 0 (lotus_dist shards the optimizer state whole matrix by "
                        f"whole matrix itself) or dist.mode=fsdp")
    for key in ("bf16", "fp16"):
        if (ds.get(key) or {}).get("enabled"):
            raise UserError(f"dist.mode=deepspeed: '{key}.enabled' is not supported: DeepSpeed's {key} optimizer "
                            f"wrapper hands the optimizer {_CUT}; use train.dtype=bf16 (torch autocast over fp32 "
                            f"weights) instead")
    if ds.get("optimizer") or ds.get("scheduler"):
        raise UserError("dist.mode=deepspeed: the DeepSpeed config must not define 'optimizer' or 'scheduler' "
                        "(the optimizer is optim.*, the schedule train.*)")


class DeepSpeedMode(Collective):
    """``dist.mode=deepspeed`` (under the ``deepspeed`` launcher or torchrun): see the module docstring."""

    engine = None

    def wrap_model(self, model, cfg):
        # Bad configs are refused first, before DeepSpeed is imported or any engine exists.
        self.ds_config = deepspeed_config(cfg, self.world_size, self.device.type)
        self.bucket_mb = cfg.dist.bucket_mb
        self.deepspeed = import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator != self.device.type:  # the engine would move the model to its accelerator
            raise UserError(f"dist.mode=deepspeed: DeepSpeed's accelerator is '{accelerator}' but this run trains "
                            f"on {self.device.type} (dist.backend={cfg.dist.backend}); set DS_ACCELERATOR="
                            f"{self.device.type}")
        return self.materialize(model, cfg)

    def build_optimizer(self, model, optim_cfg):
        deepspeed = self.deepspeed
        optimizer = build_owner_optimizer(model, optim_cfg, bucket_mb=getattr(self, "bucket_mb", BUCKET_MB))
        _disable_shm_comm(deepspeed)
        engine, engine_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                               dist_init_required=False)
        if engine_optimizer is not optimizer or engine.module is not model:
            raise RuntimeError("DeepSpeed wrapped the optimizer or model; expected ZeRO stage 0 in fp32")
        self.engine = engine
        return optimizer

    def no_sync(self, model, last: bool):
        if not last:
            return contextlib.nullcontext()  # gradients accumulate locally; the engine reduces at the boundary
        return self._reduce_on_exit()

    @contextlib.contextmanager
    def _reduce_on_exit(self):
        yield
        engine = self.engine
        # The trainer owns the accumulation loop: this is the boundary (the engine's own micro-step counter is
        # not advanced, since engine.backward/step are not called).
        engine.set_gradient_accumulation_boundary(True)
        bucket = max(int(self.bucket_mb * 2**20 / 4), 1)
        try:
            engine.allreduce_gradients(bucket_size=bucket)
        finally:
            engine.set_gradient_accumulation_boundary(None)
        self._count_gradient_reduction(bucket)

    def _count_gradient_reduction(self, bucket_numel: int) -> None:
        """The engine's gradient all-reduce, counted from its layout (buckets of ``bucket_numel`` elements per
        dtype): DeepSpeed issues the collectives itself, through its own comm module."""
        totals: dict = {}
        for p in self.engine.module.parameters():
            if p.grad is not None:
                numel, size = totals.get(p.grad.dtype, (0, p.grad.element_size()))
                totals[p.grad.dtype] = (numel + p.grad.numel(), size)
        for numel, size in totals.values():
            for start in range(0, numel, bucket_numel):
                COUNTERS.collective("all_reduce", min(bucket_numel, numel - start) * size, self.world_size)

    def close(self) -> None:
        self.engine = None
        super().close()


__all__ = ["DeepSpeedMode", "deepspeed_config", "check_config", "import_deepspeed"]
