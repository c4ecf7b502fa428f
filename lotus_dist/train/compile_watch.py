"""Recompiles of a ``train.compile=true`` run: graphs torch.compile builds after the run has warmed up.

A run compiles once per shape and grad mode: its first training step (the blocks share one graph) and its first
evaluation (no_grad, another graph). Any graph built after those is a recompile (a guard that failed: a new shape,
dtype or flag), which costs a compile and hints at a step that is not what the others are; each is counted
(``recompiles`` in metrics.jsonl, cumulative for this process) and said in the log. The count is dynamo's own
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``: graphs compiled, process-wide, read as differences).
"""

from __future__ import annotations

import contextlib


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Counts the graphs compiled inside ``phase("step")`` / ``phase("eval")`` after the first of each phase."""

    def __init__(self, say=print):
        self.say = say
        self.recompiles = 0
        self.warmed: set[str] = set()

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        before = compiled_graphs()
        try:
            yield
        finally:
            new = compiled_graphs() - before
            if name in self.warmed and new:
                self.recompiles += new
                self.say(f"torch.compile built {new} graph(s) again in the {name} of step {step} after warm-up "
                         f"(a recompile; TORCH_LOGS=recompiles shows the guard that failed)")
            self.warmed.add(name)


__all__ = ["CompileWatch", "compiled_graphs"]
