"""Capacity planner: meta model + fake process group, no real processes."""

from __future__ import annotations

import time

import torch.distributed as dist

from lotus_dist.distributed.planner import METHODS, dry_run
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.train.config import load_config


def run(*overrides):
    lines: list[str] = []
    res = dry_run(load_config(None, list(overrides)), out=lines.append)
    assert not dist.is_initialized()  # the fake group is gone again
    return res, lines


def test_tiny_world4_param_bytes_add_up():
    res, lines = run("model.name=tiny", "dist.world_size=4", "optim.rank=16")
    total_param_bytes = res["n_params"] * 4
    for m in METHODS:
        # Rank 0 holds the largest (padded) shards, so x world is a slight over-estimate.
        assert total_param_bytes <= res[m]["params"] * 4 <= 1.01 * total_param_bytes
        assert res[m]["grads"] == res[m]["params"]
    assert res["lotus"]["moments"] < res["adamw"]["moments"]
    assert res["adamw"]["projectors"] == 0 and res["lotus"]["projectors"] > 0
    assert res["lotus"]["switch_check"] > 0 and res["galore"]["switch_check"] == 0
    assert res["lotus"]["fallbacks"] == 0 and res["lotus"]["lowrank_step"] == 0
    assert any(line.startswith("TOTAL per rank") for line in lines)


def test_fallback_and_hsdp_and_sharded_projectors():
    # tiny's down_proj is 128 x 344; 344 does not split over 3 shards: reduce-scatter of A^T G every step, the
    # 16 x 344 state sharded by columns (115 on rank 0): the moments are those of a Shard(1) plan at this size.
    res, lines = run("model.name=tiny", "dist.world_size=6", "dist.replicate=2", "optim.rank=16")
    assert res["lotus"]["fallbacks"] == 4 and res["lotus"]["lowrank_step"] == 4 * 2 * (2 / 3) * 16 * 344 * 4
    expected = 0  # rank 0's moments from the shapes: Shard(0) rows ceil(m/3); the fallbacks' columns ceil(344/3)
    for name, p in Llama(llama_config("tiny")).named_parameters():
        rows = -(-p.shape[0] // 3)
        if name.endswith("mlp.down_proj.weight"):
            expected += 2 * 16 * -(-344 // 3) * 4
        elif p.dim() == 2 and name.split(".")[-2].endswith("_proj"):
            expected += 2 * rows * 16 * 4
        else:
            expected += 2 * rows * (p.numel() // p.shape[0]) * 4
    assert res["lotus"]["moments"] == expected
    assert any("fallback layers.0.mlp.down_proj.weight" in line for line in lines)
    replicated, _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16")
    sharded, _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16", "optim.projectors=shard")
    assert abs(sharded["lotus"]["projectors"] * 4 - replicated["lotus"]["projectors"]) < 64 * 4 * 4
    # a step gathers one projector at a time (every projector of tiny at r=16 is 16 x 128 fp32)
    assert sharded["lotus"]["projector_transient"] == 16 * 128 * 4 and replicated["lotus"]["projector_transient"] == 0
    assert sharded["lotus"]["total"] == sum(sharded["lotus"][k] for k in ("params", "grads", "optimizer",
                                                                          "projector_transient"))


def test_llama_7b_at_64_ranks_is_fast():
    t0 = time.perf_counter()
    res, _ = run("model.name=llama_7b", "dist.world_size=64", "optim.rank=1024", "train.batch_size=512")
    assert time.perf_counter() - t0 < 60
    assert res["lotus"]["fallbacks"] == 0
    assert res["lotus"]["moments"] < res["adamw"]["moments"] / 3


def test_per_layer_column_holds_one_block_of_gradients():
    from lotus_dist.model.llama import Llama, llama_config

    res, lines = run("model.name=tiny", "dist.world_size=1", "optim.rank=16", "train.batch_size=8",
                     "train.micro_batch_size=8")
    model = Llama(llama_config("tiny"))
    block = sum(p.numel() for p in model.layers[0].parameters()) * 4
    root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers.")) * 4
    per_layer = res["lotus+per_layer"]
    assert per_layer["grads"] == max(block, root)  # one unit at a time, no accumulation
    assert per_layer["total"] == res["lotus"]["total"] - res["lotus"]["grads"] + per_layer["grads"]
    accum, _ = run("model.name=tiny", "dist.world_size=1", "optim.rank=16", "train.batch_size=16",
                   "train.micro_batch_size=8")
    assert per_layer["grads"] < accum["lotus+per_layer"]["grads"] < accum["lotus"]["grads"]
    assert any("lotus+per_layer" in line for line in lines)
