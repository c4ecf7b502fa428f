"""Deterministic fault injection for the reliability tests (``LOTUS_FAULT`` environment variable).

A crash at a chosen point is the only way to test recovery repeatably. The variable holds one fault:
``<where>:rank=<r>:step=<s>`` (or ``step=<a>-<b>``: every step of that range) with ``where`` one of

- ``after_step``: SIGKILL right after optimizer step s;
- ``in_save``: SIGKILL in the middle of writing the step-s checkpoint, after the shards and before the marker;
- ``nan_grad``: a NaN in one gradient of rank r during step s, as an overflow would produce;
- ``nan_weight``: a NaN written into rank r's shard of the first parameter right after step s: a corrupt state
  whose loss is still finite, as a bad update or a damaged checkpoint would leave.

It fires only on the first torchrun attempt (``TORCHELASTIC_RESTART_COUNT`` 0 or unset), so an elastic restart runs
clean. Unset in normal runs: then every check is one environment lookup.
"""

from __future__ import annotations

import os
import signal


def _parse(text: str | None) -> dict | None:
    if not text:
        return None
    where, *fields = text.split(":")
    spec = dict(f.split("=", 1) for f in fields)
    first, _, last = spec["step"].partition("-")  # one step, or an inclusive range "a-b"
    return {"where": where, "rank": int(spec.get("rank", 0)), "steps": range(int(first), int(last or first) + 1)}


def active(where: str, rank: int, step: int) -> bool:
    fault = _parse(os.environ.get("LOTUS_FAULT"))
    if fault is None or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    return (fault["where"], fault["rank"]) == (where, rank) and step in fault["steps"]


def maybe_crash(where: str, rank: int, step: int) -> None:
    if active(where, rank, step):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison_gradients(params, rank: int, step: int) -> None:
    """``nan_grad``: put a NaN into the first gradient of ``params`` this rank holds (before the update)."""
    if active("nan_grad", rank, step):
        grad = next(p.grad for p in params if p.grad is not None)
        (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = float("nan")


def maybe_poison_weights(params, rank: int, step: int) -> None:
    """``nan_weight``: put a NaN into this rank's shard of the first parameter (after the update of ``step``)."""
    if active("nan_weight", rank, step):
        import torch

        with torch.no_grad():
            p = next(iter(params))
            (p.to_local() if hasattr(p, "to_local") else p).view(-1)[-1] = float("nan")


def flip_bit(path, fraction: float = 0.5) -> None:
    """Damage a file as a bad disk or a torn copy would: flip one bit at ``fraction`` of its length (tests and
    scripts/failure_drill.py)."""
    import pathlib

    path = pathlib.Path(path)
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * fraction))
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
