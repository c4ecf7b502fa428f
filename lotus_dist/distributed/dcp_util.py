"""Save and load sharded model + optimizer state with ``torch.distributed.checkpoint`` (DCP).

Every rank writes its own shards; a checkpoint written at one world size loads at any other (and into a plain
single-process model): ``get_state_dict`` keys optimizer state by parameter FQN and DCP reshards DTensors on load.
These helpers write into a given directory; atomic rename and retention are the trainer's business.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

_OPTS = StateDictOptions(full_state_dict=False)


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


def save_sharded(checkpoint_dir: str, model: nn.Module, optimizers=None, extra: Mapping[str, Any] | None = None) -> None:
    """Collective: every rank calls it. ``extra`` holds more state under its own keys (tensors, primitives, or
    ``Stateful`` objects such as a data loader, saved through their ``state_dict()``)."""
    state = sharded_state(model, optimizers)
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=checkpoint_dir)


def async_save_sharded(checkpoint_dir: str, model: nn.Module, optimizers=None, process_group=None):
    """Like ``save_sharded`` but returns once the state is staged (copied to CPU memory); the files are written
    by a background thread. Returns a future; wait on it before treating the directory as complete.

    ``process_group`` should be a group of its own (``dist.new_group(backend="gloo")``): the writer thread's
    collectives must not interleave with the training loop's on the default group.
    """
    state = sharded_state(model, optimizers)
    return dcp.async_save(state, checkpoint_id=checkpoint_dir, process_group=process_group,
                          no_dist=not (torch.distributed.is_available() and torch.distributed.is_initialized()))


def load_sharded(
    checkpoint_dir: str, model: nn.Module, optimizers=None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Collective: load ``checkpoint_dir`` into ``model`` (and ``optimizers``), whatever world size wrote it.

    ``extra`` gives the keys and templates to read back (same structure as saved); ``Stateful`` values are
    restored in place. Returns the loaded ``extra`` dict (primitives come back by value).
    """
    optims = _as_list(optimizers)
    state = sharded_state(model, optims)
    if extra:
        state["extra"] = dict(extra)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_state_dict(
        model,
        optims,
        model_state_dict=state["model"],
        optim_state_dict=state.get("optim", {}),
        options=_OPTS,
    )
    return state.get("extra", {})


__all__ = ["sharded_state", "save_sharded", "async_save_sharded", "load_sharded"]
