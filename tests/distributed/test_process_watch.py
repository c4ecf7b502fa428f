"""The launch helpers' hang detector: a job that sleeps is declared hung, one that computes is not, however long."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from process_watch import ProgressWatch, communicate

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="the CPU-progress watch reads Linux /proc")


def _popen(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_a_sleeping_job_is_declared_hung_and_killed_with_its_whole_session():
    # the parent sleeps, its child sleeps too: nothing in the tree uses CPU
    job = _popen("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
                 "time.sleep(600)']); print('child', child.pid, flush=True); time.sleep(600)")
    with pytest.raises(AssertionError, match="hung: no process of the job used any CPU for 2 s") as info:
        communicate(job, stall_s=2.0)
    child = int(re.search(r"child (\d+)", str(info.value)).group(1))
    assert job.returncode == -9
    # the grandchild got the SIGKILL too: it ends (gone, or a zombie until init reaps it) as soon as it is scheduled
    deadline = time.monotonic() + 60  # a bound on a hang, not a guess at the duration
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_computing_job_is_not_hung_and_its_child_counts():
    # the parent only waits for a child that computes for a while: the child's CPU is the job's progress
    child = "import time\\nend = time.process_time() + 5\\nwhile time.process_time() < end: pass"
    job = _popen(f"import subprocess, sys; subprocess.run([sys.executable, '-c', '{child}']); print('done')")
    out, _ = communicate(job, stall_s=2.5)
    assert job.returncode == 0 and out.strip() == "done"


def test_the_ceiling_bounds_a_job_that_never_ends():
    job = _popen("while True: pass")
    watch = ProgressWatch([job.pid], stall_s=60.0, ceiling_s=0.5)
    try:
        while not (why := watch.why_give_up()):
            pass
        assert "ceiling" in why
    finally:
        job.kill()
        job.wait()
