"""Checkpoints: model and optimizer through torch.distributed.checkpoint, everything else as plain files.

Layout of one checkpoint (``run.dir/checkpoints/step_00000100/``)::

    .metadata, __*_*.distcp   DCP shards of {"model": ..., "optim": ...} (FQN-keyed, reshardable)
    train_state.json          step, tokens, schedule position, what model/method wrote it (rank 0)
    rank_00000.json           that rank's data position (stream state + token buffer), primitives only
    rank_00000_rng.pt         that rank's RNG states, tensors only (loaded with weights_only=True)
    COMPLETE                  written last; a directory without it is never loaded

Every file is written into ``step_N.tmp/`` first and the directory is renamed once all ranks have finished, so a
crash during a save leaves the previous checkpoint as the latest one. With ``asynchronous=True`` the training loop
waits only for the staging copy; the shards are written by a background thread and the checkpoint is committed
(marker + rename) at the first step boundary where every rank's writer has finished (``poll``).
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lotus_dist.distributed.dcp_util import async_save_sharded, load_sharded, save_sharded
from lotus_dist.errors import UserError
from lotus_dist.train.faults import maybe_crash

# DCP warns on every save/load without a process group; a single-process run is exactly that case.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"


def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Every RNG the run touches, as tensors (loadable with ``weights_only=True``)."""
    _, py_words, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_words, dtype=torch.int64),
        "python_gauss": torch.tensor(float("nan") if py_gauss is None else py_gauss, dtype=torch.float64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(np_gauss, dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gauss = float(state["python_gauss"])
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None if gauss != gauss else gauss))
    pos, has_gauss = (int(x) for x in state["numpy_extra"].tolist())
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, float(state["numpy_gauss"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints of one run directory; every rank calls ``save``/``load`` together."""

    def __init__(self, run_dir: str | Path, *, keep: int, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, all_ranks: Callable[[bool], bool] = lambda flag: flag,
                 asynchronous: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.barrier = barrier
        self.all_ranks = all_ranks  # True when the flag is True on every rank (a collective)
        self.asynchronous = asynchronous
        self.pending = None  # (future, step, tmp dir, final dir) of an asynchronous save not yet committed
        self.async_group = None
        if asynchronous and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The writer thread's collectives get a group of their own (every rank creates it, in order).
            self.async_group = torch.distributed.new_group(backend="gloo")

    # ---- discovery -------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp")
                 and (p / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete directories of saves that never completed (rank 0; the others wait)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and (p.name.endswith(".tmp") or not (p / COMPLETE_MARKER).exists()):
                    shutil.rmtree(p, ignore_errors=True)
        self.barrier()

    # ---- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, *, train_state: dict, data_state: dict) -> Path:
        self.wait()  # one save in flight at most; the previous one has normally finished long ago
        final = self.root / _step_dir_name(step)
        tmp = self.root / (_step_dir_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        if self.asynchronous:
            future = async_save_sharded(str(tmp), model, optimizer, process_group=self.async_group)
        else:
            save_sharded(str(tmp), model, optimizer)
        (tmp / f"rank_{self.rank:05d}.json").write_text(json.dumps(data_state))
        torch.save(rng_state(), tmp / f"rank_{self.rank:05d}_rng.pt")
        if self.rank == 0:
            (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": self.world_size}, indent=1))
        if self.asynchronous:
            self.pending = (future, step, tmp, final)
        else:
            self._commit(step, tmp, final)
        return final

    def poll(self) -> None:
        """Commit an asynchronous save once every rank's writer has finished (called at each step boundary)."""
        if self.pending is not None and self.all_ranks(self.pending[0].done()):
            self.wait()

    def wait(self) -> None:
        """Finish and commit an asynchronous save (every rank calls it, at the same point of the loop)."""
        if self.pending is None:
            return
        future, step, tmp, final = self.pending
        self.pending = None
        future.result()
        self._commit(step, tmp, final)

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        maybe_crash("in_save", self.rank, step)
        self.barrier()
        if self.rank == 0:
            (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete_checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    # ---- load ------------------------------------------------------------------------------------------------
    def read_train_state(self, path: Path) -> dict:
        return json.loads((path / TRAIN_STATE).read_text())

    def load(self, path: Path, model, optimizer) -> tuple[dict, dict | None]:
        """Restore model, optimizer and this rank's RNG; return (train_state, this rank's data state or None).

        At another world size the RNG states are not restored, and the data state is None unless the stream is
        the world-size-invariant ``data.split=global`` one.
        """
        train_state = self.read_train_state(path)
        load_sharded(str(path), model, optimizer)
        if train_state.get("world_size") == self.world_size:
            set_rng_state(torch.load(path / f"rank_{self.rank:05d}_rng.pt", weights_only=True))
            return train_state, json.loads((path / f"rank_{self.rank:05d}.json").read_text())
        # Another world size: a position in the one global stream (data.split=global) is the same on every rank,
        # so rank 0's carries over; per-rank positions (split=node) do not.
        first = json.loads((path / "rank_00000.json").read_text())
        return train_state, (first if first.get("split") == "global" else None)


def check_compatible(saved: dict, expected: dict, path: Path) -> None:
    """Refuse a checkpoint written by another model or method, naming what differs."""
    for key in ("model", "optim_method"):
        if saved.get(key) != expected.get(key):
            if key == "model":
                diff = [f"{k}: checkpoint {saved['model'].get(k)} vs run {v}" for k, v in expected["model"].items()
                        if saved.get("model", {}).get(k) != v]
                raise UserError(f"checkpoint {path} was written by another model ({'; '.join(diff)})")
            raise UserError(f"checkpoint {path} was written with optim method {saved.get(key)!r}, "
                            f"this run uses {expected.get(key)!r}")
