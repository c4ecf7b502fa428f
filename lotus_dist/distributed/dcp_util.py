"""Save and load sharded model + optimizer state with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards; a checkpoint written at one world size loads at any other (and into a plain
single-process model): ``get_state_dict`` keys optimizer state by parameter FQN and DCP reshards DTensors on load.
These helpers write into a given directory; atomic rename and retention are the trainer's business.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.futures import Future
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

_OPTS = StateDictOptions(full_state_dict=False)

# ``dcp.async_save(no_dist=...)`` came after torch 2.6 (whose async_save has no such keyword: its ``save`` finds a
# missing process group by itself, with a warning), so it is passed only where the signature has it.
_ASYNC_SAVE_HAS_NO_DIST = "no_dist" in inspect.signature(dcp.async_save).parameters


def _as_list(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> list:
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer):
        return [optimizers]
    return list(optimizers)


def sharded_state(model: nn.Module, optimizers=None) -> dict[str, Any]:
    """``{"model": ..., "optim": ...}`` of this rank's shards, FQN-keyed (initialises empty optimizer state)."""
    optims = _as_list(optimizers)
    model_sd, optim_sd = get_state_dict(model, optims, options=_OPTS)
    state: dict[str, Any] = {"model": model_sd}
    if optims:
        state["optim"] = optim_sd
    return state


class RecordingWriter(FileSystemWriter):
    """DCP's file writer that remembers which files this rank wrote (``written``, names relative to the
    checkpoint directory): the shards of ``write_data`` and, on the coordinator, ``.metadata``. A checkpoint's
    manifest lists each file with the checksum computed by the rank that wrote it."""

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.written: list[str] = []

    def write_data(self, plan, planner):
        def record(future):
            results = future.value()
            self.written.extend(r.storage_data.relative_path for r in results)
            return results

        return super().write_data(plan, planner).then(record)

    def finish(self, metadata, results) -> None:
        super().finish(metadata, results)
        self.written.append(METADATA_FILE)


METADATA_FILE = ".metadata"  # DCP's global metadata, written by the coordinator (rank 0) in ``finish``


def _tensors(node: Any, prefix: str = "", local: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) of every tensor in a nested state dict, in order; a DTensor gives its shard (``local``)
    or itself."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _tensors(v, f"{prefix}{k}.", local)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _tensors(v, f"{prefix}{i}.", local)
    elif isinstance(node, torch.Tensor):
        yield prefix.rstrip("."), (node.to_local() if local and hasattr(node, "to_local") else node)


def nonfinite_count(state: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """How many floating-point tensors of ``state`` (this rank's shards) hold a NaN or an infinity, as a 0-dim
    fp32 tensor on ``device``: one inf-norm per tensor, fused per device (``torch._foreach_norm``), no host sync.
    The inf-norm is NaN or inf exactly when the tensor holds one (and cannot overflow, unlike a sum of squares)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in _tensors(state):
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            by_device.setdefault(t.device, []).append(t)
    count = torch.zeros((), dtype=torch.float32, device=device)
    for tensors in by_device.values():
        if hasattr(torch, "_foreach_norm"):
            norms = torch._foreach_norm(tensors, float("inf"))
        else:  # pragma: no cover - torch without the fused kernel
            norms = [torch.linalg.vector_norm(t, float("inf")) for t in tensors]
        bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).sum()
        count += bad.to(device=device, dtype=torch.float32)
    return count


def stored_bytes(state: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """What ``state`` adds to a checkpoint, for a free-space check before writing: (bytes of its DTensors, whole
    and the same on every rank; {key: bytes} of its plain tensors, which may be replicas of other ranks' (DCP
    writes one of each key) or this rank's own). Merged over ranks by ``merge_stored_bytes``."""
    sharded, plain = 0, {}
    for key, t in _tensors(state, local=False):
        if hasattr(t, "to_local"):
            sharded += t.numel() * t.element_size()  # a DTensor's numel is the global one
        else:
            plain[key] = t.numel() * t.element_size()
    return sharded, plain


def merge_stored_bytes(per_rank: list[tuple[int, dict[str, int]]]) -> int:
    """The bytes one checkpoint of these ranks' ``stored_bytes`` takes: the DTensors once, each plain key once."""
    plain: dict[str, int] = {}
    for _, keys in per_rank:
        for key, n in keys.items():
            plain[key] = max(n, plain.get(key, 0))
    return max(s for s, _ in per_rank) + sum(plain.values())


def nonfinite_names(state: Mapping[str, Any], limit: int = 3) -> list[str]:
    """Keys of the first ``limit`` non-finite tensors of ``state`` (host syncs: call it only to name them)."""
    names = []
    for key, t in _tensors(state):
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all()):
            names.append(key)
            if len(names) == limit:
                break
    return names


def save_state(checkpoint_dir: str, state: Mapping[str, Any]) -> list[str]:
    """Collective: write ``state`` (from ``sharded_state``) into ``checkpoint_dir``; returns the files this rank
    wrote."""
    writer = RecordingWriter(checkpoint_dir)
    dcp.save(dict(state), storage_writer=writer)
    return sorted(writer.written)


def async_save_state(checkpoint_dir: str, state: Mapping[str, Any], process_group=None):
    """Like ``save_state`` but returns once the state is staged (copied to CPU memory); the files are written by
    a background thread. Returns ``(future, writer)``: once the future is done, ``writer.written`` lists this
    rank's files.

    ``process_group`` should be a group of its own (``dist.new_group(backend="gloo")``): the writer thread's
    collectives must not interleave with the training loop's on the default group.
    """
    writer = RecordingWriter(checkpoint_dir)
    kwargs = {}
    if _ASYNC_SAVE_HAS_NO_DIST:
        kwargs["no_dist"] = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    future = dcp.async_save(dict(state), storage_writer=writer, process_group=process_group, **kwargs)
    return future, writer


def save_sharded(checkpoint_dir: str, model: nn.Module, optimizers=None, extra: Mapping[str, Any] | None = None) -> None:
    """Collective: every rank calls it. ``extra`` holds more state under its own keys (tensors, primitives, or
    ``Stateful`` objects such as a data loader, saved through their ``state_dict()``)."""
    state = sharded_state(model, optimizers)
    if extra:
        state["extra"] = dict(extra)
    save_state(checkpoint_dir, state)


class OneItemReader(FileSystemReader):
    """DCP's file reader, one stored item per call: its loop over a file's items keeps the previous item's tensor
    until the next one is read, two items (two whole embeddings, unsharded) at a time; one call per item frees
    each on return."""

    def read_data(self, plan, planner):
        for item in plan.items:
            super().read_data(dataclasses.replace(plan, items=[item]), planner).wait()
        future = Future()
        future.set_result(None)
        return future


def allocate_state(optimizers) -> None:
    """Allocate each optimizer's state as a fresh start's first step would (``init_state``: zeros, sharded, on the
    parameters' device), so that a load has live tensors to fill. Without it ``get_state_dict`` would initialise
    the state by a zero-gradient step, whose gradients (model/W bytes) and step temporaries come on top."""
    for opt in _as_list(optimizers):
        if not opt.state and hasattr(opt, "init_state"):
            opt.init_state()


def _storage_ptr(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)


def _apply_loaded(optims: list, loaded: Mapping[str, Any]) -> None:
    """Put the loaded non-tensor parts (step counters, ints, group hyper-parameters) into the optimizers; their
    tensors were filled in place already. Saved groups match ours by position, as in torch's ``load_state_dict``
    (several optimizers: their groups in order)."""
    groups = [g for opt in optims for g in opt.param_groups]
    saved_groups = loaded["param_groups"]
    if len(saved_groups) != len(groups) or any(len(s["params"]) != len(g["params"])
                                              for s, g in zip(saved_groups, groups)):
        raise ValueError("the checkpoint's optimizer has other parameter groups than this one")
    owner = {id(g): opt for opt in optims for g in opt.param_groups}
    for g, s in zip(groups, saved_groups):
        g.update({k: v for k, v in s.items() if k != "params"})
        opt = owner[id(g)]
        for key, p in zip(s["params"], g["params"]):
            saved = loaded["state"].get(key) or {}
            live = opt.state[p] if saved else None
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    if k not in live or _storage_ptr(live[k]) != _storage_ptr(v):
                        raise RuntimeError(f"optimizer state {key}.{k} was not loaded in place")
                else:
                    live[k] = v
    for opt in optims:
        after_load = getattr(opt, "after_load", None)  # LowRankAdamW: drops a cache; OwnerOptimizer: a collective
        if after_load is not None:
            after_load()


def release_memory(device: torch.device | None = None) -> None:
    """Free what a load or a build left for the garbage collector (reference cycles hold some), and hand the
    CUDA allocator's cached blocks back, so that the next step starts as a fresh run's would."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def load_sharded(
    checkpoint_dir: str, model: nn.Module, optimizers=None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Collective: load ``checkpoint_dir`` into ``model`` (and ``optimizers``), whatever world size wrote it.

    In place: the optimizer state is allocated once (``allocate_state``), the state dict DCP fills is made of
    views of the live parameter and state tensors, and only the non-tensor parts are set afterwards, so no second
    copy of the model or of the optimizer state exists at any time (DCP reads one stored item at a time).

    ``extra`` gives the keys and templates to read back (same structure as saved); ``Stateful`` values are
    restored in place. Returns the loaded ``extra`` dict (primitives come back by value).
    """
    optims = _as_list(optimizers)
    allocate_state(optims)
    state = sharded_state(model, optims)
    if extra:
        state["extra"] = dict(extra)
    params = {_storage_ptr(t) for t in state["model"].values() if isinstance(t, torch.Tensor)}
    dcp.load(state, storage_reader=OneItemReader(checkpoint_dir))
    if any(isinstance(t, torch.Tensor) and _storage_ptr(t) not in params for t in state["model"].values()):
        raise RuntimeError("the model's weights were not loaded in place")
    if optims:
        _apply_loaded(optims, state["optim"])
    loaded = state.get("extra", {})
    del state
    release_memory(next(model.parameters()).device)
    return loaded


__all__ = ["METADATA_FILE", "OneItemReader", "RecordingWriter", "allocate_state", "async_save_state", "load_sharded",
           "merge_stored_bytes", "nonfinite_count", "nonfinite_names", "release_memory", "save_sharded", "save_state",
           "sharded_state", "stored_bytes"]
