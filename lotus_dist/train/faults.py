"""Deterministic fault injection for the reliability tests (``LOTUS_FAULT`` environment variable).

A crash at a chosen point is the only way to test recovery repeatably. The variable holds one fault:
``<where>:rank=<r>:step=<s>`` with ``where`` one of ``after_step`` (SIGKILL right after optimizer step s) or
``in_save`` (SIGKILL in the middle of writing the step-s checkpoint, after the shards and before the completion
marker). It fires only on the first torchrun attempt (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so an elastic
restart runs clean. Unset in normal runs: then every check is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def _parse(text: str | None) -> dict | None:
    if not text:
        return None
    where, *fields = text.split(":")
    spec = dict(f.split("=", 1) for f in fields)
    return {"where": where, "rank": int(spec.get("rank", 0)), "step": int(spec["step"])}


_FAULT = _parse(os.environ.get("LOTUS_FAULT"))


def maybe_crash(where: str, rank: int, step: int) -> None:
    if _FAULT is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if (_FAULT["where"], _FAULT["rank"], _FAULT["step"]) == (where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
