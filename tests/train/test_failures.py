"""Nothing lost, nothing corrupt (one process, in-process runs): only finite states become checkpoints, damaged
checkpoints are skipped for the newest good one, user folders survive, metrics follow the resumed trajectory,
skipping gives up, the run directory is locked, and bad values stop the run in one line before any work."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lotus_dist.train.cli import main
from lotus_dist.train.faults import flip_bit
from lotus_dist.train.metrics import read_metrics

from pretrain_runs import REPO, one_error_line, run, step_dirs, trajectory  # tests/ is on sys.path (pyproject's pythonpath)

pytestmark = pytest.mark.slow  # trains for a while, and real pretrain.py processes


# ---- only finite states are saved ----------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_weight_never_becomes_a_checkpoint_and_the_last_good_one_survives(tmp_path, small_overrides, capsys,
                                                                                 monkeypatch, policy):
    args = small_overrides + ["train.steps=8", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=1",
                              f"train.on_nonfinite={policy}", f"run.dir={tmp_path}"]
    monkeypatch.setenv("LOTUS_FAULT", "nan_weight:rank=0:step=5")  # the loss stays finite: only the state is bad
    assert run(args) == 2
    err = one_error_line(capsys)
    assert "non-finite" in err and "step_00000004" in err and "not saved" in err
    assert step_dirs(tmp_path) == ["step_00000004"]  # retention (keep=1) kept the last good one
    # The last good checkpoint resumes cleanly to the end.
    monkeypatch.delenv("LOTUS_FAULT")
    assert run(args) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [l["step"] for l in read_metrics(tmp_path)] == list(range(1, 9))


# ---- damaged checkpoints fall back to the newest good one ----------------------------------------------------------

BASE = ["train.steps=12", "train.eval_every=6", "checkpoint.every=4", "checkpoint.keep=3", "optim.gamma=0.1",
        "optim.verify_gap=3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_args):
    """One uninterrupted run (asynchronous saves: their manifests are written by the background writer) with
    checkpoints at steps 4, 8 and 12."""
    work = tmp_path_factory.mktemp("damaged")
    args = [*small_args, *BASE, f"data.cache_dir={work / 'cache'}", "checkpoint.async_save=true"]
    assert run(args + [f"run.dir={work / 'straight'}"]) == 0
    assert step_dirs(work / "straight") == ["step_00000004", "step_00000008", "step_00000012"]
    return work, args


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


DAMAGE = {
    "bit-flipped shard": ("__0_0.distcp", flip_bit),
    "truncated shard": ("__0_0.distcp", truncate),
    "deleted shard": ("__0_0.distcp", Path.unlink),
    "deleted .metadata": (".metadata", Path.unlink),
    "empty train_state.json": ("train_state.json", lambda p: p.write_text("")),
    "bit-flipped data position": ("rank_00000.json", flip_bit),
    "deleted manifest": ("manifest_rank_00000.json", Path.unlink),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, capsys, damage):
    work, args = straight
    run_dir = tmp_path / "run"
    shutil.copytree(work / "straight", run_dir)
    name, harm = DAMAGE[damage]
    harm(run_dir / "checkpoints/step_00000012" / name)
    capsys.readouterr()
    assert run(args + [f"run.dir={run_dir}", "checkpoint.async_save=false"]) == 0
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and "step_00000012" in warnings[0] and name in warnings[0], out
    assert "resumed from" in out and "step_00000008" in out
    # The resumed run re-did steps 9-12 exactly as the uninterrupted one; the damaged checkpoint is kept aside.
    assert trajectory(run_dir) == trajectory(work / "straight")
    assert step_dirs(run_dir) == ["step_00000004", "step_00000008", "step_00000012", "step_00000012.damaged"]


def test_when_no_checkpoint_is_good_one_line_names_each(straight, tmp_path, capsys):
    work, args = straight
    run_dir = tmp_path / "run"
    shutil.copytree(work / "straight", run_dir)
    for step in (4, 8, 12):
        flip_bit(run_dir / f"checkpoints/step_{step:08d}/__0_0.distcp")
    assert run(args + [f"run.dir={run_dir}"]) == 2
    err = one_error_line(capsys)
    assert "no usable checkpoint" in err and all(f"step_{s:08d}" in err for s in (4, 8, 12))
    assert step_dirs(run_dir) == ["step_00000004", "step_00000008", "step_00000012"]  # nothing renamed or deleted


def test_a_legacy_checkpoint_without_manifest_still_resumes(straight, tmp_path, capsys):
    """Checkpoints written before manifests existed (marker "step N") load without verification."""
    work, args = straight
    run_dir = tmp_path / "run"
    shutil.copytree(work / "straight", run_dir)
    for step in (4, 8):
        shutil.rmtree(run_dir / f"checkpoints/step_{step:08d}")
    last = run_dir / "checkpoints/step_00000012"
    (last / "manifest_rank_00000.json").unlink()
    (last / "COMPLETE").write_text("step 12\n")
    assert run(args + [f"run.dir={run_dir}", "train.steps=14"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [l["step"] for l in read_metrics(run_dir)] == list(range(1, 15))


def test_a_truncated_legacy_checkpoint_falls_back_to_the_older_one(straight, tmp_path, capsys):
    """Without a manifest only loading finds the damage, and DCP raises it as CheckpointException, a
    BaseException: the fallback must still catch it and load the older checkpoint."""
    work, args = straight
    run_dir = tmp_path / "run"
    shutil.copytree(work / "straight", run_dir)
    last = run_dir / "checkpoints/step_00000012"
    (last / "manifest_rank_00000.json").unlink()
    (last / "COMPLETE").write_text("step 12\n")
    truncate(last / "__0_0.distcp")
    capsys.readouterr()
    assert run(args + [f"run.dir={run_dir}", "checkpoint.async_save=false"]) == 0
    out = capsys.readouterr().out
    warnings = [l for l in out.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and "step_00000012" in warnings[0] and "loading failed" in warnings[0], out
    assert "resumed from" in out and "step_00000008" in out
    assert trajectory(run_dir) == trajectory(work / "straight")


# ---- user data, retention, metrics ---------------------------------------------------------------------------------

def test_folders_the_user_made_survive_start_up_retention_and_refusal(tmp_path, small_overrides, capsys):
    mine = tmp_path / "checkpoints/my_best"
    mine.mkdir(parents=True)
    (mine / "weights.pt").write_text("mine")
    odd = tmp_path / "checkpoints/step_00000004"  # our naming, but no COMPLETE marker: not ours to delete either
    odd.mkdir()
    (odd / "notes.txt").write_text("mine too")
    args = small_overrides + ["train.steps=6", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=1",
                              f"run.dir={tmp_path}"]
    assert run(args) == 0
    assert step_dirs(tmp_path) == ["my_best", "step_00000004.displaced", "step_00000006"]
    assert (tmp_path / "checkpoints/step_00000004.displaced/notes.txt").read_text() == "mine too"
    torn = tmp_path / "checkpoints/step_00000008.tmp"  # a save that never completed: ours, removed on a resume
    torn.mkdir()
    capsys.readouterr()
    assert run(args + ["checkpoint.resume=false"]) == 2
    assert "checkpoint.resume=false" in one_error_line(capsys)
    assert torn.exists() and (mine / "weights.pt").read_text() == "mine"  # the refusal touched nothing
    assert run(args + ["train.steps=8"]) == 0
    assert step_dirs(tmp_path) == ["my_best", "step_00000004.displaced", "step_00000008"]


def test_a_fresh_start_over_old_metrics_drops_them(tmp_path, small_overrides):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    assert run(small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]) == 0
    lines = read_metrics(tmp_path)
    assert [l["step"] for l in lines] == [1, 2] and all(l["loss"] != 9.0 for l in lines)


# ---- skipping gives up -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limits, needle", [
    (["train.max_skipped=3", "train.max_skipped_fraction=1"], "3 steps in a row"),
    (["train.max_skipped=100", "train.max_skipped_fraction=0.1"], "more than train.max_skipped_fraction=0.1"),
])
def test_skip_gives_up_past_its_limit_and_saves(tmp_path, small_overrides, capsys, monkeypatch, limits, needle):
    monkeypatch.setenv("LOTUS_FAULT", "nan_grad:rank=0:step=3-99")  # every step from 3 on overflows
    args = small_overrides + ["train.steps=20", "train.eval_every=0", "checkpoint.every=0", "train.on_nonfinite=skip",
                              f"run.dir={tmp_path}", *limits]
    assert run(args) == 2
    err = one_error_line(capsys)
    assert "gives up" in err and needle in err and "saved step 5" in err
    assert (tmp_path / "checkpoints/step_00000005/COMPLETE").exists()
    lines = read_metrics(tmp_path)  # strict JSON: the NaN gradient norms are null
    assert [l["grad_norm"] for l in lines if l.get("skipped")] == [None, None, None]  # steps 3-5, all logged


# ---- one run per directory ---------------------------------------------------------------------------------------------

def test_a_second_run_on_a_locked_directory_is_refused_and_a_stale_lock_is_taken_over(tmp_path, small_overrides,
                                                                                          capsys):
    args = small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]
    holder = {"pid": 4242, "host": "node7", "since": "2026-11-30 00:00:00 UTC"}
    (tmp_path / "run.lock").write_text(json.dumps(holder))
    with open(tmp_path / "run.lock") as held:  # a live run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(args) == 2
        err = one_error_line(capsys)
        assert "in use by another run (pid 4242 on node7" in err
    assert not (tmp_path / "checkpoints").exists()  # refused before any work
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({**holder, "pid": dead.pid}))  # its holder died: stale
    assert run(args) == 0
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


# ---- resuming with changed keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, old, new", [
    ("optim.rank=4", "optim.rank=8", "optim.rank=4"),
    ("train.batch_size=16", "train.batch_size=8", "train.batch_size=16"),
    ("train.seq_len=64", "train.seq_len=32", "train.seq_len=64"),
])
def test_resuming_with_changed_shapes_is_refused_naming_both_values(tmp_path, small_overrides, capsys, change, old,
                                                                      new):
    args = small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]
    assert run(args) == 0
    capsys.readouterr()
    assert run(args + ["train.steps=4", change]) == 2
    err = one_error_line(capsys)
    assert old in err and new in err and "step_00000002" in err


def test_resuming_with_a_longer_schedule_is_recorded_in_the_config_history(tmp_path, small_overrides):
    args = small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]
    assert run(args) == 0
    assert run(args + ["train.steps=4", "optim.lr=0.005"]) == 0
    text = (tmp_path / "config.yaml").read_text()
    history = [l for l in text.splitlines() if l.startswith("# - ")]
    assert len(history) == 1 and "resumed at step 2" in history[0]
    assert "train.steps 2 -> 4" in history[0] and "optim.lr 0.01 -> 0.005" in history[0]
    assert run(args + ["train.steps=6", "optim.lr=0.005"]) == 0  # the history grows; config.yaml stays loadable
    from lotus_dist.train.config import load_config

    assert load_config(tmp_path / "config.yaml").train.steps == 6
    assert len([l for l in (tmp_path / "config.yaml").read_text().splitlines() if l.startswith("# - ")]) == 2


# ---- bad values: one line, exit 2, before any work ----------------------------------------------------------------------

BAD_VALUES = [
    ("optim.name=lion", "'optim.name': unknown method 'lion'"),
    ("model.name=llama_3b", "unknown model.name 'llama_3b'"),
    ("optim.lr=-0.01", "'optim.lr' must be >= 0"),
    ("optim.lr=.nan", "'optim.lr': expected a finite number"),
    ("optim.betas=[0.9]", "'optim.betas' must be two numbers in [0, 1)"),
    ("optim.betas=[0.9, 1.5]", "'optim.betas' must be two numbers in [0, 1)"),
    ("log.every=0", "'log.every' must be >= 1"),
    ("data.val_tokens=0", "'data.val_tokens' (0) must be at least train.seq_len"),
    ("checkpoint.every=-1", "'checkpoint.every' must be >= 0"),
    ("train.eval_every=-1", "'train.eval_every' must be >= 0"),
    ("train.stop_at=0", "'train.stop_at' must be >= 1"),
    ("train.stop_at=-3", "'train.stop_at' must be >= 1"),
    ("dist.replicate=3", "dist.replicate=3 (HSDP) needs dist.mode=fsdp"),
    ("data.shuffle_buffer=-5", "'data.shuffle_buffer' must be >= 0"),
    ("optim.update_gap=0", "'optim.update_gap': expected a positive integer"),
    ("model.dim=100", "model.dim 100 / model.n_heads 4"),
]


@pytest.mark.parametrize("bad, needle", BAD_VALUES)
def test_bad_values_give_one_line_and_exit_2_before_any_work(tmp_path, small_overrides, capsys, bad, needle):
    assert run(small_overrides + [f"run.dir={tmp_path / 'run'}", bad]) == 2
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_created(tmp_path, small_overrides, capsys):
    (tmp_path / "file").write_text("in the way")
    assert run(small_overrides + [f"run.dir={tmp_path / 'file' / 'run'}"]) == 2
    assert "cannot be created" in one_error_line(capsys)


def test_an_override_given_twice_and_an_empty_config_file_are_refused(tmp_path, capsys):
    assert main(["--config", str(REPO / "configs/tiny.yaml"), "optim.lr=0.1", "optim.lr=0.2"]) == 2
    assert "'optim.lr' is overridden twice" in one_error_line(capsys)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    assert main(["--config", str(empty)]) == 2
    assert "is empty" in one_error_line(capsys)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 10\n  steps: 20\n")
    assert main(["--config", str(twice)]) == 2
    assert "'steps' appears twice" in one_error_line(capsys)


def test_a_rank_above_the_matrix_sizes_is_said_once(tmp_path, small_overrides, capsys):
    assert run(small_overrides + ["optim.rank=100", "train.steps=1", "train.eval_every=0", f"run.dir={tmp_path}"]) == 0
    notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith("note: optim.rank=100")]
    # dim 64, ffn 172: every projected matrix (7 per block, 2 blocks) has a short side of 64
    assert len(notes) == 1 and "of 14 matrices" in notes[0] and "(rank 64)" in notes[0]


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------------

def test_a_second_ctrl_c_exits_at_once_in_one_line(tmp_path, small_overrides, capsys, monkeypatch):
    import signal

    from lotus_dist.train.signals import StopSignals
    from lotus_dist.train.trainer import Trainer

    stop = StopSignals()
    stop._handle(signal.SIGINT, None)
    assert stop.received == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert run(small_overrides + [f"run.dir={tmp_path}"]) == 130
    assert "interrupted" in one_error_line(capsys)


def test_tensorboard_follows_the_restarted_trajectory(tmp_path, small_overrides):
    """A run over a directory whose old run left TensorBoard events (and no checkpoint): TensorBoard shows only the
    new run's values, each step once, like metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = small_overrides + ["train.steps=3", "train.eval_every=0", "log.tensorboard=true", f"run.dir={tmp_path}"]
    assert run(args + ["optim.lr=0.02"]) == 0
    shutil.rmtree(tmp_path / "checkpoints")  # as if the old run died before its first checkpoint
    assert run(args) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(l["step"], pytest.approx(l["loss"])) for l in read_metrics(tmp_path)]  # not 6 points


def test_the_failure_drill_script_runs(tmp_path):
    """scripts/failure_drill.py (its table is in docs/results.md) on two cases, so that it cannot rot."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts/failure_drill.py"), "--only", "lock,nan_weight",
                           "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and "---" not in l][1:]
    assert len(rows) == 2 and all("| 2 | error: " in r for r in rows), proc.stdout
