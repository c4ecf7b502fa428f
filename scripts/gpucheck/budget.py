"""The time budget of the check: every item gets min(its own limit, what is left of the budget minus a reserve for
the report); a subprocess that overruns is killed with its whole process tree, an in-process item is interrupted
by an alarm. Stdlib only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Optional

# What the end needs after the last item: the verdict, the report, the scratch folder removed, and the latency of
# an alarm (it fires between two Python bytecodes, so after the longest single kernel call, e.g. one svd).
RESERVE_S = 20.0


class Budget:
    """The deadline of the whole check, on an injectable clock (tests use a fake one)."""

    def __init__(self, seconds: float, *, start: Optional[float] = None, reserve: float = RESERVE_S,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.start = clock() if start is None else start
        self.seconds, self.reserve = seconds, min(reserve, seconds / 4)  # a tiny budget keeps most of itself
        self.deadline = self.start + seconds

    def left(self) -> float:
        """Seconds items may still use (the reserve excluded)."""
        return self.deadline - self.reserve - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def grant(self, needs: float, limit: float) -> Optional[float]:
        """The timeout of an item that needs about ``needs`` s and may take up to ``limit`` s: min(limit, left),
        or None when not even ``needs`` fits."""
        left = self.left()
        if left < needs or left <= 0:
            return None
        return min(limit, left)


class ItemTimeout(BaseException):
    """An in-process item ran past its time limit (a BaseException: no ``except Exception`` inside swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ItemTimeout in this (main) thread after ``seconds``. Where there is no SIGALRM timer or this is not the
    main thread, nothing interrupts the body (the budget's estimate alone bounds it)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise ItemTimeout()

    outer, began = signal.getitimer(signal.ITIMER_REAL)[0], time.monotonic()  # an alarm set by someone else
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        armed[0] = False  # first, with no call before it: an alarm still pending cannot cut the clean-up short
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer > 0:  # re-armed, late by at most this item
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - began), 1e-3))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere none are found and the process group kill must do)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids, group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``, its process group and every descendant, including those that left the group (a child in
    a session of its own). The tree is stopped first and collected again, so nothing forks away in between, and
    collected before any kill: an orphan is re-parented and no longer found under ``proc``."""
    stopped = [proc.pid, *descendants(proc.pid)]
    _signal_all(stopped, proc.pid, signal.SIGSTOP)
    victims = set(stopped) | set(descendants(proc.pid))
    _signal_all(victims, proc.pid, signal.SIGKILL)
    proc.wait()
    gone_by = time.monotonic() + 10  # a kill is delivered at once but takes effect later: wait until it has
    while any(_running(pid) for pid in victims) and time.monotonic() < gone_by:
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its new parent to reap it does not; without /proc: unknown,
    so no)."""
    try:
        return Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def run_command(cmd: list[str], *, cwd: Path, env: dict, timeout: float, log: Path) -> tuple[Optional[int], str]:
    """Run ``cmd`` with its output in ``log``, for at most ``timeout`` s: (exit code, or None when it timed out and
    its tree was killed; the log's last lines)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout, 1e-3))
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = None
        except BaseException:  # interrupted (Ctrl-C): leave nothing behind
            kill_tree(proc)
            raise
    text = log.read_text(errors="replace")
    return rc, text[-3000:] if rc != 0 else text[-400:]
