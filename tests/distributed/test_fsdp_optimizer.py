"""The low-rank optimizer sharded under FSDP2 (gloo): same trajectory as one process, identical switch decisions
on every rank, distributed rsvd = single-process rsvd, the per-step collective budget, DCP resume at the same and
at other world sizes.

Three launches (world 2, 3, 4). 172 = the FFN width does not split over 3 ranks, so world 3 runs the two
``down_proj`` matrices as fallbacks (Shard(0); Aᵀ G reduce-scattered by columns, the r x 172 state sharded 58/58/56,
the update all-gathered) with uneven row shards (22/22/20),
and the ``gate``/``up`` rows shard unevenly (58/58/56); ``projectors=shard`` slices r = 8 rows unevenly over 3.
"""

from __future__ import annotations

import pytest
import torch

import fsdp_optimizer_workers as sw  # tests/distributed is on sys.path (pyproject's pythonpath)
from dist_spawn import run_workers
from lotus_dist.distributed.dcp_util import load_sharded
from lotus_dist.model.llama import Llama
from lotus_dist.optim import build_optimizer

pytestmark = pytest.mark.slow  # 2-4 gloo ranks (dist_spawn)

TOL = 1e-5  # relative, per parameter: max |Δ| / max |reference|
Q = sw.OPTIM["power_iters"]
METHODS = ("lotus", "galore", "adamw")
RHO = dict(window=4, t_min=4, gamma=0.6)  # lotus_rho (path_efficiency): some windows switch, some do not
INT4 = dict(reference_dtype="int4")  # the compact switch reference: codes per long-side index, sharded like a moment
# optim.state_dtype=int8 at rank 32: the gate/up/down moments (172 x 32) are int8 codes, q/k/v/o's (64 x 32, under
# 4096 elements) stay fp32, the embedding's and lm_head's are coded row by row; the projectors int8 too, sharded by
# rows (codes with their row scales, one uint8 tensor: 32 rows of B split 16/16 and 11/11/10)
INT8 = dict(state_dtype="int8", rank=32, projector_dtype="int8", projectors="shard")


@pytest.fixture(scope="module")
def references():
    out = {m: sw.reference_run(m) for m in METHODS}
    out["rho"] = sw.reference_run("lotus_rho", **RHO)
    out["fira"] = sw.reference_run("fira")
    out["int4"] = sw.reference_run("lotus", **INT4)
    out["int8"] = sw.reference_run("lotus", **INT8)
    for m in ("lotus", "galore", "rho", "fira", "int4"):
        assert out[m][1][-1] and min(out[m][1][-1]) >= 2, f"{m}: the run must switch bases: {out[m][1][-1]}"
    return out


def _launch(world: int, work, extra_runs: list, base: dict | None = None, **options) -> tuple[dict, dict]:
    """``base``: per method, more options for its plain run (world 2's lotus run also saves and resumes: the same
    run checks the equivalence, the budget and the checkpoint, instead of a second identical 30-step run)."""
    runs = [{"key": m, "method": m, **(base or {}).get(m, {})} for m in METHODS] + extra_runs
    res = run_workers(world, {"suite": "sharded_optim", "tag": f"w{world}", "rsvd": True, "runs": runs, **options},
                      work)
    return res, torch.load(work / f"w{world}.params.pt")


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    work = tmp_path_factory.mktemp("sharded_optim")
    ckpt = work / "ckpt_lotus_w2"
    extra = [{"key": "lotus_shardproj", "method": "lotus", "extra": {"projectors": "shard"}},
             {"key": "int4", "method": "lotus", "extra": INT4, "save": str(work / "ckpt_int4_w2")},
             {"key": "int8", "method": "lotus", "extra": INT8, "save": str(work / "ckpt_int8_w2"),
              "same_world_resume": True}]
    res, params = _launch(2, work, extra, base={"lotus": {"save": str(ckpt), "same_world_resume": True}}, peak=True)
    return work, ckpt, res, params


@pytest.fixture(scope="module")
def world3(world2):
    work, ckpt, _, _ = world2
    extra = [{"key": "lotus_resumed", "method": "lotus", "resume": str(ckpt)},
             {"key": "lotus_shardproj", "method": "lotus", "extra": {"projectors": "shard"}},
             {"key": "rho", "method": "lotus_rho", "extra": RHO},
             {"key": "fira", "method": "fira"},  # its residual needs the fallback's whole R and N: all-gathered
             {"key": "int4_resumed", "method": "lotus", "extra": INT4, "resume": str(work / "ckpt_int4_w2")},
             {"key": "int8", "method": "lotus", "extra": INT8},
             {"key": "int8_resumed", "method": "lotus", "extra": INT8, "resume": str(work / "ckpt_int8_w2")}]
    return _launch(3, work, extra)


@pytest.fixture(scope="module")
def world4(world2):
    work, ckpt, _, _ = world2
    return _launch(4, work, [{"key": "lotus_resumed", "method": "lotus", "resume": str(ckpt)},
                             {"key": "lotus_hsdp", "method": "lotus", "replicate": 2}])


def _rel_diff(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    return max(((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)).item() for k in ref)


def _check_equivalence(res, params, references, keys):
    for key in keys:
        method = "rho" if key == "rho" else key.split("_")[0]
        ref_params, ref_log = references[method]
        assert _rel_diff(params[key], ref_params) < TOL, key
        assert res[f"{key}.decisions_agree"], key  # every rank: the same switch counts at every step
        if method != "adamw":
            assert res[f"{key}.decisions"] == ref_log, key  # ... and the single process's switch steps


def _count(ops, name):
    return sum(1 for op, _ in ops if op == name)


def _rsvd_rounds(normal: int, fallback: int, q: int) -> int:
    """All-reduces of a batched rsvd refresh (solver_rounds.run_batched): the solvers advance in lockstep and each round's
    sums are one flat all-reduce per dtype (one dtype here: the parameters, so the solvers, are fp64). A normal
    matrix sums in q + 2 rounds (the sketch, q power steps, the Gram); a fallback runs CholeskyQR2 (two sums, each
    followed by a definiteness check on the host) around the sums over its sharded rows, then gathers its basis."""
    normal_seq = ["sum"] * (q + 2) if normal else []
    orth = ["sum", "host", "sum", "host"]
    fallback_seq = (orth + (["sum"] + orth) * q + ["sum", "gather"]) if fallback else []
    rounds = max(len(normal_seq), len(fallback_seq))
    return sum("sum" in {seq[i] for seq in (normal_seq, fallback_seq) if i < len(seq)} for i in range(rounds))


def _check_budget(record: list, method: str, shard_projectors: bool = False):
    """The collectives optimizer.step() issued, step by step, against docs/algorithms.md section 11's budget: a refresh
    costs a fixed number of collectives per solver stage (or per owner), whatever the number of matrices."""
    for r in record:
        ops, rows, fb, sw_n, sw_f = r["ops"], r["rows"], r["fallback_live"], r["switched"], r["switched_fallback"]
        # projector all-gathers: one per live matrix, and a second for a checking one that stays (it gives its
        # projector back while the step's decisions wait for the statistics; a switching one uses its new basis)
        stayed = r["checks"] - (sw_n + sw_f if r["checks"] else 0)
        gathers = r["live"] + stayed if shard_projectors else 0
        # fallback, all of them together: R reduce-scattered by columns (each step, and again after a switch; a
        # scheduled switch, galore's, is projected only in its new basis); the update all-gathered. (The two
        # down_proj fallbacks share a schedule, so their updates happen in the same phase of the step.)
        scheduled = sw_f if method == "galore" and fb else 0
        fallback = {"reduce_scatter": int(fb - scheduled > 0) + int(sw_f > 0),
                    "all_gather": int(r["updated_fallback"] > 0)}
        if method == "adamw":
            want = {"all_reduce": 0, "all_gather": 0, "gather": 0, "broadcast": 0, "reduce_scatter": 0}
        elif method == "galore":  # exact svd on the owners: one gather and one broadcast per owner of a switch
            owners = r["switch_owners"]
            want = {"all_reduce": int(rows > 0), "all_gather": gathers + fallback["all_gather"], "gather": owners,
                    "broadcast": owners, "reduce_scatter": fallback["reduce_scatter"]}
        else:  # batched rsvd; a fallback's new basis is all-gathered once for all of them
            want = {"all_reduce": (rows > 0) + _rsvd_rounds(sw_n, sw_f, Q),
                    "all_gather": gathers + (sw_f > 0) + fallback["all_gather"], "gather": 0, "broadcast": 0,
                    "reduce_scatter": fallback["reduce_scatter"]}
        got = {k: _count(ops, k) for k in want}
        assert got == want and len(ops) == sum(want.values()), (method, r)
        if rows:  # the one batched statistics all-reduce: [L, 3] fp32, L = the matrices checking this step
            assert ops.count(["all_reduce", [rows, 3]]) == 1, r
        if rows == 0 and fb == 0 and sw_n + sw_f == 0 and not shard_projectors:
            assert ops == [], r  # a plain step: no communication at all


def test_world2_equivalence_decisions_budget(world2, references):
    _, _, res, params = world2
    assert res["fallbacks"] == []
    _check_equivalence(res, params, references, ["lotus", "galore", "adamw", "lotus_shardproj"])
    for key, method in (("lotus", "lotus"), ("galore", "galore"), ("adamw", "adamw")):
        _check_budget(res[f"{key}.budget"], method)
    _check_budget(res["lotus_shardproj.budget"], "lotus", shard_projectors=True)
    plain = [r for r in res["lotus.budget"] if r["rows"] == 0 and r["switched"] == 0]
    assert plain and all(r["ops"] == [] for r in plain)  # steps without checks or switches: no communication


def test_world2_sharded_projectors_lower_the_measured_step_peak(world2, references):
    """optim.projectors=shard: a step gathers one projector at a time and frees it, so the measured peak of a step
    (projectors at rest + what the step adds) is below the replicated one by the projectors' (W-1)/W, less one
    bucket: the largest projector, whole, plus the slice this rank sends for it, plus the previous gather's slice,
    which gloo's worker thread may still hold when wait() has returned (it drops its reference to a finished work's
    input on its own thread: seen on a loaded machine, 8 KiB more at this size)."""
    peak = world2[2]["peak"]
    bucket = peak["largest"] * (1 + 2 / 2)
    saved = peak["projector_bytes"] * (2 - 1) / 2 - bucket
    assert peak["shard"]["resting"] * 2 == peak["replicate"]["resting"] == peak["projector_bytes"]
    for step in ("plain", "check"):
        assert peak["replicate"][step] - peak["shard"][step] >= saved, (step, peak)


def test_world2_state_dict_layout_and_same_world_resume(world2, references):
    _, _, res, params = world2
    kinds = res["lotus.state_kinds"]
    gate, down = kinds["layers.0.mlp.gate_proj.weight"], kinds["layers.0.mlp.down_proj.weight"]
    assert gate["exp_avg"] == gate["exp_avg_sq"] == gate["d_init"] == "(Shard(dim=0),)"  # moments: like W
    assert down["exp_avg"] == "(Shard(dim=1),)"
    assert gate["projector"] == down["projector"] == "(Replicate(),)"
    assert gate["step"] == gate["n_bases"] == gate["tau"] == "int"
    assert kinds["embed_tokens.weight"]["exp_avg"] == "(Shard(dim=0),)"
    # a fresh model + optimizer loaded from the step-15 checkpoint continues bit for bit
    straight, resumed = params["lotus"], params["lotus.resumed"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_world3_fallback_equivalence_budget_and_resume(world3, references):
    res, params = world3
    assert res["fallbacks"] == ["layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"]
    # lotus_rho: path_efficiency's sketch Ψ G sums over the sharded rows of the fallback (all-reduced)
    _check_equivalence(res, params, references, ["lotus", "galore", "adamw", "lotus_shardproj", "rho", "fira"])
    _check_budget(res["lotus.budget"], "lotus")
    _check_budget(res["galore.budget"], "galore")
    _check_budget(res["lotus_shardproj.budget"], "lotus", shard_projectors=True)
    assert all(r["fallback_live"] == 2 for r in res["lotus.budget"][1:])
    # the fallback's r x 172 state is sharded by columns (58/58/56), like a moment of a normal matrix
    assert res["lotus.fallback_state"] == [[sw.RANK_R, c] for c in (58, 58, 56)]
    # 2 -> 3: Shard(1) states stay Shard(1), now by columns of a row-sharded weight; the trajectory goes on
    assert _rel_diff(params["lotus_resumed"], references["lotus"][0]) < TOL
    assert res["lotus_resumed.decisions"] == references["lotus"][1][sw.SAVE_AT:]
    assert res["lotus_resumed.decisions_agree"]


def test_int4_reference_world2_equals_one_process_and_its_checkpoint_resumes_at_world3(world2, world3, references):
    """optim.reference_dtype=int4 at world 2 (codes, scales and norms Shard(0) like the moments): the same trajectory
    and switch steps as one process; its step-15 checkpoint loads at world 3 (uneven long-side shards, fallbacks
    whose r x 172 state is sharded by columns) and continues as the single process did."""
    _, _, res2, params2 = world2
    _check_equivalence(res2, params2, references, ["int4"])
    kinds = res2["int4.state_kinds"]["layers.0.mlp.gate_proj.weight"]
    assert kinds["d_codes"] == kinds["d_scale"] == kinds["d_top"] == kinds["d_norm_sq"] == "(Shard(dim=0),)"
    assert "d_init" not in kinds
    res3, params3 = world3
    assert _rel_diff(params3["int4_resumed"], references["int4"][0]) < TOL
    assert res3["int4_resumed.decisions"] == references["int4"][1][sw.SAVE_AT:]
    assert res3["int4_resumed.decisions_agree"]


def test_world4_equivalence_hsdp_and_resume(world4, references):
    res, params = world4
    assert res["fallbacks"] == []
    _check_equivalence(res, params, references, ["lotus", "galore", "adamw", "lotus_hsdp"])
    _check_budget(res["lotus.budget"], "lotus")
    # HSDP 2 x 2: every replica group reduces over its own shard group only
    assert res["lotus_hsdp.placements"] == "(Replicate(), Shard(dim=1))"
    _check_budget(res["lotus_hsdp.budget"], "lotus")
    assert _rel_diff(params["lotus_resumed"], references["lotus"][0]) < TOL
    assert res["lotus_resumed.decisions"] == references["lotus"][1][sw.SAVE_AT:]


def test_world1_reload_of_the_sharded_checkpoint_continues(world2, references):
    """The world-2 checkpoint (DTensor moments) into one process without FSDP: same trajectory."""
    _, ckpt, _, _ = world2
    torch.manual_seed(5)
    model = Llama(sw.CFG).to(sw.DTYPE)
    opt = build_optimizer(model, sw.optim_cfg("lotus"))
    load_sharded(str(ckpt), model, opt)
    log = []
    for step in range(sw.SAVE_AT, sw.STEPS):
        x, y = sw.batch(step)
        sw.loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append([opt.state[p]["n_bases"] for p in sw.projected(opt)])
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert _rel_diff(params, references["lotus"][0]) < TOL
    assert log == references["lotus"][1][sw.SAVE_AT:]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_distributed_rsvd_equals_single_process(world, world2, world3, world4):
    res = {2: world2[2], 3: world3[0], 4: world4[0]}[world]
    for tag, r in res["rsvd"].items():
        if tag == "batched":
            continue
        assert r["same_on_ranks"], (world, tag)
        assert r["diff"] < 1e-5, (world, tag, r)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_batched_refresh_equals_per_matrix_and_owners_solve_their_own(world, world2, world3, world4):
    """Three rsvd solves in lockstep give the bases each gives alone, with one all-reduce per stage for all three
    (q + 2 of them, plus the fallback's own stages) instead of one per matrix and stage; six exact svd solves on
    their owners: each rank solves exactly the matrices it owns, and the bases are the one-process ones.

    Bit for bit at 2 ranks (a sum of two is the same in any order). At 3 and more, a ring all-reduce adds each
    element's W terms in an order set by where the element falls in the buffer, so a flat buffer of several
    matrices rounds differently from each matrix's own buffer: equal to fp32 rounding there (and the sharded
    trajectories and switch decisions still match one process: test_world3/4 above)."""
    b = {2: world2[2], 3: world3[0], 4: world4[0]}[world]["rsvd"]["batched"]
    if world == 2:
        assert all(b["equal"]) and b["diff"] == 0.0, b
    else:
        assert b["diff"] < 1e-6, b
    alone_all_reduces = 2 * (Q + 2) + 3 * Q + 3  # two normal matrices alone, and the fallback's CholeskyQR2 form
    assert b["collectives"]["all_reduce"] < alone_all_reduces and b["collectives"]["all_gather"] == 1, b
    assert b["svd_equal"], b
    owned = len([i for i in range(6) if i % world == 0])  # rank 0 writes the result: its own matrices
    assert b["svd_solves_here"] == owned, b
    assert b["svd_collectives"] == {"gather": world, "broadcast": world}, b


@pytest.mark.parametrize("name, solver, refresh, replaced", [
    ("lotus", None, "owner", True),  # lotus's own rsvd
    ("galore", None, "owner", False),  # already the exact svd
    ("galore", "rsvd", "owner", True),  # an rsvd asked for explicitly
    ("adamw", None, "owner", False),  # no projected matrices at all
    ("lotus", None, "distributed", False),
])
def test_owner_refresh_replaces_only_an_rsvd_solver(name, solver, refresh, replaced):
    from lotus_dist.distributed.fsdp_optimizer import owner_refresh_replaces_rsvd
    from lotus_dist.train.config import OptimConfig

    assert owner_refresh_replaces_rsvd(OptimConfig(name=name, solver=solver, refresh=refresh)) is replaced


def _check_int8(res, params, references, key, resumed: bool = False):
    ref_params, ref_log = references["int8"]
    assert _rel_diff(params[key], ref_params) < TOL, key
    assert res[f"{key}.decisions_agree"], key
    assert res[f"{key}.decisions"] == (ref_log[sw.SAVE_AT:] if resumed else ref_log), key


def test_int8_states_shard_resume_and_reshard_like_one_process(world2, world3, references):
    """optim.state_dtype=int8 with int8 projectors under fsdp: 2 ranks and 3 (uneven, the down_proj fallbacks' r x
    172 codes and scales sharded by columns 58/58/56) follow the one-process int8 run; its codes and scales are
    DTensors sharded along the long side, the projectors' packed codes by rows; saved at 2 ranks it resumes bit for
    bit at 2 and continues the trajectory at 3 (DCP reshards the projectors' rows 16/16 -> 11/11/10)."""
    res2, params2 = world2[2], world2[3]
    res3, params3 = world3
    assert min(references["int8"][1][-1]) >= 2, "the int8 run must switch bases"
    _check_int8(res2, params2, references, "int8")
    _check_int8(res3, params3, references, "int8")
    _check_int8(res3, params3, references, "int8_resumed", resumed=True)
    kinds = res2["int8.state_kinds"]
    gate, emb = kinds["layers.0.mlp.gate_proj.weight"], kinds["embed_tokens.weight"]
    assert gate["exp_avg"] == gate["exp_avg_scale"] == gate["exp_avg_sq_scale"] == "(Shard(dim=0),)"
    assert emb["exp_avg_scale"] == emb["exp_avg_sq"] == "(Shard(dim=0),)"
    assert gate["projector"] == "(Shard(dim=0),)"
    assert res2["int8.state_dtypes"]["layers.0.mlp.gate_proj.weight"] == {
        "exp_avg": "torch.int8", "exp_avg_sq": "torch.uint8", "exp_avg_scale": "torch.float32",
        "exp_avg_sq_scale": "torch.float32", "projector": "torch.uint8"}
    assert res3["int8.fallback_scale"] == [[1, c] for c in (58, 58, 56)]
    straight, resumed = params2["int8"], params2["int8.resumed"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
