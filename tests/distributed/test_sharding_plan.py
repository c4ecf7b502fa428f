"""The plan as a pure function of shapes and world size; no process group except a fake one for the FSDP2 rule."""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.distributed.sharding_plan import build_plan, default_projected, lpt_assign, plan_for_model, projector_side
from lotus_dist.model.llama import Llama, llama_config


def meta_model(name: str, **overrides) -> Llama:
    with torch.device("meta"):
        return Llama(llama_config(name, **overrides))


def shapes_of(model: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_side_rule_and_shard_dim():
    shapes = {"tall": (300, 100), "square": (64, 64), "wide": (100, 300)}
    plan = build_plan(shapes, set(shapes), world_size=4, rank_r=16)
    tall, square, wide = (plan.matrices[k] for k in ("tall", "square", "wide"))
    assert (tall.side, tall.shard_dim, tall.projector_shape, tall.state_shape) == ("right", 0, (16, 100), (300, 16))
    assert (square.side, square.shard_dim) == ("right", 0)  # m >= n includes square
    assert (wide.side, wide.shard_dim, wide.projector_shape, wide.state_shape) == ("left", 1, (100, 16), (16, 300))
    assert not any(p.fallback for p in plan.matrices.values())
    # Sharding follows the states, so reverse_std puts tall matrices on Shard(1).
    rev = build_plan(shapes, set(shapes), world_size=4, rank_r=16, proj_type="reverse_std")
    assert (rev.matrices["tall"].side, rev.matrices["tall"].shard_dim) == ("left", 1)
    assert projector_side(5, 5, "left") == "left" and projector_side(5, 9, "right") == "right"
    with pytest.raises(ValueError, match="proj_type"):
        projector_side(5, 5, "diagonal")


def test_rank_is_capped_by_the_short_side():
    plan = build_plan({"w": (8, 40)}, {"w"}, world_size=2, rank_r=128)
    assert plan.matrices["w"].rank == 8 and plan.matrices["w"].projector_shape == (8, 8)


@pytest.mark.parametrize("world", [2, 4])
def test_llama_1b_ffn_5461_falls_back(world):
    model = meta_model("llama_1b")
    plan = build_plan(shapes_of(model), default_projected(model), world_size=world, rank_r=512)
    assert len(plan.matrices) == 24 * 7
    fallbacks = {p.name for p in plan.fallbacks}
    assert fallbacks == {f"layers.{i}.mlp.down_proj.weight" for i in range(24)}  # 2048 x 5461: left, 5461 odd
    down = plan.matrices["layers.0.mlp.down_proj.weight"]
    assert down.side == "left" and down.shard_dim == 0 and "5461" in down.reason
    up = plan.matrices["layers.0.mlp.up_proj.weight"]  # 5461 x 2048: rows, uneven Shard(0) is fine
    assert (up.side, up.shard_dim, up.fallback) == ("right", 0, False)
    assert all(plan.placement(n).dim == 0 for n in plan.unprojected)
    lines = plan.summary(details="run/plan_fallbacks.txt")
    assert "24 fallback" in lines[0]
    # one line for the 24 alike (count, shape, why, where the list is), each matrix in the details
    (line,) = [s for s in lines if "fallback matrices" in s]
    assert line.startswith("plan: 24 fallback matrices (each matrix in run/plan_fallbacks.txt): 24 x 2048x5461: "
                           "n=5461 not divisible"), line
    assert sum("fallback" in s for s in lines) == 2
    details = plan.fallback_details()
    assert len(details) == 24 and details[0] == f"fallback layers.0.mlp.down_proj.weight 2048x5461: {down.reason}"


def test_llama_7b_at_64_needs_no_fallback_and_hsdp_uses_shard_size():
    model = meta_model("llama_7b")
    assert build_plan(shapes_of(model), default_projected(model), 64, 512).fallbacks == []
    # 2 x 3 HSDP: divisibility is checked against the shard group (3), not the world (6).
    shapes = {"w": (64, 172)}
    assert build_plan(shapes, {"w"}, 6, 8, replicate=3).matrices["w"].fallback is False  # shard 2
    assert build_plan(shapes, {"w"}, 6, 8, replicate=2).matrices["w"].fallback is True  # shard 3
    with pytest.raises(ValueError, match="replicate"):
        build_plan(shapes, {"w"}, 6, 8, replicate=4)


def test_lpt_owner_balance_within_bound():
    rng = random.Random(0)
    costs = {f"m{i}": rng.choice([1.0, 3.0, 7.0]) * rng.uniform(0.5, 2.0) for i in range(97)}
    for bins in (2, 3, 8, 64):
        owners = lpt_assign(costs, bins)
        loads = [0.0] * bins
        for k, b in owners.items():
            loads[b] += costs[k]
        total, biggest = sum(costs.values()), max(costs.values())
        # Graham's list-scheduling bound (LPT is a list schedule), in observable quantities.
        assert max(loads) <= total / bins + (1 - 1 / bins) * biggest + 1e-9
        if bins <= 8:  # many jobs per bin: LPT is close to the lower bound max(total/bins, biggest)
            assert max(loads) <= 1.05 * max(total / bins, biggest)
        assert owners == lpt_assign(dict(reversed(list(costs.items()))), bins)  # deterministic on every rank


def test_llama_owner_balance_and_range():
    model = meta_model("llama_1b")
    plan = build_plan(shapes_of(model), default_projected(model), 8, 512, solver="svd", replicate=2)
    loads = [0.0] * plan.shard_size
    for p in plan.matrices.values():
        assert 0 <= p.owner < plan.shard_size
        loads[p.owner] += p.cost
    assert max(loads) / (sum(loads) / len(loads)) < 1.05  # 168 matrices over 4 owners balance closely


def test_shard_placement_fn_by_name_and_param():
    model = Llama(llama_config("tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=96))
    plan = plan_for_model(model, world_size=2, rank_r=4)
    down = model.layers[0].mlp.down_proj.weight
    assert plan.shard_placement_fn(down).dim == 1
    assert plan.shard_placement_fn("layers.0.mlp.down_proj.weight").dim == 1
    assert plan.shard_placement_fn(model.embed_tokens.weight).dim == 0
    with pytest.raises(KeyError, match="bind"):
        plan.shard_placement_fn(nn.Parameter(torch.zeros(2, 2)))
    other = Llama(llama_config("tiny", vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=64))
    with pytest.raises(ValueError, match="shape"):
        plan.bind(other)


@pytest.fixture
def fake_world3():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=3)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_rejects_uneven_shard1_as_the_plan_assumes(fake_world3):
    """The fallback rule mirrors torch: FSDP2 pads uneven Shard(0) but raises on uneven Shard(1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (3,))
    with pytest.raises(NotImplementedError, match="uneven sharding on dim 1"):
        fully_shard(nn.Linear(172, 64, bias=False), mesh=mesh, shard_placement_fn=lambda p: Shard(1))
    ok = fully_shard(nn.Linear(174, 64, bias=False), mesh=mesh, shard_placement_fn=lambda p: Shard(1))
    assert ok.weight.to_local().shape == (64, 58)
    uneven0 = fully_shard(nn.Linear(64, 172, bias=False), mesh=mesh, shard_placement_fn=lambda p: Shard(0))
    assert uneven0.weight.to_local().shape == (58, 64)
    plan = build_plan({"a": (64, 172), "b": (64, 174)}, {"a", "b"}, 3, 8)
    assert plan.matrices["a"].fallback and not plan.matrices["b"].fallback


def test_choose_projectors_shards_when_the_peak_is_lower():
    """optim.projectors=auto, by hand: replicated = every projector whole; sharded = rank 0's row slices plus the
    one projector (per layer: the one unit's) gathered at a time."""
    from lotus_dist.distributed.sharding_plan import DistConfigError, choose_projectors, projector_peak_bytes

    even = build_plan({"tall": (300, 100), "wide": (100, 300)}, {"tall", "wide"}, world_size=4, rank_r=16)
    # tall: right B 16 x 100, rows 4 per rank; wide: left A 100 x 16, rows 25 per rank; fp32
    assert projector_peak_bytes(even, "replicate") == {"stored": 3200 * 4, "in_use": 0, "total": 3200 * 4}
    assert projector_peak_bytes(even, "shard") == {"stored": (400 + 400) * 4, "in_use": 1600 * 4,
                                                   "total": 2400 * 4}
    # sharding lowers the peak (2400 < 3200 x 4 bytes), but the projectors weigh less than this rank's shard of the
    # weights (75 x 100 + 25 x 300 = 15000 x 4 bytes): not worth an all-gather of each projector every step
    assert choose_projectors("auto", even) == "replicate"
    assert choose_projectors("replicate", even) == "replicate" and choose_projectors("shard", even) == "shard"
    # full rank (r = 100): 20000 elements of projectors outweigh the 15000 of the weight shard, and sharding them
    # gives 2 x 2500 stored + 10000 gathered = 15000 < 20000
    heavy = build_plan({"tall": (300, 100), "wide": (100, 300)}, {"tall", "wide"}, world_size=4, rank_r=100)
    assert projector_peak_bytes(heavy, "shard")["total"] == 15000 * 4
    assert choose_projectors("auto", heavy) == "shard"
    assert choose_projectors("auto", heavy, solver="online_pca") == "replicate"  # online_pca trains it in place
    assert choose_projectors("auto", heavy, solver="rsvd") == "shard"
    with pytest.raises(DistConfigError, match="optim.solver=online_pca trains its projector in place"):
        choose_projectors("shard", heavy, solver="online_pca")
    # at 32 ranks the rank-16 projectors (3200) outweigh the weight shard (10 x 100 + 4 x 300 = 2200): shard
    wide_world = build_plan({"tall": (300, 100), "wide": (100, 300)}, {"tall", "wide"}, world_size=32, rank_r=16)
    assert choose_projectors("auto", wide_world) == "shard"
    # one projector is most of them: gathering it costs more than the slices save (16000 > 16100 - 4030)
    lopsided = build_plan({"big": (1000, 1000), "small": (10, 10)}, {"big", "small"}, world_size=4, rank_r=16)
    assert projector_peak_bytes(lopsided, "shard")["total"] == (4000 + 30 + 16000) * 4
    assert choose_projectors("auto", lopsided) == "replicate"
    # shard size 1 (one rank, or HSDP with one rank per replica): slicing saves nothing
    assert choose_projectors("auto", build_plan({"tall": (300, 100)}, {"tall"}, 2, 16, replicate=2)) == "replicate"
    # per layer, a unit's projectors are gathered together: three 16 x 100 in one unit, over 2 ranks:
    # 3 x 800 + 1600 < 4800 one at a time, 3 x 800 + 4800 > 4800 the unit at once
    # (full rank, r = 100, over 4 ranks, so that the projectors outweigh the weight shard: 3 x 10000 > 3 x 75 x 100)
    unit = {f"layers.0.{k}.weight": (300, 100) for k in "abc"}
    three = build_plan(unit, set(unit), world_size=4, rank_r=100)
    assert projector_peak_bytes(three, "shard", per_layer=True)["in_use"] == 3 * 10000 * 4
    assert choose_projectors("auto", three) == "shard"  # 3 x 2500 + 10000 < 30000
    assert choose_projectors("auto", three, per_layer=True) == "replicate"  # 3 x 2500 + 30000 > 30000
