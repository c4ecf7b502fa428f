"""Failures under torchrun (gloo, 2 ranks): crash-exact resume, a kill during a checkpoint write, elastic restart,
graceful stop on SIGTERM, and input errors reported identically by every rank."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from lotus_dist.train.metrics import read_metrics
from pretrain_launch import SMALL, launch, start

STEPS = 12
KEYS = ("step", "loss", "lr", "tokens", "val_loss", "grad_norm", "switches", "optimizer_state_bytes")


def args_for(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMALL, f"train.steps={STEPS}", "train.eval_every=6", "checkpoint.every=4", "optim.gamma=0.1",
            "optim.verify_gap=3", f"run.dir={run_dir}", f"data.cache_dir={cache}", *extra]


def trajectory(run_dir: Path) -> list[dict]:
    return [{k: line[k] for k in KEYS if k in line} for line in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    work = tmp_path_factory.mktemp("resilience")
    launch(2, args_for(work / "straight", work / "cache"))
    straight = trajectory(work / "straight")
    assert [l["step"] for l in straight] == list(range(1, STEPS + 1))
    return work, straight


@pytest.mark.parametrize("asynchronous", [False, True])
def test_sigkill_of_one_rank_then_restart_is_bitwise_exact(baseline, asynchronous):
    work, straight = baseline
    name = "killed_async" if asynchronous else "killed"
    args = args_for(work / name, work / "cache", f"checkpoint.async_save={str(asynchronous).lower()}")
    proc = launch(2, args, env={"LOTUS_FAULT": "after_step:rank=1:step=6"}, check=False)
    assert proc.returncode != 0
    assert (work / name / "checkpoints/step_00000004/COMPLETE").exists()
    assert not (work / name / "checkpoints/step_00000008").exists()
    again = launch(2, args)
    assert "resumed from" in again.stdout and "step_00000004" in again.stdout
    assert trajectory(work / name) == straight


def test_kill_during_checkpoint_write_never_loads_the_partial_one(baseline):
    work, straight = baseline
    args = args_for(work / "torn", work / "cache")
    proc = launch(2, args, env={"LOTUS_FAULT": "in_save:rank=1:step=8"}, check=False)
    assert proc.returncode != 0
    ckpts = work / "torn/checkpoints"
    assert (ckpts / "step_00000008.tmp").is_dir() and not (ckpts / "step_00000008").exists()
    again = launch(2, args)
    assert "step_00000004" in again.stdout, again.stdout
    assert not (ckpts / "step_00000008.tmp").exists()
    assert trajectory(work / "torn") == straight


def test_elastic_restart_continues_without_a_human(baseline):
    work, straight = baseline
    proc = launch(2, args_for(work / "elastic", work / "cache"), env={"LOTUS_FAULT": "after_step:rank=1:step=6"},
                  max_restarts=1)
    assert proc.returncode == 0
    assert "resumed from" in proc.stdout
    assert trajectory(work / "elastic") == straight


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(l["step"] >= step for l in read_metrics(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.1)
    raise AssertionError("training did not reach step {step}")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("nproc", [0, 2])
def test_sigterm_saves_at_the_next_step_boundary_and_exits_0(tmp_path, nproc):
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.steps=500", "train.eval_every=0", "checkpoint.every=0", f"run.dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    proc = start(nproc, args)
    _wait_for_step(run_dir, 3, proc)
    # The training processes get SIGTERM, as from a scheduler's pre-emption notice. (Signalling torchrun's agent
    # instead also saves, but torchelastic then exits 1 by design: README "Failures and resume".)
    for pid in [proc.pid] if nproc == 0 else _children(proc.pid):
        os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    last = max(l["step"] for l in read_metrics(run_dir))
    saved = run_dir / f"checkpoints/step_{last:08d}"
    assert (saved / "COMPLETE").exists(), (last, list((run_dir / "checkpoints").iterdir()))
    assert last < 500 and "SIGTERM" in out


@pytest.mark.parametrize("bad, needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("data.tokenizer=/nonexistent/tok.model", "/nonexistent/tok.model"),
])
def test_bad_input_under_torchrun_every_rank_same_line(tmp_path, bad, needle):
    proc = launch(2, [*SMALL, f"run.dir={tmp_path}", bad], check=False, timeout=120)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1 and needle in errors[0], proc.stderr[-3000:]
