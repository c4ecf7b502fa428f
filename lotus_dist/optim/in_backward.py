"""Optimizer-in-backward (``optim.per_layer=true``): each unit of weights is updated as soon as its gradients are
ready, and its gradients are freed at once, so the full gradient of the whole model never exists.

A unit is a group of parameters updated together: a transformer block (one FSDP unit), and the parameters outside
the blocks (the FSDP root). ``register_post_accumulate_grad_hook`` tells us when a parameter's gradient is ready;
under FSDP2 it fires on the sharded parameter right after the unit's reduce-scatter, so all of a unit's hooks fire
together. When a unit's last gradient arrives, ``LowRankAdamW.step_unit`` updates it with one statistics reduction
(switch consensus, non-finite check, optional per-unit clipping) and the gradients are dropped.

No host sync per unit on ordinary steps: a unit with nothing to decide (no switch, no check) steps on the device
(``step_unit(defer=True)``: its norm, clipping and non-finite mask stay device scalars), and the caller reads every
unit's norm and finiteness in the step's one host sync (``finish_step`` -> ``StepReport.device_values`` ->
``resolve``), which also rolls back the host counters of a unit found non-finite. Units that check or switch this
step decide on the host, one sync each, as their decisions need.

Gradient accumulation over k micro-batches: a projected matrix whose step will neither switch nor check keeps only
R = project(G) (long side x r) between micro-batches instead of G (m x n), so accumulation keeps the saving. A
matrix that needs G this step (its first basis, a scheduled switch, a displacement check step that may switch,
path-efficiency's sketch, a Fira residual, online PCA) and every plain parameter accumulate the full gradient as
usual. Under FSDP every micro-batch reduce-scatters (no ``no_sync``): that is what fires the hooks on the shards.

The LR schedule and the step counter advance once per optimizer step in the trainer, never in a hook.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import nn

from lotus_dist.counters import to_host

from .lowrank import UnitStep


def units_of(model: nn.Module, root_as_one_unit: bool = False) -> list[list[nn.Parameter]]:
    """The update units of a model with blocks in ``model.layers``: one per block, then the other parameters.

    The parameters outside the blocks form one unit under FSDP (the root unit: their gradients arrive together);
    in one process each is its own unit, so the large lm_head gradient is freed as soon as it is used.
    """
    in_blocks: set[int] = set()
    units = []
    for block in model.layers:
        params = [p for p in block.parameters() if p.requires_grad]
        in_blocks.update(id(p) for p in params)
        units.append(params)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_blocks]
    units.extend([rest] if root_as_one_unit else [[p] for p in rest])
    return [u for u in units if u]


class OptimizerInBackward:
    """Drives ``optimizer.step_unit`` from post-accumulate-grad hooks.

    Per optimizer step: ``begin_micro_batch(i)`` before the backward of micro-batch i (0 starts the step), then
    ``end_step()`` after the last backward. ``on_nonfinite``: ``skip`` leaves a unit with a non-finite gradient
    untouched and goes on with the others; ``stop`` updates nothing more in this step (the caller stops the run
    without saving this partly applied step). ``before_update(params)`` runs on a unit's gradients just before its
    update (fault injection in tests).
    """

    def __init__(self, optimizer, units: Iterable[Iterable[nn.Parameter]], *, grad_accum: int = 1,
                 max_unit_norm: float = 0.0, on_nonfinite: str = "skip",
                 before_update: Callable[[list[nn.Parameter]], None] | None = None):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        if max_unit_norm > 0.0 and grad_accum > 1:
            raise ValueError("per-unit clipping needs each unit's whole gradient, which low-rank accumulation does "
                             "not keep: use one micro-batch per step or no clipping")
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite: {on_nonfinite!r} is not one of skip, stop")
        self.optimizer = optimizer
        self.units = [list(u) for u in units]
        self.grad_accum = grad_accum
        self.max_unit_norm = max_unit_norm
        self.on_nonfinite = on_nonfinite
        self.before_update = before_update
        self._unit_of = {id(p): i for i, unit in enumerate(self.units) for p in unit}
        if len(self._unit_of) != sum(map(len, self.units)):
            raise ValueError("a parameter appears in more than one update unit")
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for u in self.units for p in u]
        self._last = True
        self._start_step()

    # ---- per step ------------------------------------------------------------------------------------------
    def _start_step(self) -> None:
        self._deferred = []  # UnitSteps of units updated on the device this step
        self._ok_so_far = None  # on_nonfinite=stop: device bool, no unit of the step so far was non-finite
        self._seen = [0] * len(self.units)
        self._done = [False] * len(self.units)
        self._accumulated: dict[int, torch.Tensor] = {}
        self._projected_ids: set[int] = set()
        self._norm_sq = 0.0
        self._nonfinite_units = 0
        self._halted = False

    def begin_micro_batch(self, index: int) -> None:
        if not 0 <= index < self.grad_accum:
            raise ValueError(f"micro-batch index {index} outside [0, {self.grad_accum})")
        if index == 0:
            self._start_step()
            if self.grad_accum > 1:  # decided once, from the state before the step
                self._projected_ids = {id(p) for u in self.units for p in u
                                       if self.optimizer.accumulates_projected(p)}
        self._seen = [0] * len(self.units)
        self._last = index == self.grad_accum - 1

    def end_step(self) -> dict:
        """``finish_step`` and its report read at once (one host sync; the trainer folds it into its own)."""
        report = self.finish_step()
        values = report.device_values
        return report.resolve(to_host(torch.stack(values)) if values else [])

    def finish_step(self) -> "StepReport":
        """Update the units whose gradients did not all arrive (unused parameters), then report the step: a
        ``StepReport`` whose ``device_values`` the caller reads on the host and hands to ``resolve`` for
        ``grad_norm`` (global, before clipping; None when some matrices only kept R), ``nonfinite_units``,
        ``halted`` (on_nonfinite=stop met a non-finite gradient)."""
        for u, unit in enumerate(self.units):
            if self._done[u]:
                continue
            for p in unit:
                if p.grad is None and id(p) in self._accumulated:  # used earlier in the step, not in the last
                    p.grad = torch.zeros_like(p)  # micro-batch: its R is all there is to apply
            if any(p.grad is not None for p in unit):
                self._step(u)
        report = StepReport(self._deferred, self._norm_sq, self._nonfinite_units, self._halted,
                            exact=not self._projected_ids, stop=self.on_nonfinite == "stop")
        self._start_step()
        return report

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self._last:
            if id(p) in self._projected_ids:  # keep R only: G (m x n) is freed right here
                R = self.optimizer.project_gradient(p)
                acc = self._accumulated.get(id(p))
                self._accumulated[id(p)] = R if acc is None else acc.add_(R)
                p.grad = None
            return
        u = self._unit_of[id(p)]
        self._seen[u] += 1
        if self._seen[u] == len(self.units[u]):
            self._step(u)

    def _step(self, u: int) -> None:
        unit = self.units[u]
        self._done[u] = True
        stop = self.on_nonfinite == "stop"
        if stop and self._ok_so_far is not None and not self._halted and not self.optimizer.can_defer(unit):
            # a unit that decides on the host (a check or switch step) first learns whether an earlier unit
            # stepped on the device was non-finite: then it must not update either
            self._halted = not to_host(self._ok_so_far)
        if not self._halted:
            if self.before_update is not None:
                self.before_update(unit)
            projected = {id(p): self._accumulated.pop(id(p)) for p in unit if id(p) in self._accumulated}
            out = self.optimizer.step_unit(unit, projected=projected, max_norm=self.max_unit_norm, defer=True,
                                           gate=self._ok_so_far if stop else None)
            if isinstance(out, UnitStep):  # stepped on the device: read with the step's one host sync
                self._deferred.append(out)
                if stop:  # the units after a non-finite one are masked too (ok = finite and all before ok)
                    self._ok_so_far = out.ok
            else:
                self._norm_sq += out
                if not math.isfinite(out):
                    self._nonfinite_units += 1
                    self._halted = self.on_nonfinite == "stop"
        for p in unit:
            p.grad = None


class StepReport:
    """One optimizer step of ``OptimizerInBackward``: what the host-decided units reported, and the device scalars
    of the units stepped on the device (``device_values``: their summed squared norm, then each one's finiteness),
    which the caller reads in its one host sync and passes to ``resolve``."""

    def __init__(self, deferred: list, norm_sq: float, nonfinite_units: int, halted: bool, *, exact: bool,
                 stop: bool):
        self.deferred = deferred
        self.norm_sq, self.nonfinite_units, self.halted = norm_sq, nonfinite_units, halted
        self.exact, self.stop = exact, stop

    @property
    def device_values(self) -> list[torch.Tensor]:
        if not self.deferred:
            return []
        return [torch.stack([u.norm_sq.float() for u in self.deferred]).sum(),
                *[u.ok.float() for u in self.deferred], *[u.finite.float() for u in self.deferred]]

    def resolve(self, values: list[float]) -> dict:
        norm_sq, bad = self.norm_sq, self.nonfinite_units
        if self.deferred:
            n = len(self.deferred)
            norm_sq += values[0]
            for unit, ok, finite in zip(self.deferred, values[1:1 + n], values[1 + n:]):
                if not ok:  # masked on the device: its weights and moments did not move; now its counters
                    unit.undo()
                bad += not finite
        return {
            "grad_norm": math.sqrt(norm_sq) if self.exact or not math.isfinite(norm_sq) else None,
            "nonfinite_units": bad,
            "halted": self.halted or (self.stop and bad > self.nonfinite_units),
        }


__all__ = ["OptimizerInBackward", "StepReport", "units_of"]
