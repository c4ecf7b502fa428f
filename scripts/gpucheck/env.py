"""Section 1: the machine — GPU, driver, torch / CUDA / cuDNN / NCCL versions, a matmul's TFLOP/s as a yardstick."""

from __future__ import annotations

import platform
import shutil
import subprocess
import time

import torch

from .cli import REPO
from .items import Check
from .plan import Plan, sync
from .report import GIB


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


def tool_output(cmd: list[str], timeout: float) -> str:
    """A small tool's output, or why there is none (absent, failed, too slow): never an error of the check."""
    if shutil.which(cmd[0]) is None:
        return f"unknown ({cmd[0]} not found)"
    try:
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return f"unknown ({cmd[0]} took over {timeout:.0f} s)"
    return out.stdout.strip() if out.returncode == 0 else f"unknown ({out.stderr.strip()[:200] or 'failed'})"


def section_env(run: Check) -> None:
    plan = run.plan
    quick = min(10.0, max(run.budget.left(), 0))
    rows = [["python", platform.python_version()], ["torch", torch.__version__],
            ["CUDA (torch built with)", torch.version.cuda or "none"], ["device under test", str(plan.device)]]
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        run.ctx["gpu_name"] = props.name
        rows += [["GPU", f"{props.name}, {props.total_memory / GIB:.0f} GiB, {props.multi_processor_count} SMs"],
                 ["cuDNN", str(torch.backends.cudnn.version())],
                 ["NCCL", ".".join(str(x) for x in torch.cuda.nccl.version())],
                 ["driver, max SM clock", tool_output(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                                                       "--format=csv,noheader"], quick)]]
    else:
        rows.append(["CPU threads", str(torch.get_num_threads())])
    rows.append(["lotus_dist commit", tool_output(["git", "rev-parse", "--short", "HEAD"], quick)])
    n, dtype = plan.yardstick
    done, tflops = run.attempt(f"{n}^3 matmul yardstick", plan.needs["env"], plan.limits["env"],
                               lambda: matmul_tflops(plan))
    if done:
        run.ctx["yardstick_tflops"] = tflops
        rows.append([f"{n}x{n}x{n} {str(dtype).replace('torch.', '')} matmul", f"{tflops:.3g} TFLOP/s (mean of 10)"])
    run.report.table(["what", "value"], rows)
