"""Launch N gloo worker processes the way torchrun does (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in the env).

Subprocesses of a script file rather than ``mp.spawn`` of test functions: pytest runs with
``--import-mode=importlib``, so test modules are not importable by name in a child. One failing rank kills the
others (they would otherwise wait in a collective until gloo's 30-minute timeout); ranks that hang are found by
their CPU use, not by a guessed time (``process_watch``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from process_watch import ProgressWatch

REPO = Path(__file__).resolve().parents[2]
WORKERS = Path(__file__).resolve().parent / "dist_workers.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(world_size: int, options: dict, workdir: Path) -> dict:
    """Run ``dist_workers.py`` on ``world_size`` ranks with ``options``; return rank 0's result dict. Fails at once
    when a rank fails, and when the ranks hang (``process_watch``), however slow the machine."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = options.get("tag", "run")
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
            OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        )
        log_path = workdir / f"{tag}.rank{rank}.log"
        logs.append(log_path)
        with open(log_path, "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKERS), json.dumps(options), str(workdir)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            ))
    watch = ProgressWatch([p.pid for p in procs])
    failed, gave_up = None, None
    while any(p.poll() is None for p in procs):
        failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
        gave_up = watch.why_give_up()
        if failed is not None or gave_up:
            break
        time.sleep(0.2)
    if failed is None:
        failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if failed is not None or gave_up:
        rank = failed if failed is not None else 0
        why = f"rank {rank} exited with {procs[rank].returncode}" if failed is not None else gave_up
        raise AssertionError(f"{tag} at world {world_size}: {why}\n{logs[rank].read_text()[-6000:]}")
    return json.loads((workdir / f"{tag}.result.json").read_text())
