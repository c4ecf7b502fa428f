"""The command line of scripts/gpu_check.py (stdlib only: it is parsed before the needs are checked)."""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("env", "correctness", "speed", "memory")
# The device tool and most job limits allow 600 s per command: the default leaves the start-up and a margin.
DEFAULT_BUDGET = 480.0


def parse(argv, description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny shapes (~1 min)")
    p.add_argument("--report", type=Path, default=REPO / "runs" / "gpu_check" / "report.md")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help="seconds for the whole check, start-up included; every item is bounded by what is left, "
                        "items that cannot fit are skipped (default %(default)g)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown section(s) {unknown} (known: {', '.join(SECTIONS)})")
    if args.budget <= 0:
        p.error(f"--budget: {args.budget:g} s is not a positive number of seconds")
    args.error = p.error
    return args
