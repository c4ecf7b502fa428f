"""The parts of scripts/gpu_check.py (the entry point; run that, not this package).

Stdlib only, importable before the needs are checked: cli (arguments), needs (what must be installed), budget (the
time budget, time limits, process-tree kills), report (the Markdown report), items (one bounded item of a section).
The sections, which import torch and lotus_dist: plan, env, correctness, speed (mfu: its FLOP formula), memory; run
ties them together.
"""
