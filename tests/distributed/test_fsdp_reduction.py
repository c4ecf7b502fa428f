"""dist.mode=fsdp's gradient reduction (issue 25 items 7-8): dist.reduce_dtype, dist.reduce_last_micro_batch and
optim.projectors=auto, each against one process (same seed, global batch 8 = 2 ranks x micro 2 x 2 micro-batches)
and against the capacity planner.

fp32 on gloo: sharded reductions round differently from one process, so losses agree to a relative 1e-4 (as in
test_pretrain_fsdp.py); reducing once per step instead of per micro-batch only reorders fp32 sums (1e-5);
a bf16 reduction rounds each reduced gradient to 8 bits of mantissa (relative 2^-9 = 2e-3 per element), which
over these 8 steps moves the loss by at most 1e-2 relative.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lotus_dist.distributed.capacity import dry_run
from lotus_dist.train.config import ConfigError, load_config, merge_overrides
from lotus_dist.train.metrics import read_metrics
from pretrain_launch import REPO, SMALL, concurrently, launch

STEPS = 8
RUNS = {
    "single": (0, []),
    "fsdp": (2, []),
    "fsdp_last": (2, ["dist.reduce_last_micro_batch=true"]),
    "fsdp_bf16": (2, ["dist.reduce_dtype=bf16"]),
    "hsdp_last": (2, ["dist.replicate=2", "dist.reduce_last_micro_batch=true"]),
    "fsdp_full_rank": (2, ["optim.rank=64"]),  # projectors as large as the weights: auto shards them
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduction")
    args = [*SMALL, f"train.steps={STEPS}", "train.eval_every=0", "checkpoint.every=0", "optim.verify_gap=3",
            "optim.gamma=0.5", f"data.cache_dir={root / 'cache'}"]
    procs = concurrently(*(functools.partial(launch, nproc, [*args, *extra, f"run.dir={root / name}"])
                           for name, (nproc, extra) in RUNS.items()))
    out = {}
    for name, proc in zip(RUNS, procs):
        out[name] = {"stdout": proc.stdout, "metrics": read_metrics(root / name)}
        assert [l["step"] for l in out[name]["metrics"]] == list(range(1, STEPS + 1)), name
    return out


def losses(runs, name):
    return [line["loss"] for line in runs[name]["metrics"]]


@pytest.mark.slow  # the module's torchrun runs (fixture runs)
def test_reduce_last_micro_batch_equals_every_micro_batch(runs):
    single = losses(runs, "single")
    for name in ("fsdp", "fsdp_last", "hsdp_last"):
        assert losses(runs, name) == pytest.approx(single, rel=1e-4), name
    assert losses(runs, "fsdp_last") == pytest.approx(losses(runs, "fsdp"), rel=1e-5)
    switches = [line["switches"] for line in runs["single"]["metrics"]]
    assert [line["switches"] for line in runs["fsdp_last"]["metrics"]] == switches and switches[-1] > 0


@pytest.mark.slow  # the module's torchrun runs (fixture runs)
def test_bf16_reduction_follows_within_bf16_rounding(runs):
    bf16, fp32 = losses(runs, "fsdp_bf16"), losses(runs, "fsdp")
    assert bf16 == pytest.approx(losses(runs, "single"), rel=1e-2)
    assert bf16 != fp32  # the reduction really ran in bf16 (an fp32 one repeats the fp32 run's losses exactly)


@pytest.mark.slow  # the module's torchrun runs (fixture runs)
def test_projectors_auto_is_the_planners_choice_and_bytes(runs):
    """The measured rank-0 optimizer state of a 2-rank run against the planner for the same config: auto replicates
    rank-8 projectors (they weigh less than the rank's half of the weights), shards rank-64 ones (as large as the
    weights: one gathered at a time costs less than the half it saves) and replicates on a 2 x 1 HSDP mesh (one
    rank per shard group)."""
    for name, extra, choice in (("fsdp", ["dist.world_size=2"], "replicate"),
                                ("fsdp_full_rank", ["dist.world_size=2", "optim.rank=64"], "shard"),
                                ("hsdp_last", ["dist.world_size=2", "dist.replicate=2"], "replicate")):
        planned = dry_run(load_config(REPO / "configs/tiny.yaml", merge_overrides(SMALL, extra)), out=lambda s: None)
        assert planned["lotus"]["projector_choice"] == choice
        said = [l for l in runs[name]["stdout"].splitlines() if l.startswith("optim.projectors=")]
        assert len(said) == 1 and said[0].startswith(f"optim.projectors=auto: {choice} ("), said
        measured = {line["optimizer_state_bytes"] for line in runs[name]["metrics"]}
        assert measured == {planned["lotus"]["optimizer"]}, (name, measured, planned["lotus"]["optimizer"])


def test_fsdp_mode_defers_the_reduction_to_the_last_micro_batch():
    """Inside the fsdp mode's no_sync: before the last micro-batch no gradient reaches the shards (flat FSDP: no
    reduce-scatter; HSDP: no all-reduce), on the last every parameter has its reduced gradient. Planned on a fake
    process group of 4 ranks (rank 0), as the planner does."""
    from lotus_dist.distributed.fsdp import apply_fsdp
    from lotus_dist.distributed.modes import FullyShardedDataParallel, ParallelContext
    from lotus_dist.distributed.sharding_plan import plan_for_model
    from lotus_dist.distributed.capacity import _mesh, fake_process_group
    from lotus_dist.model.llama import Llama, llama_config

    for replicate in (1, 2):
        for reduce_last in (False, True):
            with fake_process_group(4):
                model = Llama(llama_config("tiny", vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=64))
                apply_fsdp(model, _mesh(4, replicate), plan_for_model(model, 4, 4, replicate=replicate),
                           log_fn=lambda s: None)
                mode = FullyShardedDataParallel.__new__(FullyShardedDataParallel)  # no process group of its own
                ctx = ParallelContext(reduce_last=reduce_last)
                tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
                reduced = []
                for last in (False, True):
                    with mode.no_sync(model, None, ctx, last=last):
                        model(tokens[:, :-1], tokens[:, 1:]).backward()
                    reduced.append(sum(p.grad is not None for p in model.parameters()))
            n = len(list(model.parameters()))
            assert reduced == ([0, n] if reduce_last else [n, n]), (replicate, reduce_last, reduced)


def test_reduce_last_refuses_per_layer():
    with pytest.raises(ConfigError, match=r"dist.reduce_last_micro_batch=true.*optim.per_layer=true"):
        load_config(None, ["dist.reduce_last_micro_batch=true", "optim.per_layer=true", "train.grad_clip=0"])
    with pytest.raises(ConfigError, match="dist.reduce_dtype"):
        load_config(None, ["dist.reduce_dtype=fp16"])


@pytest.mark.parametrize("mode", ["ddp", "deepspeed"])
@pytest.mark.parametrize("key", ["dist.reduce_dtype=bf16", "dist.reduce_last_micro_batch=true"])
def test_fsdp_reduction_keys_are_refused_elsewhere(mode, key):
    """The owner backend has its own reduction (fp32 buckets, last micro-batch): the keys are refused, not ignored."""
    with pytest.raises(ConfigError, match=rf"'{key.split('=')[0]}' applies to dist.mode=fsdp only"):
        load_config(None, [f"dist.mode={mode}", key])
