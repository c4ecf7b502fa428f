"""Section 3: basis refresh svd vs rsvd at LLaMA MLP shapes, and the training step of adamw / galore / lotus, and
lotus with its blocks compiled (train.compile: steady, first step, amortised, optimizer step alone, tokens/s, MFU;
compiled vs eager tokens/s) and lotus with the fused low-rank step (optim.fused: its optimizer step vs the
per-matrix one). Every shape and every method is an item of its own, estimated from what this run has
timed so far and bounded by the budget (galore's first step at llama_1b solves one svd per projected matrix, 168
in a row)."""

from __future__ import annotations

import statistics
import time

import torch

from bench_optim import gradient_surrogate
from bench_train import make_batch, timed_step
from lotus_dist.distributed.modes import single_process
from lotus_dist.model.llama import Llama, compile_blocks, llama_config
from lotus_dist.optim import build_optimizer
from lotus_dist.optim import basis_solvers as bs
from lotus_dist.optim import solver_rounds as sr
from lotus_dist.optim import subspace as ss
from lotus_dist.train.config import OptimConfig, TrainConfig
from lotus_dist.train.step import StepEngine

from .items import Check
from .mfu import model_flops_per_token, peak_flops
from .plan import autocast_for, sync
from .report import fmt_s

STEP_METHODS = {"adamw": dict(name="adamw", lr=1e-3), "galore": dict(name="galore"), "lotus": dict(name="lotus"),
                "lotus+compile": dict(name="lotus"), "lotus+fused": dict(name="lotus", fused=True)}
COMPILED = {"lotus+compile": "lotus"}  # compiled row -> the eager row it is compared with
FUSED = {"lotus+fused": "lotus"}  # optim.fused row -> the per-matrix row its optimizer step is compared with
SOLVER_OF = {"galore": "svd", "lotus": "rsvd", "lotus+compile": "rsvd", "lotus+fused": "rsvd"}  # first step's solver


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def energy(G: torch.Tensor, P: torch.Tensor, side: str) -> float:
    G = G.float()
    return float(ss.project(G, P, side).norm() ** 2 / G.norm() ** 2)


def mnk(m: int, n: int) -> int:
    return m * n * min(m, n)  # the cost of a decomposition of an m x n matrix, up to a constant


def solver_seconds(ctx: dict, solver: str, m: int, n: int) -> float:
    """Seconds of one ``solver`` call at m x n, scaled from the smallest shape timed in this run (0 if none)."""
    timed_shapes = ctx.get(f"{solver}_seconds", {})
    if not timed_shapes:
        return 0.0
    (m0, n0), t0 = min(timed_shapes.items(), key=lambda kv: kv[0][0] * kv[0][1])
    return t0 * mnk(m, n) / mnk(m0, n0)


def first_step_solves(cfg, ctx: dict, solver: str) -> float:
    """Seconds of the solves of a first step (one per projected matrix: 4 attention, 3 MLP per block) at cfg."""
    per_block = 4 * solver_seconds(ctx, solver, cfg.dim, cfg.dim) + 3 * solver_seconds(ctx, solver, cfg.dim,
                                                                                           cfg.ffn_dim)
    return cfg.n_layers * per_block


def measure_refresh(plan, m: int, n: int, r: int) -> dict:
    G = gradient_surrogate(m, n).to(plan.device, torch.bfloat16)  # a bf16 gradient, as autocast makes
    side = ss.side_for((m, n), "std")
    gen = torch.Generator(device=plan.device)
    svd_s = timed(lambda: sr.svd_projector(G, side, r), plan.device, 2)
    rsvd_s = timed(lambda: bs.rsvd_columns(ss.oriented(G, side), r, 8, 2, gen.manual_seed(0)), plan.device, 3)
    P_svd = sr.svd_projector(G, side, r)
    P_rsvd = ss.to_projector(bs.rsvd_columns(ss.oriented(G, side), r, 8, 2, gen.manual_seed(0)), side)
    return dict(svd=svd_s, rsvd=rsvd_s, e_svd=energy(G, P_svd, side), e_rsvd=energy(G, P_rsvd, side))


def refresh_speed(run: Check) -> None:
    plan, report, ctx = run.plan, run.report, run.ctx
    rows = []
    for m, n, r in plan.refresh_shapes:
        # 4 svd and 5 rsvd calls, estimated from the shapes timed before this one
        needs = max(plan.needs["refresh"], 4 * solver_seconds(ctx, "svd", m, n) + 5 * solver_seconds(ctx, "rsvd", m, n))
        done, got = run.attempt(f"refresh {m}x{n} r={r}", needs, plan.limits["refresh"],
                                lambda: measure_refresh(plan, m, n, r))
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
        if not done:
            break  # the larger shapes need more
        ctx.setdefault("svd_seconds", {})[(m, n)] = got["svd"]
        ctx.setdefault("rsvd_seconds", {})[(m, n)] = got["rsvd"]
        rows.append([f"{m}x{n}", r, fmt_s(got["svd"]), fmt_s(got["rsvd"]), f"{got['svd'] / got['rsvd']:.1f}x",
                     f"{got['e_svd']:.4f}", f"{got['e_rsvd']:.4f}"])
        report.check(f"rsvd captures >= 99 % of svd's energy at {m}x{n} r={r}", got["e_rsvd"] >= 0.99 * got["e_svd"],
                     f"{got['e_rsvd'] / got['e_svd']:.4f}")
    report.add()
    report.add("Basis refresh of one bf16 gradient (solvers in fp32), median; rsvd: oversample 8, 2 power "
               "iterations; energy = ||P^T G||^2 / ||G||^2 (test matrix: bench_optim's power-law surrogate):")
    report.add()
    report.table(["shape", "r", "svd", "rsvd", "svd / rsvd", "energy svd", "energy rsvd"], rows)


def start_method(plan, cfg, opts: dict, rank: int, batch, autocast, compiled: bool = False) -> dict:
    torch.manual_seed(0)
    with plan.device:
        model = Llama(cfg)  # built on the device: no full-size copy through the host
    if compiled:
        # the first step below compiles (with every basis): its time is not a refresh's. The CPU dry run traces the
        # same graphs without inductor's C++ build (setuptools, not among a GPU box's needs)
        compile_blocks(model, "inductor" if plan.device.type == "cuda" else "aot_eager")
    # huge gaps: the timed steps are steady; the first step computes every basis (the refresh)
    opt = build_optimizer(model, OptimConfig(rank=rank, **opts, update_gap=10**9, verify_gap=10**9))
    engine = StepEngine(model, opt, single_process(plan.device), grad_clip=TrainConfig().grad_clip, autocast=autocast)
    refresh = timed_step(engine, batch)
    second = timed_step(engine, batch)
    return {"model": model, "opt": opt, "engine": engine, "refresh": refresh, "second": second, "steady": []}


def steady_rounds(plan, runs: dict, batch, autocast) -> None:
    for _ in range(plan.rounds):  # interleaved: a change of clock or load hits every method alike
        for state in runs.values():
            state["steady"].append(timed_step(state["engine"], batch))
    for state in runs.values():  # the optimizer step alone, on the gradients of one backward
        with autocast():
            state["model"](batch[:, :-1], batch[:, 1:]).backward()
        state["opt_step"] = timed(state["opt"].step, plan.device, plan.rounds)
        state["opt"].zero_grad(set_to_none=True)


def step_speed(run: Check) -> None:
    plan, report, ctx = run.plan, run.report, run.ctx
    autocast = autocast_for(plan.device)
    peak, peak_what = peak_flops(ctx)
    for name, overrides, rank, rows_, seq in plan.step_models:
        cfg = llama_config(name, **overrides)
        batch = make_batch(cfg.vocab_size, rows_, seq, plan.device)
        runs = {}
        for method, opts in STEP_METHODS.items():
            solves = first_step_solves(cfg, ctx, SOLVER_OF[method]) if method in SOLVER_OF else 0.0
            compiles = method in COMPILED
            done, state = run.attempt(f"training step of {method} at {name}",
                                      plan.needs["step"] + solves + compiles * plan.needs["compile"],
                                      plan.limits["step"] + compiles * plan.limits["compile"],
                                      lambda: start_method(plan, cfg, opts, rank, batch, autocast, method in COMPILED))
            if done:
                runs[method] = state
            elif plan.device.type == "cuda":
                torch.cuda.empty_cache()
        if runs:
            # rounds of every method, then (rounds + 1) optimizer steps each: from the second steps just timed
            needs = (2 * plan.rounds + 2) * sum(state["second"] for state in runs.values())
            done, _ = run.attempt(f"steady steps at {name}", needs, plan.limits["step"],
                                  lambda: steady_rounds(plan, runs, batch, autocast))
            if done:
                step_table(report, name, rank, rows_, seq, runs, plan.rounds, peak, peak_what)
        del runs, batch
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()


def step_table(report, name: str, rank: int, rows_: int, seq: int, runs: dict, rounds: int, peak: float,
               peak_what: str) -> None:
    tokens = rows_ * seq
    any_model = next(iter(runs.values()))["model"]
    fpt = model_flops_per_token(any_model, seq)
    base = statistics.median(runs["adamw"]["steady"]) if "adamw" in runs else None
    table = []
    for method, state in runs.items():
        steady = statistics.median(state["steady"])
        # adamw's first step only allocates; a compiled one compiles too (not a refresh's time)
        intervals = () if method in ("adamw", *COMPILED) else ((200,) if method == "galore" else (50, 200))
        amortised = ", ".join(f"{fmt_s(steady + (state['refresh'] - steady) / t)} (T={t})" for t in intervals)
        first = "-" if method == "adamw" else fmt_s(state["refresh"]) + (" (compiles)" if method in COMPILED else "")
        table.append([method, fmt_s(steady), f"{steady / base:.2f}" if base else "-", first, amortised or "-",
                      fmt_s(state["opt_step"]), f"{tokens / steady:,.0f}", f"{fpt * tokens / steady / peak:.1%}"])
    report.add(f"**{name}** ({sum(p.numel() for p in any_model.parameters()) / 1e6:.1f}M parameters), micro-batch "
               f"{rows_} x {seq}, rank {rank}, bf16 autocast, fp32 weights; median of {rounds} interleaved rounds; "
               f"MFU against {peak_what}:")
    report.add()
    report.table(["method", "steady step", "vs adamw", "first step (every basis)", "amortised", "optimizer step",
                  "tokens/s", "MFU"], table)
    for method, eager in COMPILED.items():
        if method in runs and eager in runs:
            ratio = statistics.median(runs[eager]["steady"]) / statistics.median(runs[method]["steady"])
            report.add()
            report.add(f"compiled / eager tokens/s ({method} / {eager}, train.compile=true): {ratio:.2f}x")
    for method, per_matrix in FUSED.items():
        if method in runs and per_matrix in runs:
            ratio = runs[method]["opt_step"] / runs[per_matrix]["opt_step"]
            report.add()
            report.add(f"fused / per-matrix optimizer step ({method} / {per_matrix}, optim.fused=true): {ratio:.2f}x")


def section_speed(run: Check) -> None:
    refresh_speed(run)
    step_speed(run)
