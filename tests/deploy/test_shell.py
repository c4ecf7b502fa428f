"""The shell scripts parse (bash -n) and pass shellcheck."""

from __future__ import annotations

import subprocess

import pytest

SCRIPTS = ["scripts/launch_multinode.sh", "scripts/slurm/pretrain.sbatch", "docker/entrypoint.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(runner, script):
    proc = subprocess.run(["bash", "-n", str(runner.repo / script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck(runner, require_tool):
    exe = require_tool("shellcheck")
    proc = subprocess.run(
        [exe, "--shell=bash", *(str(runner.repo / s) for s in SCRIPTS)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
