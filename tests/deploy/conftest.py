"""Helpers for the deployment tests: they run the launch scripts in dry mode (no torchrun, Slurm or
Docker engine needed) and check the files with docker-compose and shellcheck where those exist."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Launch:
    """What a launcher printed in dry mode: the exported environment and the command lines."""

    returncode: int
    stdout: str
    stderr: str
    env: dict[str, str] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)

    @property
    def command(self) -> list[str]:
        assert len(self.commands) == 1, self.stdout
        return self.commands[0]


def parse_dry_run(stdout: str) -> tuple[dict[str, str], list[list[str]]]:
    env: dict[str, str] = {}
    commands: list[list[str]] = []
    for line in stdout.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words = shlex.split(line)
        if words[0] == "export":
            name, value = words[1].split("=", 1)
            env[name] = value
        else:
            commands.append(words)
    return env, commands


def flags(command: list[str]) -> dict[str, str]:
    """``--key=value`` options of a command up to its first positional argument."""
    out = {}
    for word in command[1:]:
        if not word.startswith("--"):
            break
        key, _, value = word.partition("=")
        out[key] = value
    return out


class Runner:
    """Runs repository scripts in a clean environment with a directory of stub programs first on PATH."""

    repo = REPO
    flags = staticmethod(flags)
    parse_dry_run = staticmethod(parse_dry_run)

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        # No real nvidia-smi may leak in from a GPU host: the default stub finds no GPU.
        self.stub("nvidia-smi", "exit 9")

    def stub(self, name: str, body: str) -> Path:
        path = self.bin / name
        path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        path = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"])
        env = {"PATH": path, "HOME": str(self.tmp), "LC_ALL": "C.UTF-8"}
        env.update(extra)
        return env

    def run(self, script: str, *args: str, cwd: Path | None = None, **env: str) -> Launch:
        proc = subprocess.run(
            ["bash", str(REPO / script), *args],
            env=self.env(**env),
            cwd=cwd or self.tmp,
            capture_output=True,
            text=True,
            timeout=300,  # a bound on a hang, not a guess at the duration (CI machines are shared)
        )
        launch = Launch(proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode == 0:
            launch.env, launch.commands = parse_dry_run(proc.stdout)
        return launch


@pytest.fixture
def runner(tmp_path: Path) -> Runner:
    return Runner(tmp_path)


@pytest.fixture
def require_tool():
    """Path of a system tool; skips without it, or fails where CI demands it (LOTUS_REQUIRE_SYSTEM_TOOLS=1)."""

    def require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            reason = (
                f"'{name}' is not installed "
                "(apt-get install -y --no-install-recommends docker-compose shellcheck)"
            )
            if os.environ.get("LOTUS_REQUIRE_SYSTEM_TOOLS") == "1":
                pytest.fail(reason + " and LOTUS_REQUIRE_SYSTEM_TOOLS=1")
            pytest.skip(reason)
        return path

    return require
