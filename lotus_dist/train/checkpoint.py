"""Checkpoints: model and optimizer through torch.distributed.checkpoint, everything else as plain files.

Layout of one checkpoint (``run.dir/checkpoints/step_00000100/``)::

    .metadata, __*_*.distcp   DCP shards of {"model": ..., "optim": ...} (FQN-keyed, reshardable)
    train_state.json          step, tokens, schedule position, what model/method/shapes wrote it (rank 0)
    rank_00000.json           that rank's data position (stream state + token buffer), primitives only
    rank_00000_rng.pt         that rank's RNG states, tensors only (loaded with weights_only=True)
    manifest_rank_00000.json  size and CRC-32 of every file that rank wrote (see manifest.py)
    COMPLETE                  written last; a directory without it is never loaded

Only good state becomes a checkpoint: before anything is written every rank checks that its model and optimizer
shards are finite (one fused check, one all-reduce); a non-finite state is refused and the last good checkpoint is
named. Every file is written into ``step_N.tmp/`` first and the directory is renamed once all ranks have finished
and listed their files, so a crash during a save leaves the previous checkpoint as the latest one. With
``asynchronous=True`` the training loop waits only for the staging copy; the shards (and their checksums) are
written by background threads and the checkpoint is committed (marker + rename) at the first step boundary where
every rank's writer has finished (``writing``, agreed in the trainer's step reduction).

Resuming (``resume``) proves the newest checkpoint against its manifests (each rank checks a share of the files)
and loads it; one that fails is skipped with one warning line naming the file, and the next older one is tried.
Damaged checkpoints are renamed ``step_N.damaged`` once an older one has loaded, so that retention (which only
ever deletes this class's own ``step_N`` directories, oldest first) never prefers them to good ones.
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from torch.distributed.checkpoint.api import CheckpointException

from lotus_dist.distributed.dcp_util import (async_save_state, load_sharded, merge_stored_bytes, nonfinite_count,
                                             nonfinite_names, save_state, sharded_state, stored_bytes)
from lotus_dist.errors import UserError, first_line
from lotus_dist.train.faults import maybe_crash
from lotus_dist.train.manifest import ManifestError, check_file, read_manifests, write_manifest

# DCP warns on every save/load without a process group; a single-process run is exactly that case.
# torch 2.6 words it without "disabled, "
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")

COMPLETE_MARKER = "COMPLETE"
TRAIN_STATE = "train_state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")  # the only directories this class ever deletes (and their .tmp)


class NonFiniteStateError(UserError):
    """The model or optimizer state holds NaN/inf: it is never saved."""


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
    """Saves, proves and finds the checkpoints of one run directory; every rank calls ``save``/``resume`` together.

    ``mode`` is the distribution mode (``rank``, ``world_size``, ``device``, ``barrier``,
    ``all_reduce_sum``, ``all_gather_object``).
    """

    def __init__(self, run_dir: str | Path, *, keep: int, mode, asynchronous: bool = False,
                 log: Callable[[str], None] = print):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.mode = mode
        self.rank, self.world_size = mode.rank, mode.world_size
        self.asynchronous = asynchronous
        self.log = log if mode.rank == 0 else (lambda line: None)
        self.pending = None  # (future, step, tmp dir, final dir) of an asynchronous save not yet committed
        self.async_group = None
        self._finisher = None  # one background thread: waits for DCP's writer, then checksums this rank's files
        if asynchronous and torch.distributed.is_available() and torch.distributed.is_initialized():
            # The writer thread's collectives get a group of their own (every rank creates it, in order).
            self.async_group = torch.distributed.new_group(backend="gloo")

    # ---- discovery -------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """This run's committed checkpoints (``step_NNNNNNNN`` with a COMPLETE marker), oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
                 and (p / COMPLETE_MARKER).exists()]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def remove_partial(self) -> None:
        """Delete the ``step_N.tmp`` directories of saves that never completed (rank 0; the others wait).
        Nothing else is touched: a folder the user made under checkpoints/ is theirs."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.is_dir() and p.name.endswith(".tmp") and STEP_DIR.match(p.name[:-4]):
                    shutil.rmtree(p, ignore_errors=True)
        self.mode.barrier()

    # ---- save ------------------------------------------------------------------------------------------------
    def save(self, step: int, model, optimizer, *, train_state: dict, data_state: dict) -> Path:
        """Check the state is finite, then write it (NonFiniteStateError, with nothing written, if it is not)."""
        self.wait()  # one save in flight at most; the previous one has normally finished long ago
        state = sharded_state(model, optimizer)
        self._refuse_nonfinite(state, step)
        data_text = json.dumps(data_state)  # a data position holds its shuffle buffer: megabytes, counted below
        need = self._refuse_full_disk(state, step, len(data_text))
        final = self.root / _step_dir_name(step)
        tmp = self.root / (_step_dir_name(step) + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.mode.barrier()
        try:
            if self.asynchronous:
                future, writer = async_save_state(str(tmp), state, process_group=self.async_group)
            else:
                written = save_state(str(tmp), state)
            own = self._write_rank_files(tmp, train_state, data_text)
        except (Exception, CheckpointException) as e:
            self._write_failed(e, tmp, step, need)
        if self.asynchronous:
            self._finisher = self._finisher or ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-manifest")
            done = self._finisher.submit(self._finish_async, future, writer, tmp, own)
            self.pending = (done, step, tmp, final, need)
        else:
            write_manifest(tmp, self.rank, self.world_size, written + own)
            self._commit(step, tmp, final)
        return final

    def _refuse_full_disk(self, state: dict, step: int, own_bytes: int) -> int:
        """Refuse (UserError, on every rank, nothing written) a save that the checkpoint filesystem cannot hold, as
        every rank sees it; returns the bytes the checkpoint needs. One gather: each rank's tensors, its own files'
        bytes (``own_bytes``: the data position) and the free space it sees."""
        per_rank = self.mode.all_gather_object((stored_bytes(state), own_bytes, _free_bytes(self.root)))
        need = merge_stored_bytes([b for b, _, _ in per_rank]) + sum(n for _, n, _ in per_rank)
        need += need // 100 + self.world_size * (1 << 20)  # DCP's metadata and framing, RNG states, manifests
        free, rank = min((f, r) for r, (_, _, f) in enumerate(per_rank))
        if free < need:
            raise UserError(self._no_space(step, need, free, rank))
        return need

    def _no_space(self, step: int, need: int, free: int, rank: int | None = None) -> str:
        latest = self.latest()
        where = f" (as rank {rank} sees it)" if rank is not None and self.world_size > 1 else ""
        kept = f"the last checkpoint {latest} is intact" if latest else "there is no checkpoint yet"
        return (f"no space left on device in {self.root}: checkpoint {_step_dir_name(step)} needs about {need:,} "
                f"bytes, {free:,} free{where}; it was not saved ({kept}). Free space there, or move run.dir, and run "
                f"again to resume")

    def _write_failed(self, error: BaseException, tmp: Path, step: int, need: int):
        """A write that failed: its partial directory is removed; a full disk (found only now, e.g. filled by
        another process) becomes one line, any other failure is raised as it is."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(error):
            raise UserError(self._no_space(step, need, _free_bytes(self.root))) from None
        raise error

    def _refuse_nonfinite(self, state: dict, step: int) -> None:
        bad = int(self.mode.all_reduce_sum(nonfinite_count(state, self.mode.device)).item())
        if not bad:
            return
        names = [n for per_rank in self.mode.all_gather_object(nonfinite_names(state)) for n in per_rank][:3]
        latest = self.latest()
        raise NonFiniteStateError(
            f"the model/optimizer state after step {step} holds non-finite values ({bad} tensor shard(s), e.g. "
            f"{', '.join(names)}): it was not saved; the last good checkpoint is "
            f"{latest if latest else 'none (no checkpoint yet)'}")

    def _write_rank_files(self, tmp: Path, train_state: dict, data_text: str) -> list[str]:
        names = [f"rank_{self.rank:05d}.json", f"rank_{self.rank:05d}_rng.pt"]
        (tmp / names[0]).write_text(data_text)
        torch.save(rng_state(), tmp / names[1])
        if self.rank == 0:
            (tmp / TRAIN_STATE).write_text(json.dumps({**train_state, "world_size": self.world_size}, indent=1))
            names.append(TRAIN_STATE)
        return names

    def _finish_async(self, future, writer, tmp: Path, own: list[str]) -> None:
        future.result()
        write_manifest(tmp, self.rank, self.world_size, writer.written + own)

    def writing(self) -> bool:
        """Whether this rank's asynchronous writer is still busy. The trainer sums this flag over the ranks in the
        step's one reduction and calls ``wait`` (the commit) once no rank is writing."""
        return self.pending is not None and not self.pending[0].done()

    def wait(self) -> None:
        """Finish and commit an asynchronous save (every rank calls it, at the same point of the loop)."""
        if self.pending is None:
            return
        done, step, tmp, final, need = self.pending
        self.pending = None
        try:
            done.result()
        except (Exception, CheckpointException) as e:
            self._write_failed(e, tmp, step, need)
        self._commit(step, tmp, final)

    def _commit(self, step: int, tmp: Path, final: Path) -> None:
        maybe_crash("in_save", self.rank, step)
        self.mode.barrier()  # every rank's files and manifest are written
        if self.rank == 0:
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step, "manifests": self.world_size}) + "\n")
            if (final / COMPLETE_MARKER).exists():
                shutil.rmtree(final)  # an older timeline's checkpoint of this step (the run resumed before it)
            elif final.exists():  # not a checkpoint of ours (no marker): keep it, out of the way
                self.log(f"moved the folder {final.name} (not a checkpoint: no {COMPLETE_MARKER} marker) to "
                         f"{_aside(final, '.displaced').name}")
            tmp.rename(final)
            for old in self.checkpoints()[:-self.keep]:  # ours only; the one just committed is the newest
                shutil.rmtree(old, ignore_errors=True)
        self.mode.barrier()

    # ---- prove and load ----------------------------------------------------------------------------------------
    def verify(self, path: Path) -> str | None:
        """Collective: None if every file of ``path`` matches its manifest, else what is wrong (the same text on
        every rank). Each rank checks every world_size-th file. A checkpoint written before manifests existed
        (its COMPLETE marker is not JSON) has nothing to check against and passes; its load is the only test."""
        problem = None
        try:
            marker = json.loads((path / COMPLETE_MARKER).read_text())
            files = read_manifests(path, int(marker["manifests"]))
        except (ValueError, TypeError, KeyError):
            files = {}  # an older marker ("step N"): no manifests
        except ManifestError as e:
            problem, files = str(e), {}
        except OSError as e:
            problem, files = f"{COMPLETE_MARKER} cannot be read ({e.strerror})", {}
        names = sorted(files)
        if self.rank == 0 and sum(files[n]["bytes"] for n in names) > (1 << 30):
            self.log(f"verifying {path.name}: {len(names)} files, "
                     f"{sum(files[n]['bytes'] for n in names) / 2**30:.1f} GiB over {self.world_size} rank(s)")
        for name in names[self.rank::self.world_size]:
            problem = problem or check_file(path, name, files[name])
            if problem:
                break
        return next((p for p in self.mode.all_gather_object(problem) if p), None)

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

    def resume(self, model, optimizer, check: Callable[[dict, Path], None]):
        """Collective: load the newest checkpoint that proves good; return (path, train_state, data_state), or
        None when there is no checkpoint. ``check(train_state, path)`` refuses (UserError) a checkpoint this run
        cannot continue; that stops the run rather than trying an older one. Raises UserError when checkpoints
        exist but none is good, naming each one's problem."""
        found = self.checkpoints()
        skipped: list[tuple[Path, str]] = []
        for path in reversed(found):
            problem = self.verify(path)
            if problem is None:
                try:
                    train_state = self.read_train_state(path)
                except (OSError, ValueError) as e:
                    train_state, problem = None, f"{TRAIN_STATE} is unreadable ({type(e).__name__})"
            if problem is None:
                check(train_state, path)
                problem, loaded = self._try_load(path, model, optimizer)
            if problem is None:
                self._set_aside([p for p, _ in skipped])
                return path, *loaded
            self.log(f"warning: skipping checkpoint {path.name}: {problem}")
            skipped.append((path, problem))
        if skipped:
            raise UserError(f"no usable checkpoint in {self.root}: "
                            + "; ".join(f"{p.name}: {why}" for p, why in skipped)
                            + "; move checkpoints/ away (or choose another run.dir) to start over")
        return None

    def _try_load(self, path: Path, model, optimizer) -> tuple[str | None, tuple | None]:
        """Load ``path``: (None, (train_state, data_state)), or the first failure on any rank as one line (the
        same on every rank) and None."""
        error, loaded = None, None
        try:
            loaded = self.load(path, model, optimizer)
        # damage that only loading reveals (legacy checkpoints, bad pickles, ...); DCP's CheckpointException is a
        # BaseException, not an Exception
        except (Exception, CheckpointException) as e:
            error = f"loading failed on rank {self.rank} ({_first_failure(e)})"
        error = next((e for e in self.mode.all_gather_object(error) if e), None)
        return error, (None if error else loaded)

    def _set_aside(self, damaged: list[Path]) -> None:
        """Rename skipped checkpoints to ``step_N.damaged`` (kept for inspection, never loaded or deleted)."""
        if self.rank == 0:
            for path in damaged:
                self.log(f"set aside the damaged checkpoint {path.name} as {_aside(path, '.damaged').name}")
        self.mode.barrier()


def _first_failure(error: BaseException) -> str:
    """``Type: first line`` of what went wrong; for DCP's CheckpointException, of the first rank's own failure."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        _, (inner, _) = min(failures.items(), key=lambda item: item[0])
        error = inner
    return first_line(error)


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``path``."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def _out_of_space(error: BaseException) -> bool:
    """Whether a failed write ran out of disk: ENOSPC anywhere in its chain, or its text (DCP reports each rank's
    failure as text; torch's zip writer says only "unexpected pos" when a write came up short)."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    return "No space left on device" in text or "unexpected pos" in text


def _aside(path: Path, suffix: str) -> Path:
    """Rename ``path`` to ``path + suffix`` (``suffix1``, ``suffix2``, ... if taken); return the new path."""
    target, n = path.with_name(path.name + suffix), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}{suffix}{n}"), n + 1
    return path.rename(target)


def check_compatible(saved: dict, expected: dict, path: Path) -> None:
    """Refuse a checkpoint written by another model or method, or with other state shapes or batch geometry
    (``expected["resume"]``: key -> value; keys a checkpoint did not record are not compared), naming what
    differs."""
    for key in ("model", "optim_method"):
        if saved.get(key) != expected.get(key):
            if key == "model":
                diff = [f"{k}: checkpoint {saved['model'].get(k)} vs run {v}" for k, v in expected["model"].items()
                        if saved.get("model", {}).get(k) != v]
                raise UserError(f"checkpoint {path} was written by another model ({'; '.join(diff)})")
            raise UserError(f"checkpoint {path} was written with optim method {saved.get(key)!r}, "
                            f"this run uses {expected.get(key)!r}")
    for key, value in expected.get("resume", {}).items():
        old = saved.get("resume", {}).get(key, value)
        if old != value:
            raise UserError(f"checkpoint {path} was written with {key}={old}, this run has {key}={value}: the "
                            f"optimizer state's shapes and the data position depend on it, so the run cannot "
                            f"continue; set {key}={old} again, or choose another run.dir")


def check_tokenizer(saved: dict, expected: dict, path: Path, *, allow_change: bool, name: str) -> None:
    """Refuse a checkpoint trained with another tokenizer (another model file: the same ids would mean other
    tokens, even at an equal vocabulary size) unless ``data.allow_tokenizer_change``; checkpoints written before
    the fingerprint was recorded are not compared."""
    old, new = saved.get("tokenizer"), expected.get("tokenizer")
    if old is None or old == new or allow_change:
        return
    raise UserError(f"checkpoint {path} was trained with another tokenizer (fingerprint {old}; data.tokenizer={name} "
                    f"has {new}): every embedding row would now mean another token; use the run's tokenizer again, "
                    f"or set data.allow_tokenizer_change=true if the change is deliberate")
