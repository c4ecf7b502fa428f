"""One rank of the sharded-optimizer checks (test_fsdp_optimizer.py); reached through ``dist_workers.py`` with
``{"suite": "sharded_optim", ...}``. Rank 0 writes ``<tag>.result.json`` and ``<tag>.params.pt``.

Per launch: the training runs of ``options["runs"]`` (each: FSDP2 model + ``build_sharded_optimizer``, 30 steps
of the global batch through the trainer's step engine, with a per-step log of switch counts and of the
collectives ``optimizer.step()`` issued),
optionally a DCP save at the middle step / a resume from one, and the distributed-rsvd comparison.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lotus_dist.counters import COUNTERS
from lotus_dist.distributed.matrix_comm import MatrixComm, chunk_sizes
from lotus_dist.distributed.compat import set_gradient_divide_factor
from lotus_dist.distributed.dcp_util import load_sharded, save_sharded, sharded_state
from lotus_dist.distributed.fsdp import apply_fsdp
from lotus_dist.distributed.modes import FullyShardedDataParallel
from lotus_dist.distributed.sharding_plan import plan_for_model
from lotus_dist.distributed.runtime import build_mesh
from lotus_dist.distributed.fsdp_optimizer import build_sharded_optimizer
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import build_optimizer
from lotus_dist.optim.methods import method_rank
from lotus_dist.optim.basis_solvers import rsvd_columns
from lotus_dist.train.config import OptimConfig
from lotus_dist.train.step import StepEngine

CFG = llama_config("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=32)
GLOBAL_BATCH, SEQ, RANK_R, STEPS, SAVE_AT = 12, 16, 8, 30, 15
# Small update_gap / verify_gap and a large gamma so that bases switch several times within 30 steps.
# projectors pinned to replicate (the default auto shards them here): the collective budgets count on it
OPTIM = dict(lr=0.01, rank=RANK_R, weight_decay=0.01, update_gap=10, verify_gap=3, gamma=0.5, power_iters=2,
             projectors="replicate")
# Parameters in float64 (the optimizer's solvers still run in fp32): in fp32, the rounding differences of a
# reduce-scattered gradient (~1e-7) are amplified by Adam's lr/eps = 1e4 where gradients are small, and even plain
# AdamW under FSDP drifts to ~3e-2 relative from one process after 30 steps at lr 0.01. fp64 makes the comparison
# a test of the algorithm, not of float summation order.
DTYPE = torch.float64
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "gather", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "all_to_all", "reduce", "scatter")


def optim_cfg(method: str, **extra) -> OptimConfig:
    # Full-rank AdamW at its usual 1e-3: at 1e-2 its trajectory is chaotic enough that the model's fp32 RMSNorm
    # rounding (one fp32 ulp flipped by a 1e-15 difference) grows to 1e-5 within 30 steps.
    lr = {"lr": 1e-3} if method == "adamw" else {}
    return OptimConfig(name=method, **{**OPTIM, **lr, **extra})


def blocks(step: int) -> torch.Tensor:
    """The global batch of ``step``: GLOBAL_BATCH token blocks of SEQ + 1 (inputs and their next tokens)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    toks = blocks(step)
    return toks[:, :-1], toks[:, 1:]


def loss_of(model, x, y, world: int = 1) -> torch.Tensor:
    """Mean cross-entropy over the global batch in the logits' dtype, this rank's share of it (1/world).

    The ranks' shares are summed (gradient divide factor 1, see ``sharded_model``) rather than their means
    averaged: the model's fp32 RMSNorm backward would otherwise see gradients scaled by 1/64 instead of 1/192 at
    world 3 and round them differently from one process (powers of two scale exactly).
    """
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)) / world


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def projected(opt):
    return [p for g in opt.param_groups if g.get("rank") is not None for p in g["params"]]


def reference_run(method: str, steps: int = STEPS, **extra) -> tuple[dict, list]:
    """Single process, written out by hand (the independent reference of the engine runs below): final parameters
    and the per-step switch counts (used by the test process)."""
    torch.manual_seed(0)
    model = Llama(CFG).to(DTYPE)
    opt = build_optimizer(model, optim_cfg(method, **extra))
    log = []
    for step in range(steps):
        x, y = batch(step)
        loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append([opt.state[p].get("n_bases", 0) for p in projected(opt)])
    return {n: p.detach().clone() for n, p in model.named_parameters()}, log


def sharded_model(mesh, method: str, replicate: int = 1, **extra):
    torch.manual_seed(0)
    model = Llama(CFG).to(DTYPE)
    cfg = optim_cfg(method, **extra)
    plan = plan_for_model(model, dist.get_world_size(), method_rank(cfg), solver=cfg.solver or "rsvd",
                          replicate=replicate)
    apply_fsdp(model, mesh, plan, log_fn=lambda s: None)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            set_gradient_divide_factor(module, 1.0)  # sum the ranks' shares (loss_of); torch 2.6/2.7 included
    return model, build_sharded_optimizer(model, cfg, plan, mesh), plan


@contextmanager
def counting(ops: list):
    """Record (collective, shape) of every torch.distributed collective issued inside the block."""
    saved = {}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            t = args[0] if args else None
            shape = list(t.shape) if isinstance(t, torch.Tensor) else (list(args[1].shape) if len(args) > 1 and isinstance(args[1], torch.Tensor) else [])
            ops.append([_name, shape])
            return _fn(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def step_facts(opt, plan, names) -> dict:
    """What the budget depends on, read from the state before a step."""
    facts = {"rows": 0, "checks": 0, "fallback_live": 0, "live": 0}
    for g in opt.param_groups:
        if g.get("rank") is None:
            continue
        for p in g["params"]:
            st = opt.state.get(p, {})
            n_bases = st.get("n_bases", 0)
            fb = plan.matrices[names[id(p)]].fallback
            if n_bases == 0:
                facts["rows"] += 1  # init row (the first basis waits for a non-zero gradient)
            elif g["switch"] == "displacement" and (st["tau"] + 1) % g["verify_gap"] == 0:
                facts["rows"] += 1
                facts["checks"] += 1
            facts["live"] += n_bases > 0
            facts["fallback_live"] += fb and n_bases > 0
    return facts


def engine_for(model, opt, rt, world: int, **hooks) -> StepEngine:
    """The trainer's step (lotus_dist/train/step.py) on an FSDP2 model built here, with the loss of ``loss_of``."""
    return StepEngine(model, opt, FullyShardedDataParallel(rt),
                      loss_fn=lambda m, b: loss_of(m, b[:, :-1], b[:, 1:], world), **hooks)


def train(model, opt, plan, steps: range, rt, record: list | None = None) -> list:
    """Steps through the trainer's step engine; per step the switch counts and, in ``record``, the collectives
    ``optimizer.step()`` alone issued with what they depend on (the budget tests) and the bytes this rank sent in
    them per kind, as ``lotus_dist.counters.COUNTERS`` counted them."""
    rank, world = rt.rank, rt.world_size
    names = {id(p): n for n, p in model.named_parameters()}
    per = GLOBAL_BATCH // world
    log = []
    seen: dict = {}

    def after_backward():  # what the budget depends on, read from the state before the update
        seen["facts"] = step_facts(opt, plan, names)
        seen["before"] = [opt.state.get(p, {}).get("n_bases", 0) for p in projected(opt)]
        seen["steps_before"] = [opt.state.get(p, {}).get("step", 0) for p in projected(opt)]
        seen["ops"] = []

    @contextmanager
    def counted_update():
        before = dict(COUNTERS.bytes_by_kind)
        with counting(seen["ops"]):
            yield
        seen["bytes"] = {k: v - before.get(k, 0.0) for k, v in COUNTERS.bytes_by_kind.items() if v != before.get(k)}

    engine = engine_for(model, opt, rt, world, after_backward=after_backward, around_update=counted_update)
    for step in steps:
        engine.step(iter([blocks(step)[rank * per:(rank + 1) * per]]))
        facts, before, steps_before, ops = seen["facts"], seen["before"], seen["steps_before"], seen["ops"]
        after = [opt.state[p].get("n_bases", 0) for p in projected(opt)]
        log.append(after)
        if record is not None:
            fb = [plan.matrices[names[id(p)]].fallback for p in projected(opt)]
            facts["switched"] = sum(1 for b, a, f in zip(before, after, fb) if a > b and not f)
            owners = [plan.matrices[names[id(p)]].owner for p in projected(opt)]
            facts["switch_owners"] = len({o for b, a, o in zip(before, after, owners) if a > b})
            facts["switched_fallback"] = sum(1 for b, a, f in zip(before, after, fb) if a > b and f)
            steps_after = [opt.state[p].get("step", 0) for p in projected(opt)]
            facts["updated_fallback"] = sum(1 for b, a, f in zip(steps_before, steps_after, fb) if a > b and f)
            record.append({"step": step, "ops": ops, "bytes": seen["bytes"], **facts})
    return log


def params_of(model) -> dict:
    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def state_kinds(opt, model) -> dict:
    """Which state_dict() entries are DTensors (and their placements), for the DCP layout check."""
    sd = sharded_state(model, opt)["optim"]["state"]
    out = {}
    for fqn in ("layers.0.mlp.gate_proj.weight", "layers.0.mlp.down_proj.weight", "embed_tokens.weight"):
        out[fqn] = {k: (repr(v.placements) if isinstance(v, DTensor) else type(v).__name__) for k, v in sd[fqn].items()}
    return out


def rsvd_check(rank: int, world: int) -> dict:
    """Distributed rsvd (normal rows-sharded, normal columns-sharded, fallback rows-sharded) vs one process."""
    group = dist.group.WORLD
    out, cases = {}, []
    for tag, shape, side, dim, fallback in (("right_rows", (172, 64), "right", 0, False),
                                            ("left_cols", (64, 172), "left", 1, False),
                                            ("left_rows_fallback", (64, 172), "left", 0, True)):
        g = torch.Generator().manual_seed(11)
        m, n = shape
        G = (torch.randn(m, 12, generator=g) * torch.logspace(0, -2, 12)) @ torch.randn(12, n, generator=g)
        G = G + 1e-3 * torch.randn(m, n, generator=g)
        Gs = G if side == "left" else G.T
        ref = rsvd_columns(Gs, RANK_R, 8, 2, torch.Generator().manual_seed(5))
        sizes = chunk_sizes(shape[dim], world)
        off = sum(sizes[:rank])
        local = G.narrow(dim, off, sizes[rank])
        comm = MatrixComm(group, shape, side, RANK_R, dim, fallback, owner=0)
        got = rsvd_columns(local if side == "left" else local.T, RANK_R, 8, 2, torch.Generator().manual_seed(5), comm)
        gathered = [torch.empty_like(got) for _ in range(world)]
        dist.all_gather(gathered, got.contiguous())
        out[tag] = {"diff": (got - ref).abs().max().item(), "same_on_ranks": all(torch.equal(gathered[0], t) for t in gathered)}
        cases.append((local if side == "left" else local.T, comm, got))
    out["batched"] = batched_refresh_check(cases, rank, world)
    return out


def batched_refresh_check(cases, rank: int, world: int) -> dict:
    """The three rsvd solves together in lockstep (one flat all-reduce per stage for all of them) against each
    alone; and exact svd solves of several matrices on their owners at once: each rank solves only its own."""
    import lotus_dist.distributed.matrix_comm as collectives
    from lotus_dist.optim.basis_solvers import projector_steps, rsvd_steps
    from lotus_dist.optim.solver_rounds import run_batched, svd_projector

    COUNTERS.reset()
    together = run_batched([rsvd_steps(Gs, RANK_R, 8, 2, torch.Generator().manual_seed(5), comm)
                            for Gs, comm, _ in cases])
    result = {"equal": [torch.equal(a, alone) for a, (_, _, alone) in zip(together, cases)],
              "diff": max((a - alone).abs().max().item() for a, (_, _, alone) in zip(together, cases)),
              "collectives": COUNTERS.by_kind.copy()}
    # owner svd: six matrices, owners 0, 1, 2, ... round robin; count the solves each rank runs
    solves = []
    real, real_many = svd_projector, collectives.svd_projectors

    def counting(Gs, sides, rs):  # the owners' batched solves: count the matrices each rank solves
        solves.extend(tuple(G.shape) for G in Gs)
        return real_many(Gs, sides, rs)

    collectives.svd_projectors = counting
    try:
        g = torch.Generator().manual_seed(3)
        solvers, alone = [], []
        for i in range(6):
            G = torch.randn(64, 172, generator=g)
            sizes = chunk_sizes(64, world)
            local = G.narrow(0, sum(sizes[:rank]), sizes[rank])
            comm = MatrixComm(dist.group.WORLD, (64, 172), "right", RANK_R, 0, False, owner=i % world)
            solvers.append(projector_steps("svd", local, "right", RANK_R, gen=torch.Generator(), comm=comm))
            alone.append(real(G, "right", RANK_R))
        COUNTERS.reset()
        bases = run_batched(solvers)
        result["svd_equal"] = all(torch.equal(b, a) for b, a in zip(bases, alone))
        result["svd_solves_here"] = len(solves)
        result["svd_collectives"] = COUNTERS.by_kind.copy()
    finally:
        collectives.svd_projectors = real_many
    return result


def projector_peaks(mesh, rt) -> dict:
    """Measured peak bytes of one optimizer step (a plain one, and a check step) with projectors replicated and
    sharded, on this rank; and the projectors' bytes. Rank 32 makes the projectors the bulk of the state."""
    import gc

    from lotus_dist.train.peak_memory import PeakMemory

    rank, world = rt.rank, rt.world_size
    out = {}
    for mode in ("replicate", "shard"):
        model, opt, plan = sharded_model(mesh, "lotus", projectors=mode, rank=32, verify_gap=3, gamma=1e-6)
        per = GLOBAL_BATCH // world
        peaks = []

        @contextmanager
        def measured_update():  # the update alone, after a collection (the step's backward left garbage)
            gc.collect()
            with PeakMemory("cpu") as pm:
                yield
            peaks.append(pm.peak_bytes - pm.start_bytes)

        engine = engine_for(model, opt, rt, world, around_update=measured_update)
        for step in range(3):  # step 0 builds the bases; step 1 is a plain step; step 2 checks (tau 3)
            engine.step(iter([blocks(step)[rank * per:(rank + 1) * per]]))
        full = [m.projector_shape[0] * m.projector_shape[1] * 8 for m in plan.matrices.values()]  # fp64
        resting = sum(opt.state[p]["projector"].numel() * 8 for p in projected(opt))
        # what differs between the modes: the projectors at rest plus what a step adds on top of the rest
        out[mode] = {"plain": resting + peaks[1], "check": resting + peaks[2], "resting": resting}
        out["projector_bytes"], out["largest"] = sum(full), max(full)
        del model, opt, engine
        gc.collect()
    return out


def main(options: dict, workdir: Path, rt) -> None:
    rank, world = rt.rank, rt.world_size
    meshes: dict = {}
    result: dict = {"world": world}
    params: dict = {}
    for run in options.get("runs", []):
        key, method, extra = run["key"], run["method"], run.get("extra", {})
        replicate = run.get("replicate", 1)  # > 1: HSDP, a (replicate, shard) mesh
        if replicate not in meshes:
            meshes[replicate] = build_mesh(rt, replicate)
        mesh = meshes[replicate]
        model, opt, plan = sharded_model(mesh, method, replicate, **extra)
        result.setdefault("fallbacks", sorted(p.name for p in plan.fallbacks))
        result[f"{key}.placements"] = repr(dict(model.named_parameters())["layers.0.mlp.down_proj.weight"].placements)
        record: list = []
        if run.get("resume"):
            load_sharded(run["resume"], model, opt)
            log = train(model, opt, plan, range(SAVE_AT, STEPS), rt, record)
        else:
            log = train(model, opt, plan, range(0, SAVE_AT if run.get("save") else STEPS), rt, record)
            if run.get("save"):
                result[f"{key}.state_kinds"] = state_kinds(opt, model)
                save_sharded(run["save"], model, opt)
                log += train(model, opt, plan, range(SAVE_AT, STEPS), rt, record)
        logs = [None] * world
        dist.all_gather_object(logs, log)
        down = opt.state[dict(model.named_parameters())["layers.0.mlp.down_proj.weight"]]
        shapes = [None] * world  # each rank's share of the down_proj state (a fallback at world 3)
        dist.all_gather_object(shapes, list(down["exp_avg"].shape))
        result[f"{key}.fallback_state"] = shapes
        if "exp_avg_scale" in down:  # optim.state_dtype=int8: the codes' scales, sharded like them
            dist.all_gather_object(shapes, list(down["exp_avg_scale"].shape))
            result[f"{key}.fallback_scale"] = shapes
            gate = opt.state[dict(model.named_parameters())["layers.0.mlp.gate_proj.weight"]]
            result[f"{key}.state_dtypes"] = {"layers.0.mlp.gate_proj.weight": {
                k: str(v.dtype) for k, v in gate.items() if k.startswith("exp_avg") or k == "projector"}}
        result[f"{key}.decisions_agree"] = all(l == logs[0] for l in logs)
        result[f"{key}.decisions"] = log
        result[f"{key}.budget"] = record if rank == 0 else None
        params[key] = params_of(model)
        if run.get("same_world_resume"):  # a fresh model + optimizer loads the mid-run checkpoint in this launch
            model2, opt2, plan2 = sharded_model(mesh, method, replicate, **extra)
            load_sharded(run["save"], model2, opt2)
            train(model2, opt2, plan2, range(SAVE_AT, STEPS), rt)
            params[f"{key}.resumed"] = params_of(model2)
    if options.get("rsvd"):
        result["rsvd"] = rsvd_check(rank, world)
    if options.get("peak"):
        result["peak"] = projector_peaks(build_mesh(rt, 1) if 1 not in meshes else meshes[1], rt)
    if rank == 0:
        tag = options.get("tag", "run")
        torch.save(params, workdir / f"{tag}.params.pt")
        (workdir / f"{tag}.result.json").write_text(json.dumps(result))
