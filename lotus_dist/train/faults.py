"""Deterministic fault injection for the reliability tests (``LOTUS_FAULT`` environment variable).

A crash at a chosen point is the only way to test recovery repeatably. The variable holds one fault:
``<where>:rank=<r>:step=<s>`` with ``where`` one of ``after_step`` (SIGKILL right after optimizer step s),
``in_save`` (SIGKILL in the middle of writing the step-s checkpoint, after the shards and before the completion
marker) or ``nan_grad`` (a NaN in one gradient of rank r during step s, as an overflow would produce). It fires
only on the first torchrun attempt (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so an elastic restart runs clean. Unset in normal runs: then every check is one environment lookup.
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


def active(where: str, rank: int, step: int) -> bool:
    fault = _parse(os.environ.get("LOTUS_FAULT"))
    if fault is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    return (fault["where"], fault["rank"], fault["step"]) == (where, rank, step)


def maybe_crash(where: str, rank: int, step: int) -> None:
    if active(where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_gradients(params, rank: int, step: int) -> None:
    """``nan_grad``: put a NaN into the first gradient of ``params`` this rank holds (before the update)."""
    if active("nan_grad", rank, step):
        grad = next(p.grad for p in params if p.grad is not None)
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")
