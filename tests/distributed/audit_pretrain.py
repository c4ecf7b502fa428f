"""``pretrain.py`` with every ``Trainer.train_step`` run under ``lotus_dist.sync_audit.SyncAudit``: each rank writes
its per-step records (``StepAudits.records``) to ``$AUDIT_OUT/rank<r>.json``. Launched by the tests as
``pretrain_launch.launch(..., entry=AUDIT_SCRIPT)``."""

import json
import os
import sys
from pathlib import Path

from lotus_dist.sync_audit import StepAudits
from lotus_dist.train.cli import main
from lotus_dist.train.trainer import Trainer

if __name__ == "__main__":
    audits = StepAudits()
    Trainer.train_step = audits.wrap(Trainer.train_step)
    code = main()
    out = Path(os.environ["AUDIT_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(audits.records))
    sys.exit(code)
