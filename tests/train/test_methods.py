"""Every optimizer method trains the tiny LLaMA on the embedded corpus through pretrain.py (100 steps)."""

import pytest

from lotus_dist.optim import METHODS
from lotus_dist.train.metrics import read_metrics
from pretrain_runs import run  # tests/ is on sys.path (pyproject's pythonpath)

pytestmark = pytest.mark.slow  # trains for a while: 100 steps per method


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_lowers_the_loss_over_100_steps(tmp_path, small_overrides, method):
    args = small_overrides + [f"optim.name={method}", "train.steps=100", "train.eval_every=100", "checkpoint.every=0",
                              "log.every=1", "optim.update_gap=25", "optim.verify_gap=10", f"run.dir={tmp_path}"]
    if method == "adamw":
        args.append("optim.lr=0.003")
    assert run(args) == 0
    lines = read_metrics(tmp_path)
    first, last = lines[0]["loss"], lines[-1]["loss"]
    # ln(8000) = 9.0 at initialisation; every method must learn well beyond unigram guessing in 100 steps.
    assert last < first - 1.5, (method, first, last)
    assert lines[-1]["val_loss"] < 7.0, (method, lines[-1]["val_loss"])
    if method != "adamw":
        assert lines[-1]["optimizer_state_bytes"] > 0
