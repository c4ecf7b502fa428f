"""Wait for launched processes by their progress, not by a guessed time.

A wall-clock timeout that fits an idle machine fails on a loaded one (a shared CI box at load 8 on 2 cores runs each
process at a quarter speed), and one that fits the loaded one hides a hang for as long. A hang here means ranks that
wait for each other in a collective or a rendezvous: they sleep. So a job is declared hung when **no process of its
tree** (the launched processes and their live descendants: torchrun's workers, a compiler DeepSpeed starts) has used
any CPU for ``STALL_S`` seconds; a loaded machine still gives every runnable process some CPU every second. The
ceiling only bounds a job that spins without end. Where /proc is missing (not Linux) the ceiling is the only limit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

STALL_S = 120.0  # no CPU used by any process of the job for this long: it waits for something that will not come
CEILING_S = 1800.0  # gloo's default collective timeout: no launch in the tests legitimately runs longer
_PROC = Path("/proc")
_CPU_CHECK_S = 2.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in clock ticks) of a live process, None if it is gone."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu_ticks(roots: list[int]) -> dict[int, int]:
    """CPU ticks used so far by each live process of the trees under ``roots`` (Linux /proc)."""
    stats = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [p for p in roots if p in stats]
    while todo:
        pid = todo.pop()
        out[pid] = stats[pid][1]
        todo += children.get(pid, [])
    return out


class ProgressWatch:
    """Tells, when asked, whether the process trees under ``roots`` are hung or past the ceiling."""

    def __init__(self, roots: list[int], stall_s: float = STALL_S, ceiling_s: float = CEILING_S):
        self.roots, self.stall_s, self.ceiling_s = roots, stall_s, ceiling_s
        self.start = self.last_progress = self.last_check = time.monotonic()
        self.can_see = _PROC.is_dir()
        self.ticks = tree_cpu_ticks(roots) if self.can_see else {}

    def why_give_up(self) -> str | None:
        now = time.monotonic()
        if now - self.start > self.ceiling_s:
            return f"still running after the {self.ceiling_s:.0f} s ceiling"
        if self.can_see and now - self.last_check >= _CPU_CHECK_S:
            self.last_check = now
            ticks = tree_cpu_ticks(self.roots)
            if ticks != self.ticks:  # CPU used, or a process started or ended: progress
                self.ticks, self.last_progress = ticks, now
            elif now - self.last_progress > self.stall_s:
                return f"hung: no process of the job used any CPU for {self.stall_s:.0f} s"
        return None


def communicate(popen: subprocess.Popen, *, stall_s: float = STALL_S, ceiling_s: float = CEILING_S) -> tuple[str, str]:
    """``popen.communicate()`` (stdout/stderr pipes drained by a thread) that kills the popen's session and raises
    when the job hangs or passes the ceiling. ``popen`` must have been started with ``start_new_session=True``."""
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(zip(("out", "err"), popen.communicate())), daemon=True)
    reader.start()
    watch = ProgressWatch([popen.pid], stall_s, ceiling_s)
    why = None
    while reader.is_alive():
        why = watch.why_give_up()
        if why:
            break
        reader.join(0.2)
    if why:
        os.killpg(popen.pid, signal.SIGKILL)
        reader.join()
        raise AssertionError(f"{why}\n{(result.get('out') or '')[-3000:]}\n{(result.get('err') or '')[-6000:]}")
    return result["out"], result["err"]


def kill_session(popen: subprocess.Popen) -> tuple[str, str]:
    """Kill a job started with ``start_new_session=True`` (torchrun's workers too) and return its output."""
    os.killpg(popen.pid, signal.SIGKILL)
    return popen.communicate()
