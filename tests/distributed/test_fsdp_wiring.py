"""FSDP2 on gloo: planned placements, equivalence with one process, DCP resharding across world sizes.

Three launches in all (world 2, 3, 4); the world-2 launch writes the checkpoint the others reload.
"""

from __future__ import annotations

import pytest
import torch

from lotus_dist.distributed.dcp_util import load_sharded
from lotus_dist.model.llama import Llama

import dist_workers as workers  # tests/distributed is on sys.path (pyproject's pythonpath)
from dist_spawn import run_workers

pytestmark = pytest.mark.slow  # 2-4 gloo ranks (dist_spawn)

TOL = 1e-5


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    work = tmp_path_factory.mktemp("fsdp")
    ckpt = work / "ckpt_w2"
    res = run_workers(2, {"tag": "w2", "equiv": True, "save": str(ckpt)}, work)
    return work, ckpt, res


def _assert_equivalent(res):
    # meta start-up: sharded, then materialised shard by shard: the single-process weights, bit for bit
    assert res["meta_init_equal"] and res["meta_init_dtensors"], res
    assert res["loss_diff"] < TOL, res
    assert res["grad_diff"] < TOL, res
    assert res["param_diff"] < TOL, res


def test_world2_placements_equivalence_and_save(world2):
    _, ckpt, res = world2
    pl = res["placements"]
    # m >= n: right projector, rows sharded; down_proj (64 x 172, m < n): left projector, columns sharded.
    assert pl["layers.0.self_attn.q_proj.weight"] == ["Shard(dim=0)"]
    assert pl["layers.0.mlp.gate_proj.weight"] == ["Shard(dim=0)"]
    assert pl["layers.0.mlp.down_proj.weight"] == ["Shard(dim=1)"]
    assert res["local_shapes"]["layers.1.mlp.down_proj.weight"] == [64, 86]
    assert pl["embed_tokens.weight"] == ["Shard(dim=0)"] and pl["norm.weight"] == ["Shard(dim=0)"]
    assert res["fallbacks"] == []
    _assert_equivalent(res)
    assert (ckpt / ".metadata").exists()


def test_world3_fallback_equivalence_and_reload(world2):
    work, ckpt, _ = world2
    res = run_workers(3, {"tag": "w3", "equiv": True, "load": str(ckpt)}, work)
    # 172 columns do not split over 3 ranks: FSDP2 would refuse Shard(1), the plan falls back to Shard(0).
    assert res["placements"]["layers.0.mlp.down_proj.weight"] == ["Shard(dim=0)"]
    assert res["fallbacks"] == ["layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"]
    assert res["local_shapes"]["layers.0.mlp.gate_proj.weight"] == [58, 64]  # uneven Shard(0) is fine
    _assert_equivalent(res)
    assert res["load_diff"] == 0.0 and res["load_extra_step"] == workers.STEPS and res["load_placements_ok"]


def test_world4_hsdp_equivalence_and_reload(world2):
    work, ckpt, _ = world2
    res = run_workers(4, {"tag": "w4", "replicate": 2, "equiv": True, "load": str(ckpt), "flat_load": True}, work)
    assert res["mesh"] == ["replicate", "shard"]
    assert res["placements"]["layers.0.mlp.down_proj.weight"] == ["Replicate()", "Shard(dim=1)"]
    _assert_equivalent(res)
    assert res["load_diff"] == 0.0 and res["load_extra_step"] == workers.STEPS  # into the 2 x 2 HSDP model
    assert res["flat_load_diff"] == 0.0  # into a plain 4-rank FSDP model


def test_world1_reload_without_fsdp(world2):
    work, ckpt, _ = world2
    reference = torch.load(work / "reference_states.pt")
    torch.manual_seed(5)
    model = Llama(workers.CFG)
    opt = torch.optim.AdamW(model.parameters(), **workers.ADAMW)
    extra = load_sharded(str(ckpt), model, opt, extra={"step": 0})
    assert extra["step"] == workers.STEPS
    assert workers.max_diff(workers.full_states(model, opt), reference) == 0.0


def test_runtime_single_process_and_errors(monkeypatch):
    from lotus_dist.distributed.runtime import DistConfigError, Runtime, build_mesh, init_distributed
    from lotus_dist.train.config import DistConfig

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    rt = init_distributed(DistConfig())
    assert (rt.rank, rt.world_size, rt.is_distributed, rt.backend) == (0, 1, False, None)
    assert rt.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert build_mesh(rt, 1) is None
    with pytest.raises(DistConfigError, match="torchrun"):
        build_mesh(rt, 2)
    with pytest.raises(DistConfigError, match="not divisible by dist.replicate=4"):
        build_mesh(Runtime(0, 6, 0, torch.device("cpu"), "gloo", True), 4)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistConfigError, match="dist.mode=single"):
        init_distributed(DistConfig(mode="single"))
    if not torch.cuda.is_available():
        with pytest.raises(DistConfigError, match="nccl needs CUDA"):
            init_distributed(DistConfig(backend="nccl"))
