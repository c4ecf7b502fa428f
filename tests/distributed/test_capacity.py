"""Capacity planner: meta model + fake process group, no real processes."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from lotus_dist.distributed.capacity import METHODS, dry_run
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
    # one summary line for the 4 (issue 31), each matrix in the plan's fallback_details
    (said,) = [line for line in lines if "fallback matrices" in line]
    assert said.startswith("plan: 4 fallback matrices") and "4 x 128x344" in said
    assert not any(line.startswith("fallback ") for line in lines)
    replicated, _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16", "optim.projectors=replicate")
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


def test_llama_7b_at_64_shards_projectors_and_lotus_is_under_adamw():
    """The done-when of issue 25 items 7-8: the shipped 7B recipe planned for 64 ranks."""
    from lotus_dist.distributed.step_time import GB

    lines: list[str] = []
    res = dry_run(load_config("configs/llama_7b.yaml", ["dist.world_size=64"]), out=lines.append)
    lotus, adamw = res["lotus"], res["adamw"]
    assert lotus["projector_choice"] == "shard" and lotus["total"] <= adamw["total"]
    # rank 0's row slice of each projector over 64 ranks: B (1024 x 4096) 16 rows, down_proj's A (4096 x 1024)
    # 64 rows; plus one whole 1024 x 4096 in use
    with torch.device("meta"):
        model = Llama(llama_config("llama_7b", vocab_size=32000))
    slices = sum(16 * 4096 if p.shape[0] >= p.shape[1] else 64 * 1024
                 for n, p in model.named_parameters() if n.split(".")[-2].endswith("_proj"))
    assert lotus["projectors"] == slices * 4 and lotus["projector_transient"] == 1024 * 4096 * 4
    assert any("projectors=auto -> shard" in line for line in lines)

    timing = res["step_time"]
    rows = timing["layouts"]
    names = {r["layout"].name for r in rows}
    assert {"FSDP 64, micro 4 x 2", "HSDP 8x8, micro 4 x 2"} <= names
    table = lines[lines.index(next(l for l in lines if l.startswith("layout"))) + 1:]
    for r in rows:  # every candidate printed with its step time and MFU
        assert any(l.startswith(r["layout"].name) and f"{r['step_s']:.3f}s" in l and f"{100 * r['mfu']:.1f}%" in l
                   for l in table), r["layout"].name
    # what the numbers say: flat FSDP pays every micro-batch's all-gather + reduce-scatter on the NIC, at least
    # accum x (AG + RS) / 50 GB/s; the recommendation is the fastest fitting layout, an HSDP one
    flat = [r for r in rows if r["layout"].replicate == 1]
    for r in flat:
        reductions = 1 if r["layout"].reduce_last else r["layout"].accum
        nic = (r["layout"].accum * lotus["all_gather"] + reductions * lotus["reduce_scatter"]) / (50 * GB)
        assert nic <= r["step_s"] <= 1.1 * nic + r["compute_s"]
    best = rows[0]
    assert best["step_s"] == min(r["step_s"] for r in rows) and best["layout"].replicate == 8
    assert best["step_s"] < min(r["step_s"] for r in flat)
    assert best["fits"] and best["mfu"] > timing["configured"]["mfu"]
    (rec,) = [l for l in lines if l.startswith("recommendation:")]
    assert rec.startswith(f"recommendation: {best['layout'].name}: {best['step_s']:.3f} s/step")
    assert "dist.replicate=8" in rec


def test_auto_replicates_where_sharding_costs_more():
    # one rank per shard group: the slices are the whole projectors, and one is gathered on top
    one, lines = run("model.name=tiny", "dist.world_size=1", "optim.rank=16")
    assert one["lotus"]["projector_choice"] == "replicate" and one["lotus"]["projector_transient"] == 0
    hsdp, _ = run("model.name=tiny", "dist.world_size=2", "dist.replicate=2", "optim.rank=16")
    assert hsdp["lotus"]["projector_choice"] == "replicate"
    # 2 ranks, rank 16: the projectors (7 x 16 x 128) weigh less than the rank's half of the block's weights
    small, _ = run("model.name=tiny", "model.n_layers=1", "dist.world_size=2", "optim.rank=16")
    assert small["lotus"]["projector_choice"] == small["lotus+per_layer"]["projector_choice"] == "replicate"
    # one block, full rank (128) over 8 ranks: the projectors outweigh the weight shard; whole-model steps gather
    # one of its 7 projectors at a time (shard), per-layer steps all 7 at once (replicate)
    wide = ("model.name=tiny", "model.n_layers=1", "dist.world_size=8", "optim.rank=128")
    block, _ = run(*wide)
    assert block["lotus"]["projector_choice"] == "shard"
    assert block["lotus+per_layer"]["projector_choice"] == "replicate"
    assert block["lotus+per_layer"]["projector_transient"] == 0
    assert block["lotus+per_layer"]["projectors"] == 7 * 128 * 128 * 4  # every projector of tiny is 128 x 128 here
    # auto's bytes are those of the explicit choice
    for key in ("shard", "replicate"):
        explicit, _ = run(*wide, f"optim.projectors={key}")
        chosen = block["lotus"] if key == "shard" else block["lotus+per_layer"]
        column = "lotus" if key == "shard" else "lotus+per_layer"
        assert chosen["total"] == explicit[column]["total"]


def test_lotus_int4_reference_is_planned_from_the_codecs_layout():
    """optim.reference_dtype=int4: the planned switch reference is the codec's bytes (r/2 + 12 per long-side index)
    of each rank-0 shard, under a tenth of the planned moments; bf16 is long x r x 2."""
    from lotus_dist.optim.reference_codes import reference_bytes

    planned = {}
    for form in ("bf16", "int4"):
        res, _ = run("model.name=llama_60m", "dist.world_size=1", "optim.rank=128", f"optim.reference_dtype={form}")
        planned[form] = res["lotus"]
    with torch.device("meta"):
        model = Llama(llama_config("llama_60m"))
    mats = [p.shape for n, p in model.named_parameters() if n.endswith("_proj.weight")]
    assert planned["int4"]["switch_state"] == sum(reference_bytes(max(s), 128, "int4") for s in mats)
    assert planned["bf16"]["switch_state"] == sum(max(s) * 128 * 2 for s in mats)
    assert planned["int4"]["switch_state"] <= 0.10 * (planned["int4"]["moments"] - 2 * 4 * sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith("_proj.weight")))


def test_apollo_state_is_galores_at_its_rank_plus_the_limiter_scalar():
    res, lines = run("model.name=tiny", "dist.world_size=4", "optim.rank=16")
    matrices = 7 * llama_config("tiny").n_layers
    assert res["apollo"]["moments"] == res["galore"]["moments"] + matrices * 4
    assert res["apollo"]["projectors"] == res["galore"]["projectors"]
    assert res["apollo"]["refresh"] == 0 and res["apollo_mini"]["refresh"] == 0  # drawn from the seed on every rank
    assert res["apollo_mini"]["moments"] < res["apollo"]["moments"]  # rank 1 whatever optim.rank says
    assert res["apollo_mini"]["lowrank_step"] == 3 * res["apollo"]["lowrank_step"] > 0
    assert any(line.startswith("per rank") and "apollo_mini" in line for line in lines)


def test_planned_moments_are_what_the_sharded_optimizer_allocates():
    """Rank 0's planned moments (fsdp, world 3: uneven rows and the down_proj fallbacks' column slices) equal the
    bytes of the tensors the sharded optimizer allocates on the same meta model, for every optim.state_dtype; the
    table has a row for each."""
    from lotus_dist.distributed.capacity import _mesh, _method_numbers, _model_config, _sharded, fake_process_group
    from lotus_dist.distributed.fsdp_optimizer import build_sharded_optimizer
    from lotus_dist.optim import memory_report
    from lotus_dist.optim.state_codes import STATE_DTYPES

    planned = {}
    for name in STATE_DTYPES:
        cfg = load_config(None, ["model.name=tiny", "dist.world_size=3", "optim.rank=16", f"optim.state_dtype={name}"])
        with fake_process_group(3):
            mesh = _mesh(3, 1)
            model, plan = _sharded(cfg, _model_config(cfg), mesh, 3, 1, "lotus")
            assert plan.fallbacks
            numbers = _method_numbers(cfg, model, plan, "lotus", 4, 4, "replicate")
            opt = build_sharded_optimizer(model, cfg.optim, plan, mesh)
            opt.init_state()
            assert numbers["moments"] == numbers[f"moments_{name}"] == memory_report(opt)["moments"], name
        planned[name] = numbers["moments"]
    assert planned["int8"] < planned["bf16"] < planned["fp32"]
    res, lines = run("model.name=tiny", "dist.world_size=2", "optim.rank=16", "optim.state_dtype=int8")
    assert any(line.startswith("  moments at state_dtype=int8") for line in lines)
    assert res["lotus"]["moments"] == res["lotus"]["moments_int8"] < res["lotus"]["moments_fp32"]
    assert res["lotus (ddp)"]["moments"] == res["lotus (ddp)"]["moments_int8"]


def test_bf16_projectors_halve_the_planned_projectors_and_their_gathers():
    """optim.projector_dtype=bf16: stored projectors at 2 bytes an element (tiny at r = 16: 4 layers x 7 matrices
    x 128 x 16), the sharded ones' all-gathers too; in use, one fp32 copy at a time (plus the bf16 gather when
    sharded); the owner backend's column, measured from the optimizer's own tensors, loses the same bytes."""
    elements = 4 * 7 * 128 * 16
    res = {}
    for layout in ("replicate", "shard"):
        for dtype in ("fp32", "bf16"):
            res[layout, dtype], _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16",
                                        f"optim.projectors={layout}", f"optim.projector_dtype={dtype}")
    for m in ("galore", "lotus"):
        assert res["replicate", "fp32"][m]["projectors"] == 4 * elements
        assert res["replicate", "bf16"][m]["projectors"] == 2 * elements
        assert res["shard", "bf16"][m]["projectors"] * 2 == res["shard", "fp32"][m]["projectors"]
        assert res["shard", "bf16"][m]["projector_gather"] * 2 == res["shard", "fp32"][m]["projector_gather"] > 0
        assert res["replicate", "bf16"][m]["projector_transient"] == 16 * 128 * 4  # the fp32 copy in use
        assert res["shard", "bf16"][m]["projector_transient"] == 16 * 128 * (2 + 4)
        for k in ("moments", "switch_state", "params", "grads"):
            assert res["replicate", "bf16"][m][k] == res["replicate", "fp32"][m][k]
    ddp_fp32, ddp_bf16 = res["replicate", "fp32"]["lotus (ddp)"], res["replicate", "bf16"]["lotus (ddp)"]
    assert sum(ddp_fp32["state_per_rank"]) - sum(ddp_bf16["state_per_rank"]) == 2 * elements


def test_int8_projectors_plan_a_code_an_element_and_a_scale_a_stored_row():
    """optim.projector_dtype=int8 (tiny at r = 16, per layer: six B projectors of 16 rows x 128 and w2's A, 128 rows
    x 16): 1 byte an element plus 4 per stored row, replicated or as rank 0's row slice; in use, one decoded fp32
    copy (sharded: beside its gathered codes and scales); the owner backend's column, measured from the optimizer's
    own tensors, equals the formula's saving."""
    elements, rows = 4 * 7 * 128 * 16, 4 * (6 * 16 + 128)
    res = {}
    for layout in ("replicate", "shard"):
        res[layout], _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16", f"optim.projectors={layout}",
                             "optim.projector_dtype=int8")
    fp32, _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16")
    for m in ("galore", "lotus"):
        assert res["replicate"][m]["projectors"] == elements + 4 * rows
        assert res["shard"][m]["projectors"] == (elements + 4 * rows) // 4  # every row count divides by 4
        assert res["replicate"][m]["projector_transient"] == 16 * 128 * 4  # the decoded fp32 copy in use
        assert res["shard"][m]["projector_transient"] == 128 * 16 * (1 + 4) + 128 * 4  # w2's A, the most rows
    saved = sum(fp32["lotus (ddp)"]["state_per_rank"]) - sum(res["replicate"]["lotus (ddp)"]["state_per_rank"])
    assert saved == 4 * elements - (elements + 4 * rows)


def test_planned_switch_statistics_are_the_policys_rows():
    """Per check step each projected matrix adds one row of the switch policy's fp32 partial sums (STATS_WIDTH of
    them) to the one batched all-reduce: the planned bytes are that row's ring all-reduce per matrix."""
    from lotus_dist.distributed.step_time import ring
    from lotus_dist.optim.switching import STATS_WIDTH

    res, _ = run("model.name=tiny", "dist.world_size=4", "optim.rank=16")
    matrices = 7 * llama_config("tiny").n_layers
    assert res["lotus"]["switch_check"] == matrices * 2 * ring(4) * STATS_WIDTH * 4


def test_replica_sync_bytes_at_7b_on_8_nodes_of_8():
    """dist.replica_sync=lowrank's planned replica bytes per ordinary step: R (long side / 8 x r) instead of each
    gradient shard; a hand count for one matrix and the 7B x (8 x 8) share of the projected matrices."""
    from lotus_dist.distributed.replica_sync import replica_step_bytes
    from lotus_dist.distributed.sharding_plan import plan_for_model

    with torch.device("meta"):
        model = Llama(llama_config(name="llama_7b"))
    plan = plan_for_model(model, 64, 1024, replicate=8)
    b = replica_step_bytes(plan)
    assert b["lowrank"]["plain"] == b["full"]["plain"]
    assert b["lowrank"]["projected"] <= 0.35 * b["full"]["projected"]
    one = plan.matrices["layers.0.mlp.down_proj.weight"] if "layers.0.mlp.down_proj.weight" in plan.matrices else \
        next(iter(plan.matrices.values()))
    m, n = one.shape
    long = one.shape[one.state_dim]
    ring = 2 * 7 / 8
    solo = replica_step_bytes(type(plan)(world_size=64, replicate=8, matrices={one.name: one}, unprojected={}))
    assert solo["full"]["projected"] == ring * (m * n // 8) * 4
    assert solo["lowrank"]["projected"] == ring * (-(-long // 8)) * one.rank * 4
