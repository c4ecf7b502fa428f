"""Where a run's numbers go: metrics.jsonl, TensorBoard scalars and a progress bar (rank 0 only).

metrics.jsonl holds one JSON object per logged step, and event records marked ``"event"`` (``startup``: written
when a run starts or resumes, with the step it starts from); ``read_metrics`` returns the step records only.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _refuse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line, parse_constant=_refuse_constant) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The step records of ``metrics.jsonl``, parsed strictly (NaN/Infinity are not JSON; we write null)."""
    return [r for r in _records(run_dir) if "event" not in r]


def read_events(run_dir: str | Path, event: str) -> list[dict]:
    """The records of one kind of event (``startup``: one per start of the run, at the step it starts from)."""
    return [r for r in _records(run_dir) if r.get("event") == event]


def strict_json(record: dict) -> str:
    """One JSON line; non-finite floats become null (bare NaN/Infinity are rejected by strict parsers)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean, allow_nan=False)


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Keep only lines of steps <= ``last_step`` (0: none): a run resumed from that step re-logs the rest, and a
    fresh start over an old run directory must not append to the old run's lines. A line cut off by a kill
    (the last one, unparsable) is dropped too."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors every numeric field to TensorBoard."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, progress: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(strict_json(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "val_loss", "lr", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
