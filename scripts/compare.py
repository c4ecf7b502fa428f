#!/usr/bin/env python
"""Method comparison and Lotus ablation: the same LLaMA, data, token budget and seed for every optimizer.

Each run is a real ``pretrain.py`` process (one after the other, so timings do not compete). Writes, into --out:
``results.csv``, ``results.md`` (a Markdown table) and ``val_loss.png`` (validation loss vs tokens and vs training
wall time), plus every run's directory under ``runs/``.

    python scripts/compare.py                          # CPU default: tiny LLaMA, embedded corpus (< 30 min, 2 cores)
    python scripts/compare.py --methods adamw,galore,lotus --steps 100
    # GaLore's 60M protocol on C4 on a GPU node (needs a C4 mirror and T5's tokenizer):
    python scripts/compare.py --preset galore_60m --nproc 8 --extra data.path=/data/c4
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
    "adamw lr=0.01": ["optim.name=adamw", "optim.lr=0.01"],
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
}

PRESETS = {
    # The embedded default run (200 steps x 2048 tokens), every method: about 2 min each on 2 idle cores.
    # T = 50 for the fixed policies: GaLore's 200 would never switch in 200 steps (Lotus: eta = 20 in tiny.yaml).
    "cpu": {"config": "configs/tiny.yaml", "overrides": ["train.steps=200", "train.eval_every=40", "checkpoint.every=0",
                                                          "log.every=10", "log.progress=false", "optim.update_gap=50"],
            "adamw_lr": 0.003},
    # GaLore's 60M protocol (ALGORITHMS.md section 8): 10K steps, batch 512 x 256 on C4, for a GPU node.
    "galore_60m": {"config": "configs/llama_60m.yaml", "overrides": ["log.progress=false", "checkpoint.every=0"],
                   "adamw_lr": 0.001},
}


def run_one(name: str, overrides: list[str], preset: dict, out: Path, extra: list[str], nproc: int) -> Path:
    run_dir = out / "runs" / name.split(" (")[0].replace(" ", "_").replace("=", "")
    launcher = [sys.executable] if nproc <= 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    # Full-rank AdamW diverges at the low-rank methods' lr 0.01: its own lr unless the row or --extra sets one.
    adamw_lr = [f"optim.lr={preset['adamw_lr']}"] if "optim.name=adamw" in overrides else []
    args = [*launcher, str(REPO / "pretrain.py"), "--config", str(REPO / preset["config"]),
            *merge_overrides(preset["overrides"], adamw_lr, overrides, extra,
                             [f"run.dir={run_dir}", "checkpoint.resume=false"])]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  {name:28s} done in {time.perf_counter() - started:6.1f} s", flush=True)
    return run_dir


def summarise(name: str, run_dir: Path) -> dict:
    lines = read_metrics(run_dir)
    evals = [l for l in lines if "val_loss" in l]
    last = lines[-1]
    return {
        "method": name,
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


COLUMNS = ["method", "val_ppl", "val_loss", "tokens", "tokens_per_s", "optimizer_state_MiB", "switches", "refresh_s",
           "train_s"]


def write_outputs(rows: list[dict], out: Path, header: str) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors  # one distinct colour (and a line style) per run
    for i, r in enumerate(rows):
        tokens, seconds, loss = zip(*r["curve"])
        style = dict(marker="o", ms=3, color=colors[(2 * i) % 20 + (2 * i) // 20], ls="-" if i % 2 == 0 else "--",
                     label=r["method"])
        by_tokens.plot(tokens, loss, **style)
        by_time.plot(seconds, loss, **style)
    by_tokens.set(xlabel="training tokens", ylabel="validation loss", title="validation loss vs tokens")
    by_time.set(xlabel="training wall time (s)", ylabel="validation loss", title="validation loss vs wall time")
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
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in RUNS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(RUNS)}")
    preset = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"comparing {len(chosen)} runs, preset {args.preset}, on {machine}", flush=True)
    rows = [summarise(name, run_one(name, RUNS[name], preset, out, args.extra, args.nproc)) for name in chosen]
    header = (f"Preset `{args.preset}` ({preset['config']} {' '.join(preset['overrides'] + args.extra)}), "
              f"seed 0, one run per method, machine: {machine}.")
    write_outputs(rows, out, header)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
