"""Failures under torchrun (gloo, 2 ranks) and of plain processes: crash-exact resume, a kill during a checkpoint
write, a kill at any step, elastic restart, a damaged shard of one rank, a NaN weight on one rank, graceful stop
on SIGTERM and SIGINT, and input errors reported identically by every rank."""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path

import pytest

from lotus_dist.train.faults import flip_bit
from lotus_dist.train.metrics import read_metrics
from pretrain_launch import SMALL, concurrently, launch, start
from pretrain_runs import trajectory
from process_watch import ProgressWatch, communicate, kill_session

pytestmark = pytest.mark.slow  # torchrun runs, killed and restarted

STEPS = 12


def args_for(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*SMALL, f"train.steps={STEPS}", "train.eval_every=6", "checkpoint.every=4", "optim.gamma=0.1",
            "optim.verify_gap=3", f"run.dir={run_dir}", f"data.cache_dir={cache}", *extra]


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
    # A synchronous save of step 4 is committed before step 5; an asynchronous one at the first step boundary where
    # every rank's writer (and checksums) are done, which on a loaded machine may come after the kill at step 6.
    committed = (work / name / "checkpoints/step_00000004/COMPLETE").exists()
    assert committed or asynchronous
    assert not (work / name / "checkpoints/step_00000008").exists()
    again = launch(2, args)
    assert ("resumed from" in again.stdout and "step_00000004" in again.stdout) == committed, again.stdout
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


def test_a_damaged_shard_of_rank_1_falls_back_to_the_previous_checkpoint(baseline):
    work, straight = baseline
    run_dir = work / "damaged"
    launch(2, args_for(run_dir, work / "cache", "train.stop_at=8"))
    flip_bit(run_dir / "checkpoints/step_00000008/__1_0.distcp", 1 / 3)  # written (and checksummed) by rank 1
    again = launch(2, args_for(run_dir, work / "cache"))
    warnings = [l for l in again.stdout.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and "step_00000008" in warnings[0] and "__1_0.distcp" in warnings[0], again.stdout
    assert "resumed from" in again.stdout and "step_00000004" in again.stdout
    assert trajectory(run_dir) == straight


def test_a_nan_weight_on_one_rank_is_refused_by_every_rank(baseline):
    work, _ = baseline
    run_dir = work / "nan_weight"
    proc = launch(2, args_for(run_dir, work / "cache"), env={"LOTUS_FAULT": "nan_weight:rank=1:step=5"}, check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "non-finite" in errors[0] and "not saved" in errors[0] and "step_00000004" in errors[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000004"]


def test_metrics_have_no_duplicate_steps_after_a_sigkill_at_any_step(tmp_path):
    """A plain process killed right after each step in turn (before, at and after its first checkpoint), then
    started again: the metrics are those of the run that never stopped, each step once."""
    args = [*SMALL, "train.steps=6", "train.eval_every=3", "checkpoint.every=4", f"data.cache_dir={tmp_path / 'c'}"]

    def killed_then_restarted(step: int) -> list[dict]:
        run_dir = tmp_path / f"killed_{step}"
        killed = launch(0, args + [f"run.dir={run_dir}"], env={"LOTUS_FAULT": f"after_step:rank=0:step={step}"},
                        check=False)
        assert killed.returncode == -signal.SIGKILL, step
        launch(0, args + [f"run.dir={run_dir}"])
        return trajectory(run_dir)

    # Plain processes on one core each: the straight run and the six kill-and-restart pairs two at a time.
    _, *restarted = concurrently(lambda: launch(0, args + [f"run.dir={tmp_path / 'straight'}"]),
                                 *(functools.partial(killed_then_restarted, step) for step in range(1, 7)))
    straight = trajectory(tmp_path / "straight")
    for step, got in enumerate(restarted, start=1):
        assert got == straight, step


def _wait_for_step(run_dir: Path, step: int, proc) -> None:
    watch = ProgressWatch([proc.pid])
    while not any(l["step"] >= step for l in read_metrics(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {communicate(proc)[1][-3000:]}")
        if why := watch.why_give_up():
            raise AssertionError(f"training did not reach step {step}: {why}\n{kill_session(proc)[1][-3000:]}")
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.parametrize("nproc, sig", [(0, signal.SIGTERM), (2, signal.SIGTERM), (0, signal.SIGINT)])
def test_sigterm_and_sigint_save_at_the_next_step_boundary_and_exit_0(tmp_path, nproc, sig):
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.steps=500", "train.eval_every=0", "checkpoint.every=0", f"run.dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    proc = start(nproc, args)
    _wait_for_step(run_dir, 3, proc)
    # The training processes get the signal, as from a scheduler's pre-emption notice or Ctrl-C. (Signalling
    # torchrun's agent instead also saves, but torchelastic then exits non-zero by design: see the next test.)
    for pid in [proc.pid] if nproc == 0 else _children(proc.pid):
        os.kill(pid, sig)
    out, err = communicate(proc)
    assert proc.returncode == 0, err[-3000:]
    last = max(l["step"] for l in read_metrics(run_dir))
    saved = run_dir / f"checkpoints/step_{last:08d}"
    assert (saved / "COMPLETE").exists(), (last, list((run_dir / "checkpoints").iterdir()))
    assert last < 500 and f"{sig.name} received" in out


def test_ctrl_c_on_torchrun_saves_on_every_rank(tmp_path):
    """Ctrl-C reaches torchrun's agent (the workers run in sessions of their own); it forwards SIGINT to each
    worker, which finishes its step and saves before the agent's shutdown timeout."""
    run_dir = tmp_path / "run"
    args = [*SMALL, "train.steps=500", "train.eval_every=0", "checkpoint.every=0", f"run.dir={run_dir}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    proc = start(2, args)
    _wait_for_step(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = communicate(proc)
    last = max(l["step"] for l in read_metrics(run_dir))
    assert (run_dir / f"checkpoints/step_{last:08d}/COMPLETE").exists(), err[-3000:]
    assert "SIGINT received" in out


@pytest.mark.parametrize("bad, needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("data.tokenizer=/nonexistent/tok.model", "/nonexistent/tok.model"),
    ("run.dir={tmp}/a_file/run", "cannot be created"),
])
def test_bad_input_under_torchrun_every_rank_same_line(tmp_path, bad, needle):
    (tmp_path / "a_file").write_text("in the way of run.dir")
    proc = launch(2, [*SMALL, f"run.dir={tmp_path}", bad.format(tmp=tmp_path)], check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1 and needle in errors[0], proc.stderr[-3000:]
