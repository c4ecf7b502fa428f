#!/usr/bin/env python
"""GPU proof: check the CUDA / NCCL / bf16 path and measure speed and memory on one GPU, in one command.

    python scripts/gpu_check.py --report gpu_report.md          # a CUDA machine, within --budget (default 480 s)
    python scripts/gpu_check.py --dry-run                       # every section on the CPU, tiny shapes, ~1 min
    python scripts/gpu_check.py --only speed,memory             # some sections again

Needs: torch, numpy, pyyaml, sentencepiece, and pytest for the correctness section (gpucheck/needs.py; not
``datasets``, ``deepspeed``, ``megatron-core``, ``tensorboard``; no install of lotus_dist: it puts the repository on
the path). They are checked first: if one is missing, one line says what to pip install, and the exit code is 2.
The report is Markdown, rewritten after every section, so a run cut off still reports what it finished. The exit
code is 1 when a check failed (a correctness test, the NCCL run, its resume, a basis that misses the energy of the
exact one, a subprocess that overran its own limit); measurements are reported, not judged.

Sections:
1. env — GPU, driver, torch / CUDA / NCCL versions, a bf16 matrix product's TFLOP/s as a yardstick.
2. correctness — ``pytest -m gpu tests/gpu`` (LowRankAdamW on the device equals CPU fp64; svd / rsvd bases on the
   device; bf16 autocast loss within 2 % of fp32 after 50 steps), then ``torchrun --nproc_per_node=1 pretrain.py
   dist.mode=fsdp`` (NCCL on a GPU; FSDP2 with bf16 mixed precision; DCP checkpoints at steps 10 and 20) and a
   resume from step 10 whose losses must equal the uninterrupted run's.
3. speed — basis refresh svd vs rsvd at LLaMA-1B/7B MLP shapes (time, ratio, energy captured); the training step
   of adamw, galore and lotus, and lotus with its blocks compiled (train.compile), at llama_350m and llama_1b
   (steady, amortised over the switch interval, tokens/s, MFU, compiled / eager tokens/s) and the optimizer step
   alone.
4. memory — peak allocated of one steady training step at llama_1b for adamw, galore, lotus, lotus + per-layer
   updates, and + activation checkpointing; and (peak - weights) against galore.

The whole check ends within ``--budget`` seconds (start-up included): every item (a subprocess, a shape, a
method) runs with a time limit of min(its own limit, the budget left less a reserve for the report); one that cannot
fit is skipped, one that overruns is stopped (a subprocess with its whole process tree), and the report says which
and why. The dry run uses the same code with tiny shapes on the CPU (gloo instead of NCCL), so the script cannot rot
between GPU sessions; tests/gpu/test_gpu_check.py runs it.
"""

import time

START = time.monotonic()  # the budget counts from here: importing torch and starting CUDA are part of it

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
for entry in (str(REPO / "scripts"), str(REPO)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

from gpucheck import cli, needs  # noqa: E402  (stdlib only: nothing is imported before the needs are checked)


def main(argv=None, start=None) -> int:
    args = cli.parse(argv, __doc__)
    lacking = needs.missing(args.sections)
    if lacking:
        print(needs.need_line(lacking), file=sys.stderr, flush=True)
        return 2
    from gpucheck.run import run_check

    return run_check(args, time.monotonic() if start is None else start)


if __name__ == "__main__":
    sys.exit(main(start=START))
