"""``dist.mode=deepspeed``: the DeepSpeed engine (launcher, config, logging, communication backend) around lotus_dist's
own matrix-granular ZeRO-2 (``owner.py``, ``owner_buckets.py``).

A DeepSpeed config may ask for ZeRO stage 1 or 2: the run gets stage-2 behaviour from our owner backend (gradients
reduce-scattered to the owners from backward hooks, whole-matrix updates on the owners, weights all-gathered back)
and the engine itself runs at stage 0, with one log line saying so. Why not DeepSpeed's own stages: they hand the
optimizer flat 1-D partitions of the parameters that cut matrices apart, which no low-rank projection can use (its
Muon support instead computes whole-matrix updates redundantly on every rank that holds a slice). Stage 3 shards the
parameters themselves: it is refused, pointing to ``dist.mode=fsdp`` (FSDP2 with side-aware sharding).
``bf16.enabled`` is honoured as bf16 autocast over fp32 weights (the trainer's ``torch.autocast``, as in every other
mode), not through DeepSpeed's bf16 optimizer wrapper (which flattens too); ``fp16`` (loss scaling) is refused.

How the trainer's loop maps onto the engine: ``wrap_model`` returns the plain module (so checkpoint FQNs are the
plain model's and a DeepSpeed run resumes under FSDP2, ddp or one process, and back); the last micro-batch's
gradients are reduced to their owners by hooks during its backward and awaited when ``no_sync(model, last=True)``
exits, i.e. before the trainer's norm and clipping; ``optimizer.step()`` is the owner step. Checkpoints go through
our DCP path, not DeepSpeed's.

Compiled op: on the CPU accelerator DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``)
JIT-compiles ``deepspeed_shm_comm`` (``csrc/cpu/comm/shm*.cpp``, a shared-memory all-reduce for intra-node CPU
inference) with ninja on first start, 1-2 minutes. Gloo does our collectives, so it is marked incompatible before
the engine starts and never built; ``LOTUS_DS_SHM=1`` keeps DeepSpeed's default (then set ``TORCH_EXTENSIONS_DIR``
to a persistent directory to compile it once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch.distributed import ProcessGroup

from lotus_dist.distributed.owner import OwnerDataParallel
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


def uses_bf16(ds: dict) -> bool:
    return bool((ds.get("bf16") or {}).get("enabled") or (ds.get("torch_autocast") or {}).get("enabled"))


def check_config(ds: dict) -> int:
    """Refuse what cannot run on whole matrices; returns the ZeRO stage asked for (0, 1 or 2)."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"dist.mode=deepspeed: zero_optimization.stage={stage!r} is not one of 0, 1, 2, 3")
    if stage == 3:
        raise UserError("dist.mode=deepspeed: ZeRO stage 3 is not supported: it shards the parameters into "
                        f"{_CUT}; use dist.mode=fsdp (FSDP2, sharded along each matrix's long side) instead")
    if (ds.get("fp16") or {}).get("enabled"):
        raise UserError(f"dist.mode=deepspeed: 'fp16.enabled' is not supported: DeepSpeed's fp16 optimizer wrapper "
                        f"hands the optimizer {_CUT}; use bf16 (train.dtype=bf16 or the config's bf16.enabled)")
    if ds.get("optimizer") or ds.get("scheduler"):
        raise UserError("dist.mode=deepspeed: the DeepSpeed config must not define 'optimizer' or 'scheduler' "
                        "(the optimizer is optim.*, the schedule train.*)")
    return stage


def engine_config(ds: dict) -> dict:
    """What the engine itself is given: stage 0 and no bf16 wrapper (our owner backend and autocast do those)."""
    out = {**ds, "zero_optimization": {**(ds.get("zero_optimization") or {}), "stage": 0}}
    if (ds.get("bf16") or {}).get("enabled"):
        out["bf16"] = {**ds["bf16"], "enabled": False}
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # applied by the trainer's autocast
    return out


class DeepSpeedMode(OwnerDataParallel):
    """``dist.mode=deepspeed`` (under the ``deepspeed`` launcher or torchrun): see the module docstring. The gradient
    path and the optimizer are the ddp mode's (owner-aligned reduce-scatter, owner step, weight all-gather); the
    engine wraps them at stage 0."""

    engine = None

    def wrap_model(self, model, cfg):
        # Bad configs are refused first, before DeepSpeed is imported or any engine exists.
        self.ds_config = deepspeed_config(cfg, self.world_size, self.device.type)
        stage = check_config(self.ds_config)
        if stage:
            self.log(f"deepspeed: ZeRO stage {stage} requested: lotus_dist runs its own matrix-granular ZeRO-2 inside "
                     f"the engine (gradients reduce-scattered to whole-matrix owners, weights all-gathered back); "
                     f"DeepSpeed's stage-{stage} partitions would cut matrices apart, which no projection can use")
        autocast = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and self.device.type == "cuda")
        if uses_bf16(self.ds_config) and not autocast:
            raise UserError(f"dist.mode=deepspeed: the DeepSpeed config enables bf16 but this run computes in fp32 "
                            f"(train.dtype={cfg.train.dtype} on {self.device.type}); set train.dtype=bf16 so the "
                            f"trainer's autocast applies it")
        self.deepspeed = import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator != self.device.type:  # the engine would move the model to its accelerator
            raise UserError(f"dist.mode=deepspeed: DeepSpeed's accelerator is '{accelerator}' but this run trains "
                            f"on {self.device.type} (dist.backend={cfg.dist.backend}); set DS_ACCELERATOR="
                            f"{self.device.type}")
        return super().wrap_model(model, cfg)

    def build_optimizer(self, model, optim_cfg):
        optimizer = super().build_optimizer(model, optim_cfg)
        _disable_shm_comm(self.deepspeed)
        engine, engine_optimizer, _, _ = self.deepspeed.initialize(
            model=model, optimizer=optimizer, config=engine_config(self.ds_config), dist_init_required=False)
        if engine_optimizer is not optimizer or engine.module is not model:
            raise RuntimeError("DeepSpeed wrapped the optimizer or model; expected ZeRO stage 0 in fp32")
        self.engine = engine
        return optimizer

    def close(self) -> None:
        """Tear the engine and every process group down while the interpreter and the peers are up (see
        ``runtime.destroy``): ``deepspeed.initialize`` clones the world group (``deepspeed.utils.groups``
        ``_WORLD_GROUP``, also each engine's ``data_parallel_group``) and DeepSpeed keeps that reference after
        ``torch.distributed.destroy_process_group``; the clone's gloo threads then lived until interpreter shutdown."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.destroy()  # DeepSpeed's own teardown (its gc policy, buffers it registered)
            # The model's hooks may keep the engine alive past this call (the caller still holds the model): drop
            # its references to the groups, not just ours to it.
            for name, value in list(vars(engine).items()):
                if isinstance(value, ProcessGroup):
                    setattr(engine, name, None)
            del engine
        release_deepspeed_groups()
        super().close()


def release_deepspeed_groups() -> None:
    """Drop DeepSpeed's references to process groups (``deepspeed.utils.groups``: the world-group clone, model/data
    parallel groups) so that ``runtime.destroy`` frees them; without DeepSpeed imported there are none. Safe to call
    twice, before or after the default group is destroyed (then the groups are freed here)."""
    import gc
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    release = getattr(groups, "_release_process_group_references", None)  # DeepSpeed's own
    if release is not None:
        release(None)
    else:
        groups._WORLD_GROUP = None
    gc.collect()


__all__ = ["DeepSpeedMode", "check_config", "deepspeed_config", "engine_config", "import_deepspeed",
           "release_deepspeed_groups", "uses_bf16"]
