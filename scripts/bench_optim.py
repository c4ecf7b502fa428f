#!/usr/bin/env python
"""Benchmarks of the optimizer family, measured side by side in one run.

1. basis: svd vs rsvd (r=128, p=8, q=2) time and residual ‖G − proj(G)‖/‖G‖ on LLaMA-shaped fp32 matrices.
   Test matrices: a gradient surrogate with a power-law spectrum, G = Σ_{i<K} (i+1)^-1 · x_i y_iᵀ / (‖x_i‖‖y_i‖)
   (K = 512 random Gaussian rank-1 terms) + an isotropic noise floor of 2% of ‖G‖_F — LLM weight gradients are
   dominated by a few directions with a slowly decaying tail.
2. memory: optimizer-state bytes of adamw / galore / lotus for llama_60m ... llama_7b, from state tensors really
   allocated (on the meta device) by ``init_state``, against the formula Σ(2·long·r + short·r)·4 + 2·(unprojected)·4.
3. step: optimizer step time on llama_60m with random gradients (fp32, CPU). Steady-state steps (no switch) are
   timed directly; the cost of one full refresh (every matrix's basis) is timed on the first step; the amortised
   time per training step is steady + refresh / interval (galore: T = 200; lotus: the interval is adaptive, >= η =
   50 and <= ~2/γ = 200, so it is shown for 50, 100 and 200).

4. codes (--only codes): optim.state_dtype's dequantize-update-requantize of M and V against fp32 and bf16 (time
   and error of the update), and torchao's 8-bit optimizer state when torchao is importable (not a dependency).

5. fused (--only fused): optim.fused's stacked step against the per-matrix one, steady steps on the projected matrices
   of llama_60m (all 8 blocks) and of llama_1b (--fused-layers of its 24 blocks: the whole model's weights and
   gradients in fp32 would not fit a small machine; the groups are the same 7 shapes, each with fewer matrices).

    python scripts/bench_optim.py --quick            # small shapes, 2 sizes, few steps
    python scripts/bench_optim.py --shapes 512x1376,2048x5461
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lotus_dist.model.llama import NAMED_SIZES, Llama, llama_config  # noqa: E402
from lotus_dist.optim import build_optimizer, memory_report  # noqa: E402
from lotus_dist.optim import basis_solvers as bs  # noqa: E402
from lotus_dist.optim import solver_rounds as sr  # noqa: E402
from lotus_dist.optim import subspace as ss  # noqa: E402
from lotus_dist.optim import LowRankAdamW  # noqa: E402
from lotus_dist.optim.methods import METHODS, is_projected  # noqa: E402
from lotus_dist.train.config import OptimConfig  # noqa: E402

RANKS = {"llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024}


def gradient_surrogate(m: int, n: int, terms: int = 512, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(terms, m, n)
    X = torch.randn(m, k, generator=g)
    Y = torch.randn(n, k, generator=g)
    w = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    X = X * (w / X.norm(dim=0) / Y.norm(dim=0))
    G = X @ Y.T
    N = torch.randn(m, n, generator=g)
    return G + noise * G.norm() / N.norm() * N


def _residual(G, P, side):
    return float((G - ss.project_back(ss.project(G, P, side), P, side)).norm() / G.norm())


def bench_basis(shapes, reps, r=128, p=8, q=2):
    print(f"\n## basis: svd vs rsvd (r={r}, p={p}, q={q}), fp32, {torch.get_num_threads()} threads, median of reps")
    print(f"{'shape':>12} {'svd s':>9} {'rsvd s':>9} {'speedup':>8} {'svd resid':>10} {'rsvd resid':>10} {'reps':>5}")
    for m, n in shapes:
        G = gradient_surrogate(m, n)
        side = ss.side_for((m, n), "std")
        n_svd = 1 if m * n > 20_000_000 else reps  # the 4096x11008 svd runs once
        t_svd, t_rsvd = [], []
        for _ in range(n_svd):
            t0 = time.perf_counter()
            P_svd = sr.svd_projector(G, side, r)
            t_svd.append(time.perf_counter() - t0)
        for i in range(reps):
            gen = torch.Generator().manual_seed(i)
            t0 = time.perf_counter()
            P_rsvd = bs.compute_projector("rsvd", G, side, r, gen=gen, oversample=p, power_iters=q)
            t_rsvd.append(time.perf_counter() - t0)
        a, b = statistics.median(t_svd), statistics.median(t_rsvd)
        print(
            f"{f'{m}x{n}':>12} {a:9.3f} {b:9.3f} {a / b:7.1f}x {_residual(G, P_svd, side):10.4f} "
            f"{_residual(G, P_rsvd, side):10.4f} {n_svd}/{reps}"
        )


def _formula(model, r):
    total = 0
    for name, prm in model.named_parameters():
        if is_projected(name, prm):
            long, short = max(prm.shape), min(prm.shape)
            total += (2 * long * r + short * r) * 4
        else:
            total += 2 * prm.numel() * 4
    return total


def bench_memory(sizes):
    print("\n## optimizer-state memory (fp32 states, allocated on meta by init_state), GiB")
    print(f"{'model':>11} {'rank':>5} {'adamw':>8} {'galore':>8} {'formula':>8} {'=?':>3} {'lotus':>8} "
          f"{'lotus/formula':>13} {'lotus fp32 ref':>14} {'galore/adamw':>12}")
    for size in sizes:
        with torch.device("meta"):
            model = Llama(llama_config(size))
        r = RANKS[size]
        out = {}
        for name, extra in (("adamw", {}), ("galore", {}), ("lotus", {}), ("lotus_fp32", {"reference_dtype": "fp32"})):
            opt = build_optimizer(model, OptimConfig(name=name.split("_")[0], rank=r, **extra))
            opt.init_state()
            out[name] = memory_report(opt)
        formula = _formula(model, r)
        gib = 2.0**30
        ok = out["galore"]["total"] == formula and out["lotus"]["moments"] + out["lotus"]["projectors"] == formula
        print(
            f"{size:>11} {r:>5} {out['adamw']['total'] / gib:8.3f} {out['galore']['total'] / gib:8.3f} "
            f"{formula / gib:8.3f} {'yes' if ok else 'NO':>3} {out['lotus']['total'] / gib:8.3f} "
            f"{out['lotus']['total'] / formula:13.3f} {out['lotus_fp32']['total'] / gib:14.3f} "
            f"{out['galore']['total'] / out['adamw']['total']:12.3f}"
        )
    print("lotus = galore's formula + the displacement policy's d_init (long x r per matrix, in 'other'), stored in"
          " bf16 (optim.reference_dtype, the default); 'lotus fp32 ref' = the exact fp32 d_init.")
    print("\n## stored formats (optim.state_dtype / reference_dtype / projector_dtype): MiB from the allocated tensors, "
          "and the total / galore's fp32 formula")
    print(f"{'model':>11} {'rank':>5} {'method':>7} {'state':>5} {'ref':>4} {'proj':>4} {'moments':>9} {'reference':>9} "
          f"{'projectors':>10} {'total':>9} {'/formula':>9}")
    formats = [("galore", s, "-", "fp32") for s in ("fp32", "bf16", "int8")]
    formats += [("galore", "int8", "-", p) for p in ("bf16", "int8")]
    formats += [("lotus", s, "bf16", "fp32") for s in ("fp32", "bf16", "int8")]
    formats += [("lotus", "int8", "int4", p) for p in ("fp32", "bf16", "int8")]
    for size in sizes:
        with torch.device("meta"):
            model = Llama(llama_config(size))
        r, formula = RANKS[size], _formula(model, RANKS[size])
        for name, state, ref, proj in formats:
            extra = {} if ref == "-" else {"reference_dtype": ref}
            opt = build_optimizer(model, OptimConfig(name=name, rank=r, state_dtype=state, projector_dtype=proj,
                                                     **extra))
            opt.init_state()
            mem = memory_report(opt)
            print(f"{size:>11} {r:>5} {name:>7} {state:>5} {ref:>4} {proj:>4} {mem['moments'] / 2**20:9.1f} "
                  f"{mem.get('reference', 0) / 2**20:9.1f} {mem['projectors'] / 2**20:10.1f} "
                  f"{mem['total'] / 2**20:9.1f} {mem['total'] / formula:9.3f}")
    print("int8: codes (1 byte) + one fp32 scale per long-side index (low-rank) or row (plain); int4 reference: 4-bit "
          "codes per long-side index with its exact top entry, scale and norm (optim/reference_codes.py); int8 "
          "projectors: codes + one fp32 scale per stored row (optim/projector_codes.py)")


def bench_step(steps, size="llama_60m"):
    """Steady steps are interleaved round-robin across the methods so that they share the same machine load."""
    print(f"\n## optimizer step on {size} (random fp32 gradients, CPU, {torch.get_num_threads()} threads)")
    methods = ("adamw", "galore", "lotus")
    r = RANKS[size]
    torch.manual_seed(0)
    grads = None
    opts, refresh, first = {}, {}, {}
    for name in methods:
        torch.manual_seed(0)
        model = Llama(llama_config(size))
        params = list(model.parameters())
        if grads is None:
            grads = [torch.randn_like(p) for p in params]
            n_proj = sum(1 for n, p in model.named_parameters() if is_projected(n, p))
        for p, g in zip(params, grads):
            p.grad = g  # shared, read-only
        opts[name] = build_optimizer(model, OptimConfig(name=name, rank=r))
        t0 = time.perf_counter()
        opts[name].step()  # allocates the state and computes every basis
        first[name] = time.perf_counter() - t0
        refresh[name] = opts[name].refresh_seconds
    times = {name: [] for name in methods}
    for _ in range(steps):
        for name in methods:
            t0 = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t0)
    steady = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'method':>8} {'steady ms':>10} {'refresh s':>10} {'amortised ms/step (switch interval)':>45}")
    for name in methods:
        if name == "adamw":
            amort = f"{steady[name] * 1e3:.1f}"
        elif name == "galore":
            amort = f"{(steady[name] + refresh[name] / 200) * 1e3:.1f} (T=200)"
        else:
            amort = ", ".join(f"{(steady[name] + refresh[name] / T) * 1e3:.1f} ({T})" for T in (50, 100, 200))
        print(f"{name:>8} {steady[name] * 1e3:10.1f} {refresh[name]:10.3f} {amort:>45}")
    g, lo, a = (steady["galore"], refresh["galore"]), (steady["lotus"], refresh["lotus"]), steady["adamw"]
    print(f"refresh of all {n_proj} matrices: svd {g[1]:.2f} s vs rsvd {lo[1]:.2f} s = {g[1] / lo[1]:.1f}x; "
          f"steady step lotus/galore {lo[0] / g[0]:.2f}, galore/adamw {g[0] / a:.2f}")
    print(f"amortised lotus / galore(T=200): interval 200 -> {(lo[0] + lo[1] / 200) / (g[0] + g[1] / 200):.2f}, "
          f"interval 50 -> {(lo[0] + lo[1] / 50) / (g[0] + g[1] / 200):.2f}")


def bench_fused(steps: int, layers_1b: int, methods=("lotus", "fira", "apollo")):
    """Steady-step time of the projected matrices (no switch, no check), fused vs per-matrix, interleaved round-robin
    so both share the same machine load; the plain parameters (embeddings, norms) are left out: they take torch's
    fused AdamW either way."""
    print(f"\n## optim.fused: steady low-rank step, fused vs per-matrix (random fp32 gradients, CPU, "
          f"{torch.get_num_threads()} thread(s), median of {steps})")
    print(f"{'shapes':>22} {'method':>8} {'matrices':>8} {'groups':>6} {'per-matrix ms':>13} {'fused ms':>9} "
          f"{'fused/per-matrix':>16}")
    for size, layers in (("llama_60m", None), ("llama_1b", layers_1b)):
        cfg = llama_config(size)
        if layers is not None:
            cfg = type(cfg)(**{**cfg.__dict__, "n_layers": layers})
        with torch.device("meta"):
            shapes = [tuple(p.shape) for n, p in Llama(cfg).named_parameters() if is_projected(n, p)]
        label = f"{size} x{cfg.n_layers} blocks"
        for method in methods:
            torch.manual_seed(0)
            weights = [torch.randn(s) * 0.02 for s in shapes]
            grads = [torch.randn(s) for s in shapes]
            opts = {}
            for fused in (False, True):
                ps = [torch.nn.Parameter(w.clone()) for w in weights]
                for p, g in zip(ps, grads):
                    p.grad = g  # shared, read-only
                parts = {**METHODS[method], "update_gap": 10**6, "verify_gap": 10**6}
                opts[fused] = LowRankAdamW([{"params": ps, "rank": RANKS[size], **parts, "fused": fused}])
                opts[fused].step()  # first bases (not timed)
                opts[fused].step()  # Fira / APOLLO: the limiter is set
            times = {False: [], True: []}
            for _ in range(steps):
                for fused in (False, True):
                    t0 = time.perf_counter()
                    opts[fused].step()
                    times[fused].append(time.perf_counter() - t0)
            a, b = statistics.median(times[False]), statistics.median(times[True])
            print(f"{label:>22} {method:>8} {len(shapes):>8} {len(set(shapes)):>6} {a * 1e3:13.1f} {b * 1e3:9.1f} "
                  f"{b / a:16.2f}")
            del opts


def bench_codes(reps: int, shape=(4096, 128), steps: int = 100):
    """optim.state_dtype: one dequantize-update-requantize of Adam's M and V (R-shaped, one block per long-side
    index) against the in-place fp32 update and bf16; the update's error after ``steps`` EMA steps against fp32;
    torchao's 8-bit state (torchao.optim) beside it when importable."""
    from lotus_dist.optim import state_codes as sc

    print(f"\n## moments {shape[0]}x{shape[1]}: dequantize-update-requantize, {torch.get_num_threads()} thread(s), "
          f"median of {reps}; error of M/(sqrt(V)+eps) after {steps} steps vs fp32 (relative Frobenius, cosine)")
    rows = torch.logspace(-3, 0, shape[0]).unsqueeze(1)
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    grads = [rows * (signal + 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(i + 1)))
             for i in range(steps)]

    def ours(name):
        st = {}
        sc.allocate(st, name, shape, lambda dt, scale: torch.zeros(shape[0], 1 if scale else shape[1], dtype=dt),
                    torch.float32)

        def step(R):
            M, V = sc.load(st, torch.float32)
            M.mul_(0.9).add_(R, alpha=0.1)
            V.mul_(0.999).addcmul_(R, R, value=0.001)
            N = M / V.sqrt().add_(1e-8)
            sc.store(st, [M, V])
            return N
        return step

    def torchao_state():
        from torchao.optim.subclass_8bit import OptimState8bit  # noqa: PLC0415 - optional, benchmark only

        M, V = OptimState8bit.zeros(shape, signed=True), OptimState8bit.zeros(shape, signed=False)

        def step(R):
            m, v = M.dequantize(), V.dequantize()
            m.mul_(0.9).add_(R, alpha=0.1)
            v.mul_(0.999).addcmul_(R, R, value=0.001)
            M.copy_(m)
            V.copy_(v)
            return m / v.sqrt().add_(1e-8)
        return step

    candidates = {"fp32 (in place)": lambda: ours("fp32"), "bf16": lambda: ours("bf16"),
                  "int8 (ours)": lambda: ours("int8")}
    try:
        import torchao  # noqa: F401, PLC0415

        candidates["torchao int8 (eager)"] = torchao_state
    except ImportError:
        print("torchao is not installed in this environment: its 8-bit AdamW state is not compared")
    ref = None
    print(f"{'state':>22} {'ms/update':>10} {'rel err':>8} {'cosine':>8}")
    for label, make in candidates.items():
        try:
            step = make()
            for R in grads:
                N = step(R)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(grads[-1])
                times.append(time.perf_counter() - t0)
        except Exception as e:  # an optional library's API that moved
            print(f"{label:>22} failed: {type(e).__name__}: {e}")
            continue
        ref = N if ref is None else ref
        err = float((N - ref).norm() / ref.norm())
        cos = float(torch.nn.functional.cosine_similarity(N.flatten(), ref.flatten(), dim=0))
        print(f"{label:>22} {statistics.median(times) * 1e3:10.2f} {err:8.4f} {cos:8.5f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, two model sizes, few steps")
    ap.add_argument("--shapes", default=None, help="comma-separated MxN list (default: 512x1376,2048x5461,4096x11008)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sizes", default=None, help="comma-separated model sizes for the memory table")
    ap.add_argument("--only", default="basis,memory,step,fused",
                    help="which parts to run (and codes: the int8 moments)")
    ap.add_argument("--fused-layers", type=int, default=2, help="llama_1b blocks in the fused benchmark")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: stable on a shared CPU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = args.shapes or ("512x1376" if args.quick else "512x1376,2048x5461,4096x11008")
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in shapes.split(",")]
    sizes = args.sizes.split(",") if args.sizes else (["llama_60m", "llama_1b"] if args.quick else list(RANKS))
    for s in sizes:
        if s not in NAMED_SIZES or s not in RANKS:
            ap.error(f"unknown size {s} (known: {', '.join(RANKS)})")
    parts = set(args.only.split(","))
    if "basis" in parts:
        bench_basis(shapes, 2 if args.quick else args.reps)
    if "memory" in parts:
        bench_memory(sizes)
    if "step" in parts:
        bench_step(5 if args.quick else args.steps)
    if "fused" in parts:
        bench_fused(3 if args.quick else args.steps, args.fused_layers)
    if "codes" in parts:
        bench_codes(5 if args.quick else 20)


if __name__ == "__main__":
    main()
