"""scripts/compare.py's own logic: the sweep grid's scaling and reuse of finished runs (no training here)."""

import json
from pathlib import Path

import pytest
from script_loader import load_script



@pytest.fixture(scope="module")
def compare():
    return load_script("scripts/compare.py", "compare_script")


def test_sweep_scales_gamma_only_when_the_guaranteed_switch_does_not_fit(compare):
    runs, note = compare.sweep_runs(200)  # 2/0.005 = 400 steps > 100: every gamma x4
    assert sorted({o for r in runs.values() for o in r if o.startswith("optim.gamma=")}) == \
        ["optim.gamma=0.02", "optim.gamma=0.04", "optim.gamma=0.08"]
    assert len(runs) == 9 and "scaled x4" in note
    runs, note = compare.sweep_runs(1000)
    assert "optim.gamma=0.005" in runs["lotus g=0.005 eta=25"] and note == "the paper's values"


def write_metrics(run_dir: Path, steps: list[int], eval_at: int | None):
    run_dir.mkdir(parents=True)
    lines = [{"event": "startup", "step": 0}]
    lines += [{"step": s, "loss": 1.0, **({"val_loss": 1.0} if s == eval_at else {})} for s in steps]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))


def test_keep_finished_reuses_only_runs_that_reached_their_last_evaluation(compare, tmp_path, monkeypatch):
    preset = {"config": "configs/tiny.yaml", "overrides": ["train.steps=20"], "adamw_lr": 0.003}
    write_metrics(tmp_path / "runs" / "galore_seed1", [10, 20], eval_at=20)  # finished
    write_metrics(tmp_path / "runs" / "galore_seed2", [10], eval_at=None)  # interrupted
    assert compare.finished(tmp_path / "runs" / "galore_seed1", 20)
    assert not compare.finished(tmp_path / "runs" / "galore_seed2", 20)
    assert not compare.finished(tmp_path / "runs" / "missing", 20)

    launched = []
    monkeypatch.setattr(compare.subprocess, "run", lambda args, **kw: launched.append(args) or
                        type("P", (), {"returncode": 0})())
    name = "galore (svd+fixed)"
    kept = compare.run_one(name, ["optim.name=galore"], preset, tmp_path, [], 1, 1, keep_finished=True)
    assert kept == tmp_path / "runs" / "galore_seed1" and launched == []
    compare.run_one(name, ["optim.name=galore"], preset, tmp_path, [], 1, 2, keep_finished=True)
    assert len(launched) == 1 and "seed=2" in launched[0]
    assert not (tmp_path / "runs" / "galore_seed2").exists()  # the partial run was cleared for the rerun
    # --extra may change the length: a run finished at 20 steps is not finished at 30
    compare.run_one(name, ["optim.name=galore"], preset, tmp_path, ["train.steps=30"], 1, 1, keep_finished=True)
    assert len(launched) == 2
