"""What a step costs, as logged in metrics.jsonl (optim_collectives, optim_comm_bytes, host_syncs): under torchrun
on 2 gloo ranks a refresh issues a fixed handful of collectives whatever the number of matrices, an ordinary step
none, and every ordinary step has exactly one host sync, with and without per-layer updates. Per-layer updates
reduce every block's norm in the trainer's one all-reduce (no optimizer collective on an ordinary step) and solve
the first bases of all blocks together (a first step costs what a whole-model refresh does)."""

from __future__ import annotations

import pytest

from lotus_dist.train.metrics import read_metrics
from pretrain_launch import SMALL, launch

pytestmark = pytest.mark.slow  # torchrun runs

# replicated projectors: the optimizer's own reductions only (optim.projectors=shard, and auto where it shards,
# all-gathers every step)
STEPS = ["train.steps=12", "train.eval_every=0", "checkpoint.every=0", "log.every=1", "optim.projectors=replicate"]
PER_LAYER = ["optim.per_layer=true", "train.grad_clip=0"]


def _run(tmp_path, name, *extra):
    run_dir = tmp_path / name
    launch(2, [*SMALL, *STEPS, f"run.dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}", *extra])
    lines = read_metrics(run_dir)
    assert [l["step"] for l in lines] == list(range(1, 13))
    switched = {l["step"] for prev, l in zip([{"switches": 0}] + lines, lines) if l["switches"] > prev["switches"]}
    return lines, switched


@pytest.mark.parametrize("per_layer", [False, True])
def test_galore_refreshes_in_a_few_collectives_and_syncs_once_per_ordinary_step(tmp_path, per_layer):
    extra = PER_LAYER if per_layer else []
    lines, switched = _run(tmp_path, f"galore_{per_layer}", "optim.name=galore", "optim.update_gap=5", *extra)
    assert switched == {6, 11}  # the first basis at step 1 is not a switch; then every 5 steps
    for l in lines:
        refresh = l["step"] == 1 or l["step"] in switched
        if not per_layer:
            # 14 matrices: a gather and a broadcast per owner (2 ranks), and step 1's statistics all-reduce
            assert l["optim_collectives"] <= 8 if refresh else l["optim_collectives"] == 0, l
            assert (l["optim_comm_bytes"] > 0) == refresh, l
        elif l["step"] == 1:
            assert l["optim_collectives"] <= 8, l  # every block's first basis in one batched refresh
        elif not refresh:
            assert l["optim_collectives"] <= 1, l  # the blocks' norms ride in the trainer's all-reduce
        if not refresh:
            assert l["host_syncs"] == 1, l


@pytest.mark.parametrize("per_layer", [False, True])
def test_lotus_checks_in_one_collective_and_syncs_once_per_ordinary_step(tmp_path, per_layer):
    extra = PER_LAYER if per_layer else []
    lines, switched = _run(tmp_path, f"lotus_{per_layer}", "optim.name=lotus", "optim.verify_gap=5", *extra)
    checks = {5, 10}  # tau reaches a multiple of 5 (tau = 1 at the first basis)
    for l in lines:
        step = l["step"]
        if not per_layer:
            if step == 1 or step in switched:
                assert l["optim_collectives"] <= 8, l  # q + 2 = 4 sketch all-reduces for all 14, + statistics
            elif step in checks:
                assert l["optim_collectives"] == 1, l  # the batched statistics all-reduce
            else:
                assert l["optim_collectives"] == 0, l
        elif step == 1:
            assert l["optim_collectives"] <= 8, l  # every block's first basis in one batched refresh
        elif step not in checks and step not in switched:
            assert l["optim_collectives"] <= 1, l  # the blocks' norms ride in the trainer's all-reduce
        if step != 1 and step not in checks and step not in switched:
            assert l["host_syncs"] == 1, l
