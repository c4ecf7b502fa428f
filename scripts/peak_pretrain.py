"""``pretrain.py`` (same arguments) with every ``Trainer.train_step`` measured by ``PeakMemory``: each rank writes
``[{"step": N, "peak_bytes": ..., "start_bytes": ...}, ...]`` (N: the step the call completed) to
``$PEAK_OUT/rank<r>.json``. Used by tests/distributed/test_resume_memory.py and scripts/bench_sharding.py."""

import functools
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lotus_dist.train.cli import main  # noqa: E402
from lotus_dist.train.peak_memory import PeakMemory  # noqa: E402
from lotus_dist.train.trainer import Trainer  # noqa: E402

RECORDS: list[dict] = []


def measured(step_fn):
    @functools.wraps(step_fn)
    def wrapper(self):
        with PeakMemory(self.device) as pm:
            out = step_fn(self)
        RECORDS.append({"step": self.step, "peak_bytes": pm.peak_bytes, "start_bytes": pm.start_bytes})
        return out

    return wrapper


if __name__ == "__main__":
    Trainer.train_step = measured(Trainer.train_step)
    code = main()
    out = Path(os.environ["PEAK_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(RECORDS))
    sys.exit(code)
