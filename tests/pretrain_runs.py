"""In-process pretrain runs for tests: run the CLI on configs/tiny.yaml with overrides, read what it left.

``SMALL`` is the tests' model and run, written once: tests/train/conftest.py (the ``small_overrides`` fixtures),
tests/distributed/pretrain_launch.py (its torchrun variant), tests/data and scripts/failure_drill.py build on it.
"""

from __future__ import annotations

from pathlib import Path

from lotus_dist.train.cli import main
from lotus_dist.train.config import merge_overrides
from lotus_dist.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
# A model and run small enough for a 2-core CPU: a few seconds per 40 steps.
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "train.seq_len=32",
         "train.batch_size=8", "train.micro_batch_size=4", "data.val_tokens=2048", "log.every=1",
         "log.tensorboard=false", "log.progress=false", "optim.rank=8"]
TRAJECTORY_KEYS = ("step", "loss", "lr", "tokens", "val_loss", "grad_norm", "switches", "optimizer_state_bytes")


def run(args: list[str]) -> int:
    """``pretrain.py --config configs/tiny.yaml *args`` in this process (later overrides replace earlier ones)."""
    return main(["--config", str(REPO / "configs/tiny.yaml"), *merge_overrides(args)])


def trajectory(run_dir: Path, first: int | None = None, last: int | None = None) -> list[dict]:
    """The metrics lines of ``run_dir`` (steps ``first``..``last`` when given), reduced to the compared keys."""
    lines = [line for line in read_metrics(run_dir)
             if (first is None or line["step"] >= first) and (last is None or line["step"] <= last)]
    return [{k: line[k] for k in TRAJECTORY_KEYS if k in line} for line in lines]


def straight_and_resumed(root: Path, args: list[str], stop_at: int, last: int) -> tuple[list[dict], list[dict]]:
    """The same run ``args`` to step ``last`` straight through (``root/straight``) and stopped after ``stop_at``
    then resumed (``root/resumed``): their trajectories after the stop, to compare."""
    assert run(args + [f"run.dir={root / 'straight'}"]) == 0
    assert run(args + [f"run.dir={root / 'resumed'}", f"train.stop_at={stop_at}"]) == 0
    assert run(args + [f"run.dir={root / 'resumed'}"]) == 0
    return trajectory(root / "straight", stop_at + 1, last), trajectory(root / "resumed", stop_at + 1, last)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def step_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())
