"""optim.projector_dtype through the trainer: a bf16- or int8-projector run resumed from its checkpoint equals the
uninterrupted one bit for bit, and a resume may change the dtype between fp32 and bf16 (the stored projectors are
cast on load: the state bytes follow at once and the next checkpoint records the new value), not to int8."""

from __future__ import annotations

import json

import pytest

from lotus_dist.train.metrics import read_metrics
from pretrain_runs import run, straight_and_resumed, trajectory  # tests/ is on sys.path (pyproject's pythonpath)

pytestmark = pytest.mark.slow  # trains for a while: short runs resumed

# checks every 2 steps with a threshold every displacement passes: bases are stored at steps 1, 2, 4, 6, ...
SWITCHING = ["train.eval_every=4", "checkpoint.every=4", "optim.verify_gap=2", "optim.gamma=10"]
# SMALL's tiny LLaMA (dim 64, 2 layers, ffn 172), r = 8: the std side of each projected matrix is 64
PROJECTOR_ELEMENTS = 2 * (4 * 64 * 8 + 3 * 64 * 8)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_rounded_projector_run_resumes_bit_for_bit(tmp_path, small_overrides, dtype):
    common = small_overrides + SWITCHING + ["train.steps=8", f"optim.projector_dtype={dtype}"]
    straight, resumed = straight_and_resumed(tmp_path, common, 4, 8)
    assert len(straight) == 4 and straight == resumed
    assert straight[-1]["switches"] > trajectory(tmp_path / "straight", 4, 4)[0]["switches"], "no switch after resume"


def test_a_resume_casts_the_stored_projectors_to_the_new_dtype(tmp_path, small_overrides, capsys):
    run_dir = tmp_path / "run"
    common = small_overrides + SWITCHING + [f"run.dir={run_dir}"]
    assert run(common + ["train.steps=4"]) == 0
    assert run(common + ["train.steps=8", "optim.projector_dtype=bf16"]) == 0
    assert "optim.projector_dtype fp32 -> bf16" in capsys.readouterr().out
    # int8 codes and row scales are another format: refused before anything is loaded, naming both values
    assert run(common + ["train.steps=12", "optim.projector_dtype=int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "optim.projector_dtype=bf16" in err[-1] and "optim.projector_dtype=int8" in err[-1], err
    state = {line["step"]: line["optimizer_state_bytes"] for line in read_metrics(run_dir)}
    assert state[4] - state[5] == 2 * PROJECTOR_ELEMENTS  # 4 bytes an element before, 2 after
    assert state[5] == state[8]
    groups = json.loads((run_dir / "checkpoints/step_00000008/train_state.json").read_text())["optim_groups"]
    assert groups[0]["projector_dtype"] == "bf16"
    assert run(common + ["train.steps=10"]) == 0  # and back: fp32 (the config's default) again
    state = {line["step"]: line["optimizer_state_bytes"] for line in read_metrics(run_dir)}
    assert state[9] - state[8] == 2 * PROJECTOR_ELEMENTS
