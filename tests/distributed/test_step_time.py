"""The planner's step-time model (lotus_dist/distributed/step_time.py) against a hand computation of its formula."""

from __future__ import annotations

import pytest
import torch

from lotus_dist.distributed.step_time import Cluster, Layout, activation_bytes, fsdp_bytes, predict
from lotus_dist.model.llama import Llama, flops_per_token, llama_config


def test_flops_per_token_is_6n_plus_attention():
    cfg = llama_config("tiny", vocab_size=1000)
    model = Llama(cfg)
    # N: the weights that multiply (every Linear: the blocks and lm_head); the embedding is a lookup
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg, 64) == 6 * n + 12 * cfg.n_layers * cfg.dim * 64


def test_fsdp_bytes_by_hand():
    got = fsdp_bytes(numel_full=1000, block_numel=800, shard=4, replicate=2, gather_bytes=2, reduce_bytes=4)
    assert got["all_gather"] == pytest.approx(3 / 4 * 1800 * 2)  # forward: every unit, backward: the blocks again
    assert got["reduce_scatter"] == pytest.approx(3 / 4 * 1000 * 4)
    assert got["all_reduce"] == pytest.approx(2 * 1 / 2 * 250 * 4)  # the shard across 2 replicas
    assert fsdp_bytes(1000, 800, 8, 1, 2, 4)["all_reduce"] == 0


def test_step_time_of_one_hsdp_layout_by_hand():
    """HSDP 2 x 4 on nodes of 4 GPUs, 2 micro-batches, reduce on the last only: micro 1 has the intra-node
    all-gather + reduce-scatter, micro 2 adds the inter-node all-reduce; each overlaps compute, except one call's
    share of each collective; the optimizer's own bytes (sharded projectors) follow, on the shard link."""
    cfg = llama_config("tiny", vocab_size=1000)
    cluster = Cluster(gpus_per_node=4, intra_gbps=100.0, inter_gbps=10.0, mfu=0.5, peak_tflops=1.0, gpu_gib=80)
    layout = Layout(replicate=2, shard=4, micro=2, accum=2, checkpointing=False, reduce_last=True, reduce_bytes=4)
    comm = {"all_gather": 3e9, "reduce_scatter": 5e9, "all_reduce": 2e9}
    got = predict(layout, cfg, seq=64, cluster=cluster, comm=comm, optimizer_bytes=1e9, batch_size=32)

    compute = flops_per_token(cfg, 64) * 2 * 64 / (0.5 * 1e12)  # one micro-batch of 2 x 64 tokens
    ag, rs, ar = 3e9 / 100e9, 5e9 / 100e9, 2e9 / 10e9  # seconds on their links
    units = cfg.n_layers + 1
    first = max(compute, ag + rs) + ag / (2 * cfg.n_layers + 1) + rs / units
    last = max(compute, ag + rs, ar) + ag / (2 * cfg.n_layers + 1) + rs / units + ar / units
    step = first + last + 1e9 / 100e9
    assert got["step_s"] == pytest.approx(step)
    assert got["compute_s"] == pytest.approx(2 * compute)
    assert got["mfu"] == pytest.approx(flops_per_token(cfg, 64) * 32 * 64 / (8 * 1e12 * step))
    # every micro-batch reducing adds the all-reduce to the first one too; checkpointing recomputes the forward
    every = predict(Layout(2, 4, 2, 2, False, False, 4), cfg, 64, cluster, comm, 1e9, 32)
    assert every["step_s"] == pytest.approx(step + max(compute, ag + rs, ar) - max(compute, ag + rs) + ar / units)
    ac = predict(Layout(2, 4, 2, 2, True, True, 4), cfg, 64, cluster, comm, 1e9, 32)
    assert ac["compute_s"] == pytest.approx(2 * compute * 4 / 3)
    # flat FSDP over 8 ranks crosses nodes: everything at the inter-node bandwidth, on one link
    flat = predict(Layout(1, 8, 2, 2, False, False, 4), cfg, 64, cluster, {**comm, "all_reduce": 0.0}, 0.0, 32)
    one = max(compute, (3e9 + 5e9) / 10e9) + 3e9 / 10e9 / (2 * cfg.n_layers + 1) + 5e9 / 10e9 / units
    assert flat["step_s"] == pytest.approx(2 * one)


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    cfg = llama_config("tiny", vocab_size=1000)
    h, f, tokens = cfg.dim, cfg.ffn_dim, 4 * 64
    block = tokens * (26 * h + 8 * f)
    logits = tokens * 1000 * 10
    assert activation_bytes(cfg, 4, 64, False) == cfg.n_layers * block + logits
    assert activation_bytes(cfg, 4, 64, True) == cfg.n_layers * tokens * h * 2 + block + logits
