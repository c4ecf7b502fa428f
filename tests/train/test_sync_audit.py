"""The dispatch audit (lotus_dist/sync_audit.py) and what it finds in a whole training step in one process: every
host sync it sees is one the step counters report, an ordinary step has exactly one (whole-model and per-layer),
and no step makes a blocking host-to-device copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lotus_dist.counters import to_host
from lotus_dist.sync_audit import StepAudits, SyncAudit
from lotus_dist.train.trainer import Trainer
from pretrain_runs import run  # tests/ is on sys.path (pyproject's pythonpath)

STEPS = ["train.steps=7", "train.eval_every=0", "checkpoint.every=0", "optim.name=galore", "optim.update_gap=5"]
ORDINARY = {2, 3, 4, 5, 7}  # galore with update_gap=5: a basis at step 1 and a switch at step 6


def test_audit_counts_host_reads_and_host_copies_but_not_device_fills():
    x = torch.ones(3)
    with SyncAudit("cpu") as audit:
        torch.full((), 0.9), torch.zeros(2), torch.where(x > 0, x, 1.0), x * 2.0  # no copy, no sync
    assert audit.events == []
    with SyncAudit("cpu") as audit:
        torch.tensor(0.9)
        x.sum().item(), bool(x.sum() > 0), float(x.sum())
        x.tolist(), x.cpu()
        to_host(x)
    assert audit.h2d == 1 and audit.host_syncs == 6, audit.report()
    here = Path(__file__).name
    assert all(here in site for site in audit.by_site()), audit.report()  # to_host's caller, not counters.py
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist  # the host reads are unpatched afterwards


def test_audit_on_a_gpu_rule_counts_only_device_tensors():
    """A CUDA run's rule (``device`` cuda) on CPU tensors: host tensors are no syncs (checked without a GPU)."""
    x = torch.ones(3)
    with SyncAudit("cuda") as audit:
        torch.tensor(0.9), x.sum().item(), x.tolist(), x.to("meta")
    assert audit.events == []


@pytest.mark.parametrize("per_layer", [False, True])
def test_an_ordinary_step_has_the_one_counted_host_sync(tmp_path, small_overrides, monkeypatch, per_layer):
    audits = StepAudits("cpu")
    monkeypatch.setattr(Trainer, "train_step", audits.wrap(Trainer.train_step))
    extra = ["optim.per_layer=true", "train.grad_clip=0"] if per_layer else ["train.grad_clip=1.0"]
    args = small_overrides + STEPS + [f"run.dir={tmp_path}", *extra]
    assert run(args) == 0
    assert len(audits.records) == 7
    for step, rec in enumerate(audits.records, 1):
        where = f"step {step}: {rec['sites']}"
        assert rec["h2d"] == 0, where
        assert rec["host_syncs"] == rec["counted"], where
        if step in ORDINARY:
            assert rec["host_syncs"] == 1, where
    assert audits.records[0]["host_syncs"] > 1  # the first basis: the audit sees the refresh's counted syncs too
