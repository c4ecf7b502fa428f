"""The check itself, once the needs are known to be installed: the sections in order, each item bounded by the
budget, the report written after every section."""

from __future__ import annotations

import shutil
import signal
import threading
import tempfile
import time
from pathlib import Path

import torch

from . import correctness, env, memory, speed
from .budget import Budget
from .items import Check
from .plan import plan_for
from .report import Report

# (key of --only, title in the report, module, its section function's name: looked up at run time, so a test can
# replace it)
SECTION_TABLE = [
    ("env", "1. Environment", env, "section_env"),
    ("correctness", "2. Correctness", correctness, "section_correctness"),
    ("speed", "3. Speed (one GPU, bf16)", speed, "section_speed"),
    ("memory", "4. Memory (one GPU)", memory, "section_memory"),
]


def exit_on_sigterm(signum, frame):
    """A job limit's SIGTERM becomes SystemExit, so a running subprocess item (in a session of its own, out of
    reach of a kill of this process group) is killed with its tree on the way out."""
    raise SystemExit(128 + signum)


def run_check(args, start: float) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _run_check(args, start)
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return _run_check(args, start)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_check(args, start: float) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        args.error("no CUDA device: run on a GPU machine, or use --dry-run to exercise every section on the CPU")
    plan = plan_for(args.dry_run)
    if plan.device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    what = "dry run on the CPU (tiny shapes)" if args.dry_run else torch.cuda.get_device_name(0)
    report = Report(args.report, f"lotus_dist GPU check — {what}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    budget = Budget(args.budget, start=start)
    report.add(f"Budget {args.budget:.0f} s (start-up included; {budget.reserve:.0f} s kept for the end); every item "
               f"runs within what is left, or is skipped with the reason.")
    report.add()
    report.write()
    work = args.work or Path(tempfile.mkdtemp(prefix="lotus_gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    run = Check(report=report, budget=budget, plan=plan, work=work)
    try:
        for key, title, module, function in SECTION_TABLE:
            if key in args.sections:
                with report.section(title):
                    getattr(module, function)(run)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    verdict = report.verdict()
    report.add(f"**{verdict}** ({budget.elapsed():.0f} s in all, budget {args.budget:.0f} s)")
    report.write()
    print(f"{verdict}; report: {args.report}", flush=True)
    return 1 if report.failures else 0
