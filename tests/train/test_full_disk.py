"""A full disk at checkpoint save: one line naming the directory, the bytes needed and free, nothing lost.

The run directory is a small tmpfs, mounted in a user and mount namespace of its own (``unshare -rm``), so the
test needs no privileges; where the kernel or the container refuses that, the tests are skipped saying so.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_runs import REPO, run, step_dirs  # tests/ is on sys.path (pyproject's pythonpath)

SAVES = ["train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=1"]
CHECKPOINT_MB = 16  # one checkpoint of SMALL's model (lotus, fp32) is ~16 MB


def _tmpfs_refusal() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare(1) here"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


REFUSAL = _tmpfs_refusal()
pytestmark = [pytest.mark.slow,  # pretrain.py processes on a small tmpfs
              pytest.mark.skipif(REFUSAL is not None, reason=str(REFUSAL))]


def run_on_tmpfs(tmp_path: Path, size_mb: int, args: list[str], python: list[str] | None = None):
    """Run pretrain with run.dir on a tmpfs of ``size_mb``; afterwards the run directory is copied to
    ``tmp_path / "left"`` (the tmpfs ends with the namespace). Returns the finished process."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    cmd = [*(python or [sys.executable, str(REPO / "pretrain.py")]), "--config", str(REPO / "configs/tiny.yaml"),
           *args, f"run.dir={mount}", f"data.cache_dir={tmp_path / 'cache'}"]
    script = (f"mount -t tmpfs -o size={size_mb}m tmpfs {shlex.quote(str(mount))} || exit 99; "
              f"{shlex.join(cmd)}; code=$?; cp -a {shlex.quote(str(mount))} {shlex.quote(str(tmp_path / 'left'))}; "
              f"exit $code")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 99, proc.stderr
    return proc


def error_line(proc) -> str:
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def bytes_in(line: str, word: str) -> int:
    """The number before ``word`` in the error line ("... needs about 16,912,345 bytes, 8,000,000 free; ...")."""
    before = line.split(f" {word}")[0].split()[-1]
    return int(before.replace(",", ""))


def test_a_save_that_does_not_fit_is_refused_before_writing(tmp_path, small_args):
    proc = run_on_tmpfs(tmp_path, CHECKPOINT_MB // 2, small_args + SAVES + ["train.steps=2"])
    assert proc.returncode == 2
    line = error_line(proc)
    assert "no space left on device in" in line and "step_00000002" in line and "no checkpoint yet" in line, line
    assert bytes_in(line, "free") < CHECKPOINT_MB // 2 * 2**20 < bytes_in(line, "bytes")
    left = tmp_path / "left/checkpoints"
    assert not left.exists() or not any(left.iterdir())  # nothing written, nothing half-written


def test_the_previous_checkpoint_survives_and_resumes_once_there_is_room(tmp_path, small_args):
    proc = run_on_tmpfs(tmp_path, CHECKPOINT_MB + CHECKPOINT_MB // 2, small_args + SAVES + ["train.steps=4"])
    assert proc.returncode == 2
    line = error_line(proc)
    assert "step_00000004" in line and "step_00000002 is intact" in line, line
    left = tmp_path / "left"
    assert step_dirs(left) == ["step_00000002"]  # no step_00000004.tmp left behind
    # with room again (here: the copy on the real disk), the run resumes from it and finishes
    assert run(small_args + SAVES + ["train.steps=4", f"run.dir={left}", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert step_dirs(left) == ["step_00000004"]


def test_a_disk_that_fills_during_the_write_gives_the_same_line(tmp_path, small_args):
    """The check before writing passes (here: switched off), and the write itself runs out of space."""
    skip_check = ("import sys; import lotus_dist.train.checkpoint as c; "
                  "c.Checkpointer._refuse_full_disk = lambda self, *args: 16 << 20; "
                  "from lotus_dist.train.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = run_on_tmpfs(tmp_path, CHECKPOINT_MB // 2, small_args + SAVES + ["train.steps=2"],
                        python=[sys.executable, "-c", skip_check])
    assert proc.returncode == 2
    line = error_line(proc)
    assert "no space left on device in" in line and "step_00000002" in line, line
    assert step_dirs(tmp_path / "left") == []  # the partial step_00000002.tmp was removed
    assert "Traceback" not in proc.stderr
