"""Run ``pretrain.py`` the way users do: alone, or under ``torchrun`` on gloo, as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dist_spawn import free_port
from process_watch import communicate
from lotus_dist.train.config import merge_overrides
from pretrain_runs import SMALL as SMALL_ONE_PROCESS

REPO = Path(__file__).resolve().parents[2]

# The tests' SMALL (tests/pretrain_runs.py), shared by every launch of the tests: micro-batches of 2, so that 2 ranks
# still accumulate 2 of them per step, and the global split (world-size-invariant batches, one process = N ranks).
SMALL = merge_overrides(SMALL_ONE_PROCESS, ["train.micro_batch_size=2", "data.split=global"])


def env_for(extra: dict | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env.pop("LOTUS_FAULT", None)
    env.update(extra or {})
    return env


def command(nproc: int, args: list[str], max_restarts: int = 0, config: str = "configs/tiny.yaml",
            entry: Path = REPO / "pretrain.py") -> list[str]:
    """``entry``: pretrain.py, or a test script that takes the same arguments."""
    script = [str(entry), "--config", str(REPO / config), *merge_overrides(args)]
    if nproc == 0:  # a plain process, no torchrun
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--max-restarts={max_restarts}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.2", *script]


def launch(nproc: int, args: list[str], *, env: dict | None = None, max_restarts: int = 0, check: bool = True,
           config: str = "configs/tiny.yaml", entry: Path = REPO / "pretrain.py") -> subprocess.CompletedProcess:
    """Run to the end; a hang (no CPU used by the job, see process_watch) kills it, whatever the machine's load."""
    cmd = command(nproc, args, max_restarts, config, entry)
    # Its own session, so that a hang kills torchrun's workers too, not only the agent.
    with subprocess.Popen(cmd, cwd=REPO, env=env_for(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        out, err = communicate(popen)
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def start(nproc: int, args: list[str], *, env: dict | None = None) -> subprocess.Popen:
    """Start without waiting, in its own session so a signal can reach the whole job as a scheduler's would."""
    return subprocess.Popen(command(nproc, args), cwd=REPO, env=env_for(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def concurrently(*jobs, at_once: int = 2) -> list:
    """Run independent jobs (zero-argument callables: a launch, or launches one after another in one run
    directory) side by side, ``at_once`` at a time; their results in order, or the first job's error. A launch
    leaves a 2-core machine's cores idle for much of its time (one process importing torch, ranks waiting in
    collectives, a plain process on one core): two at a time fill them. Jobs must not share a run directory (a
    data.cache_dir they may share: its build is atomic)."""
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [f.result() for f in futures]
