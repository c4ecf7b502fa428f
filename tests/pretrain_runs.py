"""In-process pretrain runs for tests: run the CLI on configs/tiny.yaml with overrides, read what it left."""

from __future__ import annotations

from pathlib import Path

from lotus_dist.train.cli import main
from lotus_dist.train.config import merge_overrides
from lotus_dist.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TRAJECTORY_KEYS = ("step", "loss", "lr", "tokens", "val_loss", "grad_norm", "switches", "optimizer_state_bytes")


def run(args: list[str]) -> int:
    return main(["--config", str(REPO / "configs/tiny.yaml"), *merge_overrides(args)])


def trajectory(run_dir: Path) -> list[dict]:
    return [{k: line[k] for k in TRAJECTORY_KEYS if k in line} for line in read_metrics(run_dir)]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())
