#!/usr/bin/env python
"""Method comparison and Lotus ablation: the same LLaMA, data and token budget for every optimizer, over seeds.

Each run is a real ``pretrain.py`` process (one after the other, so timings do not compete). Writes, into --out:
``results.csv`` (one row per run), ``results.md`` (per method: mean ± std over the seeds of the validation
perplexity, and the switches), ``val_loss.png`` (validation loss vs tokens and vs training wall time, mean over the
seeds with ± std error bars), plus every run's directory under ``runs/``.

    python scripts/compare.py                          # CPU default: tiny LLaMA, embedded corpus, seeds 1, 2, 3
    python scripts/compare.py --methods adamw,galore,lotus --seeds 0
    python scripts/compare.py --sweep lotus            # Lotus's gamma x eta grid (the paper's sensitivity study)
    python scripts/compare.py --preset cpu_long --methods "adamw,galore (svd+fixed),rsvd+fixed,lotus (rsvd+displacement)" --seeds 1
    # GaLore's 60M protocol on C4 on a GPU node (needs a C4 mirror and T5's tokenizer):
    python scripts/compare.py --preset galore_60m --nproc 8 --seeds 0 --extra data.path=/data/c4
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.train.config import merge_overrides  # noqa: E402  (after the path, for a plain checkout)
from lotus_dist.train.metrics import read_metrics  # noqa: E402

# name -> overrides. The ablation rows of the Lotus paper: svd+fixed is GaLore, rsvd+displacement is Lotus.
RUNS = {
    "adamw": ["optim.name=adamw"],
    # AdamW's lr sweep (the preset's adamw_lr is its default row above)
    **{f"adamw lr={lr:g}": ["optim.name=adamw", f"optim.lr={lr:g}"] for lr in (0.001, 0.002, 0.003, 0.006, 0.01)},
    "galore (svd+fixed)": ["optim.name=galore"],
    "rsvd+fixed": ["optim.name=lotus", "optim.switch=fixed"],
    "lotus (rsvd+displacement)": ["optim.name=lotus"],
    "lotus_rho": ["optim.name=lotus_rho"],
    "golore": ["optim.name=golore"],
    "grassjump": ["optim.name=grassjump"],
    "grasswalk": ["optim.name=grasswalk"],
    "osd": ["optim.name=osd"],
    "fira": ["optim.name=fira"],
    "projfactor": ["optim.name=projfactor"],
    "apollo": ["optim.name=apollo"],
    "apollo_mini": ["optim.name=apollo_mini"],
    # APOLLO's sensitivity to lr at a short horizon (its published lr is the recipe's 0.01)
    **{f"{m} lr={lr:g}": [f"optim.name={m}", f"optim.lr={lr:g}"] for m in ("apollo", "apollo_mini")
       for lr in (0.001, 0.003, 0.02)},
    # A control for the AdamW row: GaLore at full rank (r = the model's dim 128 of the cpu presets: the basis is a
    # rotation, nothing is dropped) keeps the low-rank recipe's split step sizes (lr on the plain parameters,
    # alpha * lr on the matrices), which a single-lr AdamW cannot have.
    "galore r=full": ["optim.name=galore", "optim.rank=128"],
    # Combinations of the four parts (issue 28): Lotus's adaptive rsvd subspace with Fira's residual, and inside
    # APOLLO (its channel-wise scaled raw gradient and alpha = 1) in place of the Gaussian projection on a clock.
    "lotus+fira": ["optim.name=lotus", "optim.residual=fira"],
    "lotus+apollo": ["optim.name=apollo", "optim.solver=rsvd", "optim.switch=displacement"],
}

PRESETS = {
    # The embedded default run (200 steps x 2048 tokens), every method: about 2 min each on 2 idle cores.
    # T = 50 for the fixed policies: GaLore's 200 would never switch in 200 steps (Lotus: eta = 20 in tiny.yaml).
    "cpu": {"config": "configs/tiny.yaml", "overrides": ["train.steps=200", "train.eval_every=40", "checkpoint.every=0",
                                                          "log.every=10", "log.progress=false", "optim.update_gap=50"],
            "adamw_lr": 0.003},
    # Room for switching policies to differ: 1,000 steps of a ~10M-parameter LLaMA (dim 256, 6 layers; 9.7M with
    # the 8k vocabulary) on the embedded corpus, T = 100; ~15 min a run on 2 cores.
    "cpu_long": {"config": "configs/tiny.yaml",
                 "overrides": ["model.dim=256", "model.n_layers=6", "model.n_heads=8", "model.ffn_dim=688",
                               "train.steps=1000", "train.eval_every=100", "checkpoint.every=0", "log.every=20",
                               "log.progress=false", "optim.update_gap=100", "optim.rank=64"],
                 "adamw_lr": 0.003},
    # GaLore's 60M protocol (docs/algorithms.md section 12): 10K steps, batch 512 x 256 on C4, for a GPU node.
    "galore_60m": {"config": "configs/llama_60m.yaml", "overrides": ["log.progress=false", "checkpoint.every=0"],
                   "adamw_lr": 0.001},
}


# Lotus's sensitivity study (its paper asks for gamma in {0.005, 0.01, 0.02}, eta in {25, 50, 100}).
SWEEP_GAMMAS, SWEEP_ETAS = (0.005, 0.01, 0.02), (25, 50, 100)


def sweep_runs(steps: int) -> tuple[dict, str]:
    """The gamma x eta grid as runs. A displacement switch is guaranteed by tau ~ 2/gamma: where that is beyond half
    the run (gamma = 0.005 needs 400 steps), every gamma is scaled by the same factor so the smallest one can switch."""
    scale = max(1.0, 2 / (min(SWEEP_GAMMAS) * steps / 2))
    runs = {f"lotus g={g * scale:g} eta={eta}": ["optim.name=lotus", f"optim.gamma={g * scale:g}",
                                                 f"optim.verify_gap={eta}"]
            for g in SWEEP_GAMMAS for eta in SWEEP_ETAS}
    note = (f"gamma scaled x{scale:g} from the paper's {SWEEP_GAMMAS} (2/gamma must fit in half of {steps} steps)"
            if scale > 1 else "the paper's values")
    return runs, note


def finished(run_dir: Path, steps: int) -> bool:
    """A run that reached its last step and evaluated there (compare runs keep no checkpoints to resume from)."""
    try:
        lines = read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return False
    return any(l.get("step") == steps and "val_loss" in l for l in lines)


def run_one(name: str, overrides: list[str], preset: dict, out: Path, extra: list[str], nproc: int,
            seed: int, keep_finished: bool = False) -> Path:
    run_dir = out / "runs" / (name.split(" (")[0].replace(" ", "_").replace("=", "") + f"_seed{seed}")
    launcher = [sys.executable] if nproc <= 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    # Full-rank AdamW diverges at the low-rank methods' lr 0.01: its own lr unless the row or --extra sets one.
    adamw_lr = [f"optim.lr={preset['adamw_lr']}"] if "optim.name=adamw" in overrides else []
    args = [*launcher, str(REPO / "pretrain.py"), "--config", str(REPO / preset["config"]),
            *merge_overrides(preset["overrides"], adamw_lr, overrides, extra,
                             [f"run.dir={run_dir}", "checkpoint.resume=false", f"seed={seed}",
                              f"optim.seed={seed}"])]
    steps = int(next(o.split("=")[1] for o in merge_overrides(preset["overrides"], extra) if o.startswith("train.steps=")))
    if keep_finished and finished(run_dir, steps):
        print(f"  {name:28s} seed {seed} kept (finished earlier)", flush=True)
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {name:28s} seed {seed} done in {time.perf_counter() - started:6.1f} s", flush=True)
    return run_dir


def summarise(name: str, seed: int, run_dir: Path) -> dict:
    lines = read_metrics(run_dir)
    evals = [l for l in lines if "val_loss" in l]
    last = lines[-1]
    return {
        "method": name,
        "seed": seed,
        "val_ppl": round(evals[-1]["val_ppl"], 3),
        "val_loss": round(evals[-1]["val_loss"], 4),
        "tokens": last["tokens"],
        "tokens_per_s": round(statistics.median(l["tokens_per_s"] for l in lines[1:] or lines)),
        "optimizer_state_MiB": round(last["optimizer_state_bytes"] / 2**20, 2),
        "switches": last["switches"],
        "refresh_s": round(last.get("refresh_s", 0.0), 2),
        "train_s": round(last.get("train_s", 0.0), 1),
        "curve": [(l["tokens"], l["train_s"], l["val_loss"]) for l in evals],
    }


COLUMNS = ["method", "seed", "val_ppl", "val_loss", "tokens", "tokens_per_s", "optimizer_state_MiB", "switches",
           "refresh_s", "train_s"]
SUMMARY = ["method", "seeds", "val_ppl (mean ± std)", "switches (mean)", "tokens_per_s (median)", "refresh share",
           "optimizer_state_MiB"]


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def write_outputs(rows: list[dict], out: Path, header: str) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md = [header, "", "| " + " | ".join(SUMMARY) + " |", "|" + "---|" * len(SUMMARY)]
    for method, runs in by_method(rows).items():
        cells = [method, ",".join(str(r["seed"]) for r in runs), _mean_std([r["val_ppl"] for r in runs]),
                 f"{statistics.mean(r['switches'] for r in runs):g}",
                 f"{statistics.median(r['tokens_per_s'] for r in runs):.0f}",
                 # the basis solvers' share of the training time (what Lotus's rsvd and adaptive switch save)
                 f"{statistics.mean(r['refresh_s'] / r['train_s'] for r in runs if r['train_s']):.1%}",
                 f"{runs[0]['optimizer_state_MiB']}"]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Per run:", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors  # one distinct colour (and a line style) per method
    for i, (method, runs) in enumerate(by_method(rows).items()):
        curves = [list(zip(*r["curve"])) for r in runs]  # per run: tokens, seconds, losses
        tokens = curves[0][0]
        losses = list(zip(*[c[2] for c in curves]))  # per evaluation point: the seeds' losses
        mean = [statistics.mean(v) for v in losses]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses]
        seconds = [statistics.mean(v) for v in zip(*[c[1] for c in curves])]
        style = dict(marker="o", ms=3, capsize=2, color=colors[(2 * i) % 20 + (2 * i) // 20],
                     ls="-" if i % 2 == 0 else "--", label=method)
        by_tokens.errorbar(tokens, mean, yerr=std, **style)
        by_time.errorbar(seconds, mean, yerr=std, **style)
    by_tokens.set(xlabel="training tokens", ylabel="validation loss (mean ± std over seeds)",
                  title="validation loss vs tokens")
    by_time.set(xlabel="training wall time (s)", ylabel="validation loss (mean ± std over seeds)",
                title="validation loss vs wall time")
    for ax in (by_tokens, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument("--out", default="docs/results", help="output directory")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (section.key=value)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (>1: torchrun, FSDP2)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (model init, data order, bases)")
    parser.add_argument("--sweep", choices=["lotus"], default=None,
                        help="instead of the methods: Lotus's gamma x eta grid (scaled to the run length if needed)")
    parser.add_argument("--keep-finished", action="store_true",
                        help="reuse runs under --out that already finished (same names); rerun the others")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    runs, sweep_note = dict(RUNS), ""
    if args.sweep:
        steps = int(next(o.split("=")[1] for o in preset["overrides"] if o.startswith("train.steps=")))
        runs, sweep_note = sweep_runs(steps)
        chosen = list(runs)
    else:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in runs]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(runs)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"comparing {len(chosen)} runs, preset {args.preset}, on {machine}", flush=True)
    rows = [summarise(name, seed, run_one(name, runs[name], preset, out, args.extra, args.nproc, seed,
                                                 args.keep_finished))
            for name in chosen for seed in seeds]
    header = (f"Preset `{args.preset}` ({preset['config']} {' '.join(preset['overrides'] + args.extra)}), "
              f"seeds {','.join(map(str, seeds))}, machine: {machine}." + (f" Sweep: {sweep_note}." if sweep_note else ""))
    write_outputs(rows, out, header)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
