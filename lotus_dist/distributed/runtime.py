"""Process-group and device initialisation, and the device mesh.

Everything is decided at run time from the torchrun environment and the hardware present: the same config runs
as one CPU process, under torchrun on gloo, or on NCCL GPUs.
"""

from __future__ import annotations

import gc
import os
import types
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .sharding_plan import DistConfigError


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    is_distributed: bool

    def destroy(self) -> None:
        destroy()


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise DistConfigError("dist.backend=nccl needs CUDA, and no CUDA device is available (use gloo or auto)")
    if requested not in ("nccl", "gloo"):
        raise DistConfigError(f"unknown dist.backend '{requested}' (known: auto, nccl, gloo)")
    return requested


def _pick_device(backend: str | None, local_rank: int) -> torch.device:
    # gloo's collectives (reduce-scatter in particular) are CPU-only, so a gloo run keeps tensors on the CPU
    # even on a GPU host; NCCL (or a lone process that sees a GPU) uses the local GPU.
    if backend == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise DistConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(dist_cfg) -> Runtime:
    """Start the process group if launched by torchrun (RANK/WORLD_SIZE/LOCAL_RANK), else a single process.

    ``dist_cfg`` is a ``DistConfig``; its ``backend`` (auto | nccl | gloo) overrides the automatic choice and its
    ``mode='single'`` refuses a multi-process launch rather than silently training N independent models.
    """
    mode = getattr(dist_cfg, "mode", "auto")
    requested = getattr(dist_cfg, "backend", "auto") or "auto"
    if not _launched_by_torchrun():
        backend = _pick_backend(requested) if requested != "auto" else None
        return Runtime(0, 1, 0, _pick_device(backend, 0), None, False)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if mode == "single" and world > 1:
        raise DistConfigError(f"dist.mode=single but launched with WORLD_SIZE={world}; use dist.mode=fsdp or auto")
    backend = _pick_backend(requested)
    device = _pick_device(backend, local_rank)
    if not dist.is_initialized():
        # device_id binds NCCL's communicator to this GPU eagerly (and silences the "guessing device" warning).
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = _attempt_store(world)
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return Runtime(rank, world, local_rank, device, backend, True)


def _attempt_store(world: int):
    """The torchelastic agent's store, namespaced by restart attempt; None outside torchelastic.

    After an elastic restart the workers are handed the same agent store as the attempt that failed, and the
    process group's rendezvous keys (each rank's gloo/NCCL address) are not namespaced per attempt: a new rank
    could read a dead rank's address and fail with "connectFullMesh ... Connection refused". A prefix per attempt
    makes every restart rendezvous on fresh keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                           timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"lotus/attempt_{attempt}", client)


def build_mesh(runtime: Runtime, replicate: int = 1) -> DeviceMesh | None:
    """1-D ``("shard",)`` mesh, or the 2-D HSDP mesh ``("replicate", "shard")`` when ``replicate > 1``.

    Returns None for a single process without a process group (no FSDP there).
    """
    if replicate < 1:
        raise DistConfigError(f"dist.replicate must be >= 1, got {replicate}")
    if not runtime.is_distributed:
        if replicate > 1:
            raise DistConfigError(f"dist.replicate={replicate} needs a distributed launch (torchrun)")
        return None
    if runtime.world_size % replicate:
        raise DistConfigError(
            f"world size {runtime.world_size} is not divisible by dist.replicate={replicate} "
            f"(HSDP needs replicate x shard = world size)"
        )
    if replicate == 1:
        return init_device_mesh(runtime.device.type, (runtime.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(
        runtime.device.type, (replicate, runtime.world_size // replicate), mesh_dim_names=("replicate", "shard")
    )


def destroy() -> None:
    """Tear down every process group if there is one (safe to call twice), so that their gloo/NCCL threads end
    here, while the interpreter and the peers are up, not at interpreter shutdown.

    ``destroy_process_group`` only drops torch's own references: a group object something else still holds lives on,
    threads and all (gloo: the transport loop and the worker threads; rank 0: the TCPStore server), until module
    teardown at interpreter exit frees it, in whatever order, after the peers may have exited: that is where ranks
    died with ``terminate called without an active exception`` (SIGABRT after main returned; issue 18). Two kinds of
    holders: default arguments bound to the default group at import (``group=group.WORLD`` in
    ``torch.distributed.nn.functional``, which torch._dynamo imports; ``TorchBackend.barrier`` in DeepSpeed), undone
    by ``_unbind_default_arguments``; and reference cycles, freed by the collection afterwards. Library-owned
    references (DeepSpeed's cached groups) are released by their mode's ``close`` first."""
    if dist.is_available() and dist.is_initialized():
        _unbind_default_arguments(dist.group.WORLD)
        dist.destroy_process_group()
        gc.collect()


def _unbind_default_arguments(group) -> int:
    """Replace ``group`` by None in the default arguments of every Python function (returns how many functions).

    A module imported after ``init_process_group`` that writes ``def f(..., group=group.WORLD)`` binds the default
    group object itself, once: ``destroy_process_group`` cannot free it (see ``destroy``), and after a re-init the
    default would name a dead group. None means "the default group at call time" to every torch.distributed API
    (and to DeepSpeed's ``comm``), which is what those defaults meant."""
    if group is None:
        return 0
    count = 0
    for f in gc.get_objects():
        if type(f) is not types.FunctionType:  # not isinstance: no __class__ lookups on lazy/deprecated proxies
            continue
        defaults, kwdefaults = f.__defaults__, f.__kwdefaults__
        hit = False
        if defaults and any(v is group for v in defaults):
            f.__defaults__ = tuple(None if v is group else v for v in defaults)
            hit = True
        if kwdefaults and any(v is group for v in kwdefaults.values()):
            f.__kwdefaults__ = {k: None if v is group else v for k, v in kwdefaults.items()}
            hit = True
        count += hit
    return count


__all__ = ["DistConfigError", "Runtime", "init_distributed", "build_mesh", "destroy"]
