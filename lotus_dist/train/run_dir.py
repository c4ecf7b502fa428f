"""The run directory: created and locked before any work, and its ``config.yaml`` with a history of what changed.

One run at a time: rank 0 holds an exclusive ``flock`` on ``run.lock`` for the whole run, so a second run on the
same ``run.dir`` is refused with one line naming the holder. The kernel drops the lock when its process dies (a
crash, SIGKILL, an elastic restart), so a stale lock is simply taken over. On filesystems without ``flock`` the
holder written in the file decides: a live process on this host keeps it, anything else is taken over.

``config.yaml`` is the resolved config of the latest start. When a run resumes with changed keys (a longer
``train.steps``, a new learning rate), the change is appended to the history kept as comments at its end, so the
file stays loadable with ``--config`` and still tells how the run got where it is.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

import yaml

from lotus_dist.errors import UserError

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
HISTORY_HEADER = "# History: keys changed when this run resumed (the lines below are comments; --config ignores them)"
HISTORY_LINE = "# - "


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _holder_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def _alive_here(fd: int) -> bool:
    """Whether the holder written in the lock file is a live process on this host (no-flock filesystems)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode() or "{}")
        if holder.get("host") != socket.gethostname() or holder.get("pid") == os.getpid():
            return False
        os.kill(int(holder["pid"]), 0)
        return True
    except PermissionError:
        return True  # exists, owned by another user
    except (OSError, ValueError, KeyError, TypeError):
        return False


def acquire_lock(run_dir: Path) -> int:
    """Lock ``run_dir`` for this process; returns the lock's file descriptor. UserError if another run has it."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(fd)
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by another run ({holder}); wait for it to end or "
                        f"choose another run.dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        if _alive_here(fd):  # no flock here: trust the holder's pid
            holder = _holder_text(fd)
            os.close(fd)
            raise UserError(f"run directory {run_dir} is in use by another run ({holder}); wait for it to end or "
                            f"choose another run.dir") from None
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()})
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


class RunDirectory:
    """``run.dir``, created and locked by rank 0 (``open`` is collective: every rank raises the same UserError)."""

    def __init__(self, path: Path, lock_fd: int | None):
        self.path = path
        self._lock_fd = lock_fd

    @classmethod
    def open(cls, path: str | Path, mode) -> "RunDirectory":
        path = Path(path)
        problem, fd = None, None
        if mode.rank == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
                fd = acquire_lock(path)
            except FileExistsError:
                problem = f"run.dir {path} cannot be created: a file of that name is in the way"
            except OSError as e:
                where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
                problem = f"run.dir {path} cannot be created or written: {e.strerror}{where}"
            except UserError as e:
                problem = str(e)
        problem = mode.all_gather_object(problem)[0]
        if problem:
            if fd is not None:
                os.close(fd)
            raise UserError(problem)
        return cls(path, fd)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock; the file stays (see module doc)
            self._lock_fd = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def write_config(self, config: dict, resumed_step: int | None) -> None:
        """Write ``config.yaml`` (rank 0). On a resume, keys that differ from the previous ``config.yaml`` are
        appended to its history; a fresh start begins a new history."""
        target = self.path / CONFIG_FILE
        history: list[str] = []
        if resumed_step is not None and target.exists():
            old_text = target.read_text()
            history = [line for line in old_text.splitlines() if line.startswith(HISTORY_LINE)]
            try:
                old = yaml.safe_load(old_text) or {}
            except yaml.YAMLError:
                old = {}
            changes = [f"{key} {old_value!r} -> {new_value!r}" for key, old_value, new_value in
                       config_changes(old, config)]
            if changes:
                history.append(f"{HISTORY_LINE}resumed at step {resumed_step} on {_now()}: {'; '.join(changes)}")
        text = yaml.safe_dump(config, sort_keys=False)
        if history:
            text += "\n" + HISTORY_HEADER + "\n" + "\n".join(history) + "\n"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every key whose value differs, in the new config's order."""
    before, after = _flatten(old), _flatten(new)
    return [(k, before.get(k), v) for k, v in after.items() if before.get(k) != v]


__all__ = ["CONFIG_FILE", "LOCK_FILE", "RunDirectory", "acquire_lock", "config_changes"]
