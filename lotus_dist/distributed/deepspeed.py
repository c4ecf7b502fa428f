"""``dist.mode=deepspeed``: the DeepSpeed engine (launcher, config, logging, communication backend) around lotus_dist's
own matrix-granular ZeRO-2 (``owner_optimizer.py``, ``owner_buckets.py``).

A DeepSpeed config may ask for ZeRO stage 1 or 2: the run gets stage-2 behaviour from our owner backend (gradients
reduce-scattered to the owners from backward hooks, whole-matrix updates on the owners, weights all-gathered back)
and the engine itself runs at stage 0, with one log line saying so. Why not DeepSpeed's own stages: they hand the
optimizer flat 1-D partitions of the parameters that cut matrices apart, which no low-rank projection can use (its
Muon support instead computes whole-matrix updates redundantly on every rank that holds a slice). Stage 3 shards the
parameters themselves: it is refused, pointing to ``dist.mode=fsdp`` (FSDP2 with side-aware sharding).
``bf16.enabled`` is honoured as bf16 autocast over fp32 weights (the trainer's ``torch.autocast``, as in every other
mode), not through DeepSpeed's bf16 optimizer wrapper (which flattens too); ``fp16`` (loss scaling) is refused.
The JSON itself is read key by key against our config in ``deepspeed_json.py``.

How the trainer's loop maps onto the engine: ``parallelize`` returns the plain module (so checkpoint FQNs are the
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

import dataclasses
import os

from torch.distributed import ProcessGroup

from lotus_dist.distributed.deepspeed_json import check_config, deepspeed_config, engine_config
from lotus_dist.distributed.modes import OwnerDataParallel
from lotus_dist.errors import UserError


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


class DeepSpeedMode(OwnerDataParallel):
    """``dist.mode=deepspeed`` (under the ``deepspeed`` launcher or torchrun): see the module docstring. The gradient
    path and the optimizer are the ddp mode's (owner-aligned reduce-scatter, owner step, weight all-gather); the
    engine wraps them at stage 0."""

    engine = None

    def parallelize(self, model, cfg):
        # Bad configs are refused first, before DeepSpeed is imported or any engine exists.
        ds_config = deepspeed_config(cfg, self.world_size, self.device.type)
        stage = check_config(ds_config)
        if stage:
            self.log(f"deepspeed: ZeRO stage {stage} requested: lotus_dist runs its own matrix-granular ZeRO-2 inside "
                     f"the engine (gradients reduce-scattered to whole-matrix owners, weights all-gathered back); "
                     f"DeepSpeed's stage-{stage} partitions would cut matrices apart, which no projection can use")
        import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator != self.device.type:  # the engine would move the model to its accelerator
            raise UserError(f"dist.mode=deepspeed: DeepSpeed's accelerator is '{accelerator}' but this run trains "
                            f"on {self.device.type} (dist.backend={cfg.dist.backend}); set DS_ACCELERATOR="
                            f"{self.device.type}")
        model, ctx = super().parallelize(model, cfg)
        return model, dataclasses.replace(ctx, deepspeed_config=ds_config)

    def build_optimizer(self, model, optim_cfg, ctx):
        optimizer = super().build_optimizer(model, optim_cfg, ctx)
        deepspeed = import_deepspeed()
        _disable_shm_comm(deepspeed)
        engine, engine_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=engine_config(ctx.deepspeed_config), dist_init_required=False)
        if engine_optimizer is not optimizer or engine.module is not model:
            raise RuntimeError("DeepSpeed wrapped the optimizer or model; expected ZeRO stage 0 in fp32")
        self.engine = engine  # the one thing the mode keeps: close() tears it down
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
           "release_deepspeed_groups"]
