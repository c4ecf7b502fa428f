"""No hidden host syncs under torchrun on 2 gloo ranks (fsdp, also per-layer, and ddp): every step's host syncs, as the dispatch
audit sees them (lotus_dist/sync_audit.py), are exactly those the step counters report, an ordinary step has one,
and no step makes a blocking host-to-device copy (``torch.tensor(v, device=cuda)``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain_launch import SMALL, launch

pytestmark = pytest.mark.slow  # torchrun runs

AUDIT_SCRIPT = Path(__file__).resolve().parent / "audit_pretrain.py"
STEPS = ["train.steps=7", "train.eval_every=0", "checkpoint.every=0", "log.every=1", "optim.name=galore",
         "optim.update_gap=5"]
ORDINARY = {2, 3, 4, 5, 7}  # galore with update_gap=5: a basis at step 1 and a switch at step 6


def audited_run(tmp_path: Path, nproc: int, *extra: str) -> list[list[dict]]:
    out = tmp_path / "audit"
    launch(nproc, [*SMALL, *STEPS, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", *extra],
           env={"AUDIT_OUT": str(out)}, entry=AUDIT_SCRIPT)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(max(nproc, 1))]


def check_steps(ranks: list[list[dict]]) -> None:
    for rank, records in enumerate(ranks):
        assert len(records) == 7, (rank, len(records))
        for step, rec in enumerate(records, 1):
            where = f"rank {rank} step {step}: {rec['sites']}"
            assert rec["h2d"] == 0, where  # blocking host-to-device copies
            assert rec["host_syncs"] == rec["counted"], where  # the counters see every sync the ops make
            if step in ORDINARY:
                assert rec["host_syncs"] == 1, where


@pytest.mark.parametrize("mode, per_layer", [("fsdp", False), ("fsdp", True), ("ddp", False)])
def test_a_step_has_exactly_the_counted_host_syncs(tmp_path, mode, per_layer):
    extra = ["optim.per_layer=true", "train.grad_clip=0"] if per_layer else []
    check_steps(audited_run(tmp_path, 2, f"dist.mode={mode}", *extra))
