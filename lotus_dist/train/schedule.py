"""Learning-rate schedule of the GaLore recipe: linear warmup, then cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for 0-based optimizer ``step``.

    A pure function of the step, so a resumed run (or one stopped early with ``train.stop_at``) follows exactly the
    schedule of an uninterrupted one.
    """
    warmup = int(round(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
