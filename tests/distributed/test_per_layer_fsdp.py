"""optim.per_layer=true under torchrun + FSDP2 (2 gloo ranks, and HSDP on 4): the hooks fire on the sharded
parameters, and the run follows the single-process whole-model run, with and without low-rank accumulation, across
a resume.

fp32 on gloo: sharded reductions round differently from one process, hence losses to a relative 1e-4 (the
one-process per-layer path is bitwise equal to the whole-model step, tests/train/test_per_layer.py).
"""

import pytest
import torch

from lotus_dist.errors import UserError
from lotus_dist.train.metrics import read_metrics
from pretrain_launch import SMALL, concurrently, launch

pytestmark = pytest.mark.slow  # torchrun runs

ARGS = [*SMALL, "train.steps=10", "train.eval_every=0", "checkpoint.every=0", "optim.name=lotus", "optim.gamma=0.5",
        "optim.verify_gap=3", "train.grad_clip=0"]


def test_fsdp_per_layer_follows_the_single_whole_model_run(tmp_path):
    args = [*ARGS, f"data.cache_dir={tmp_path / 'cache'}"]
    # two micro-batches of 2 per rank (R accumulated on steady steps), stopped at step 5 and resumed
    accum = [*args, "optim.per_layer=true", "train.micro_batch_size=2", f"run.dir={tmp_path / 'accum'}"]
    concurrently(
        lambda: launch(0, [*args, "train.micro_batch_size=8", f"run.dir={tmp_path / 'single'}"]),
        # one micro-batch of 4 per rank: no accumulation; blocks recomputed in backward (FSDP2 re-gathers them)
        lambda: launch(2, [*args, "optim.per_layer=true", "train.micro_batch_size=4",
                           "train.activation_checkpointing=true", f"run.dir={tmp_path / 'fsdp'}"]),
        lambda: [launch(2, [*accum, "train.stop_at=5"]), launch(2, accum)],  # one after the other
        # HSDP (2 replicas x 2 shards) with sharded projectors: the hooks fire after the replica all-reduce, and the
        # projector all-gathers run inside them in the same order on every rank
        lambda: launch(4, [*args, "optim.per_layer=true", "train.micro_batch_size=2", "dist.replicate=2",
                           "optim.projectors=shard", f"run.dir={tmp_path / 'hsdp'}"]))
    single = read_metrics(tmp_path / "single")
    for run in ("fsdp", "accum", "hsdp"):
        got = {l["step"]: l for l in read_metrics(tmp_path / run)}
        assert sorted(got) == list(range(1, 11)), run
        for a in single:
            b = got[a["step"]]
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (run, a["step"])
            assert b["switches"] == a["switches"], (run, a["step"])
            if "grad_norm" in b:  # every block's norm summed once, in the trainer's all-reduce (HSDP: per replica)
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (run, a["step"])
    assert all("grad_norm" in l for l in read_metrics(tmp_path / "hsdp"))
    assert single[-1]["switches"] > 0


def test_per_layer_is_refused_in_modes_that_update_on_owners():
    from lotus_dist.distributed.modes import Collective

    with pytest.raises(UserError, match="dist.mode=single and fsdp"):
        Collective.update_units(object(), torch.nn.Linear(2, 2))


def test_fsdp_per_layer_nan_on_one_rank_stops_every_rank_without_saving(tmp_path):
    """A NaN in one block on rank 1 only: the end-of-step reduction of the blocks' values tells both ranks, which
    stop at the same step with the same line, and the partly applied step is never saved."""
    args = [*ARGS, "optim.per_layer=true", "train.micro_batch_size=4", "checkpoint.every=2",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]
    proc = launch(2, args, env={"LOTUS_FAULT": "nan_grad:rank=1:step=3"}, check=False)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "step 3 with optim.per_layer=true" in errors[0] and "step_00000002" in errors[0]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]


def test_fsdp_per_layer_nan_on_one_rank_skips_the_block_on_every_rank(tmp_path):
    """on_nonfinite=skip, a NaN in one block's shard on rank 1 only (no collective per block tells rank 0): both ranks
    skip the step alike from the end-of-step reduction (the block's counters go back on both, so they stay equal and
    no later collective differs), the log names the block as torn (rank 0's shard took its update), and the run
    goes on to the end with finite losses."""
    run = tmp_path / "run"
    args = [*ARGS, "optim.per_layer=true", "train.micro_batch_size=4", "train.on_nonfinite=skip",
            "train.max_skipped_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}"]
    launch(2, args, env={"LOTUS_FAULT": "nan_grad:rank=1:step=4"})  # an ordinary step (3 and 6 check)
    got = {l["step"]: l for l in read_metrics(run)}
    assert sorted(got) == list(range(1, 11))
    assert (got[4]["skipped"], got[4]["skipped_units"], got[4]["torn_units"]) == (1, 1, 1), got[4]
    assert all("skipped" not in got[s] for s in got if s != 4)
    assert all(l["loss"] == l["loss"] for l in got.values())
