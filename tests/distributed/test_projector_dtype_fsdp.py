"""optim.projector_dtype=bf16 | int8 under fsdp with optim.projectors=shard at 2 ranks (gloo): the run equals one
process with the same projector format, a DCP checkpoint of the rounded state resumes bit for bit, and the projector
all-gathers move the stored format's bytes (the counters, lotus_dist/counters.py, against the gathered shapes; int8
gathers its codes with their row scales, one uint8 tensor)."""

from __future__ import annotations

import pytest
import torch

import fsdp_optimizer_workers as sw  # tests/distributed is on sys.path (pyproject's pythonpath)
from dist_spawn import run_workers

pytestmark = pytest.mark.slow  # 2 gloo ranks (dist_spawn)

TOL = 1e-5  # relative, per parameter, as test_fsdp_optimizer.py
BF16 = {"projectors": "shard", "projector_dtype": "bf16"}
INT8 = {"projectors": "shard", "projector_dtype": "int8"}


def _gathered_bytes(ops: list, world: int, element: int) -> float:
    """What the ring all-gathers of these ops send from one rank: (W-1)/W of the whole gathered tensor, whose
    elements are W times the piece each rank sends (the op's recorded shape)."""
    return sum((world - 1) / world * world * torch.Size(shape).numel() * element
               for name, shape in ops if name == "all_gather")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    work = tmp_path_factory.mktemp("projector_dtype")
    runs = [{"key": "bf16", "method": "lotus", "extra": BF16, "save": str(work / "ckpt"), "same_world_resume": True},
            {"key": "int8", "method": "lotus", "extra": INT8, "save": str(work / "ckpt8"), "same_world_resume": True},
            {"key": "stored", "method": "lotus", "extra": {"projectors": "shard"}}]  # the default: the state dtype
    res = run_workers(2, {"suite": "sharded_optim", "tag": "pdt", "runs": runs}, work)
    return res, torch.load(work / "pdt.params.pt")


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_rounded_sharded_projectors_equal_one_process_and_resume_bit_for_bit(launched, dtype):
    res, params = launched
    ref_params, ref_log = sw.reference_run("lotus", projector_dtype=dtype)
    plain_params, _ = sw.reference_run("lotus")
    got = params[dtype]
    rel = max(((got[k] - ref_params[k]).abs().max() / ref_params[k].abs().max()).item() for k in ref_params)
    assert rel < TOL, rel
    assert res[f"{dtype}.decisions_agree"] and res[f"{dtype}.decisions"] == ref_log
    assert ref_log[-1] and min(ref_log[-1]) >= 2  # bases were stored (rounded) several times
    # the rounding is visible: the run is not the default one
    assert max(((got[k] - plain_params[k]).abs().max() / plain_params[k].abs().max()).item() for k in got) > 1e-4
    assert all(torch.equal(got[k], params[f"{dtype}.resumed"][k]) for k in got)


def test_the_projector_gathers_move_the_stored_dtypes_bytes(launched):
    """Every all-gather of these runs is a projector's (no fallback at world 2): the counted bytes per step are the
    gathered shapes at 2 bytes an element in bf16 and 8 for the default (fp64 parameters here: the state dtype)."""
    res, _ = launched
    for key, element in (("bf16", 2), ("int8", 1), ("stored", 8)):  # int8: the op's shape has the scale bytes
        steps = [r for r in res[f"{key}.budget"] if any(name == "all_gather" for name, _ in r["ops"])]
        # sharded projectors are gathered at every step after the first (which stores the first bases)
        assert [r["step"] for r in steps] == [r["step"] for r in res[f"{key}.budget"] if r["live"]] == list(range(1, 30))
        for r in steps:
            assert r["bytes"]["all_gather"] == pytest.approx(_gathered_bytes(r["ops"], 2, element)), (key, r["step"])
    # same gathers step for step (the decisions match here), a quarter of the bytes: bf16 against fp64
    same = [(a, b) for a, b in zip(res["bf16.budget"], res["stored.budget"])
            if [op for op in a["ops"] if op[0] == "all_gather"] == [op for op in b["ops"] if op[0] == "all_gather"]]
    assert len(same) > len(res["bf16.budget"]) // 2
    for a, b in same:
        assert a["bytes"].get("all_gather", 0) * 4 == pytest.approx(b["bytes"].get("all_gather", 0))
