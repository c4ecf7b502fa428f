"""Optimizer-in-backward (``optim.per_layer=true``): each unit of weights is updated as soon as its gradients are
ready, and its gradients are freed at once, so the full gradient of the whole model never exists.

A unit is a group of parameters updated together: a transformer block (one FSDP unit), and the parameters outside
the blocks (the FSDP root). ``register_post_accumulate_grad_hook`` tells us when a parameter's gradient is ready;
under FSDP2 it fires on the sharded parameter right after the unit's reduce-scatter, so all of a unit's hooks fire
together. When a unit's last gradient arrives, ``LowRankAdamW.step_unit`` updates it with one statistics reduction
(switch consensus, non-finite check, optional per-unit clipping) and the gradients are dropped.

No collective and no host sync per unit on ordinary steps: a unit with nothing to decide (no switch, no check)
steps on the device (``step_unit(defer=True)``) from this rank's own values: its partial squared norm and a mask,
its shard's finiteness, both device scalars. The step's one reduction adds up every such unit's values
(``finish_step`` -> ``StepReport.partials``, which the trainer sums in its own all-reduce of the loss and stop flags,
read in its one host sync; ``end_step`` reduces them itself) and ``resolve`` reads the global per-unit verdict.
Units that check or switch this step, and every unit under per-unit clipping (``max_unit_norm`` > 0, which needs
the global norm before the update), reduce their norm with their statistics, one collective (and, to decide, one
sync) each.

The non-finite rule, without a collective per unit: each rank masks its own shard of a unit by its own
finiteness (weights and moments left as they were), and the end-of-step reduction counts, per unit, the ranks that
masked it. Where any rank did, the unit is non-finite for the step on every rank: its host counters (step, tau:
Adam's bias correction) are rolled back on every rank alike, so counters never differ between ranks, and it
counts in ``nonfinite_units`` (``skip``: the step is a skipped one; ``stop``: ``halted``). If a NaN reached only
some ranks' shards (a ``torn`` unit, ``torn_units`` in the report), the other ranks' shards did take that update:
an element-wise per-shard skip, finite and consistent, but not what one process (which skips the whole unit) would
do; with ``stop`` that state is never saved. Every other case (a finite step; a non-finite value that reached every
shard, as a NaN loss does) is exactly what one process does. ``stop`` also masks, on a rank, every unit after its
first masked one (the ``gate``); a unit that decides on the host reduces the gates with its statistics, so every
rank halts there together and the ranks never differ in the collectives they issue.

First bases across ranks: a unit whose matrices have no basis yet (the first step) would cost one statistics
reduction and a whole refresh (one collective per solver stage) per block. Where the statistics are reduced across
ranks (and without per-unit clipping), those units keep their gradient shards until the end of the backward and
step together in ``finish_step``: one reduction and one batched refresh for all of them (the first step then holds
every block's gradient shard, 1/W of the model per rank, as a whole-model step does; later steps do not). Their
non-finite check is then one for them all. In one process, where a reduction costs nothing, every unit steps in
its hook as usual.

On CUDA the unit steps run on a stream of their own, not on the stream FSDP2 calls the hooks on (its
reduce-scatter stream): ``unit_stream.py``; the step's end (``finish_step``) joins it.

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

from .subspace import IDENTITY
from .unit_step import UnitStep
from .unit_stream import UnitStream


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
        self.stream = UnitStream()  # CUDA: the updates' own stream (FSDP2's reduce-scatter stream is left alone)
        self._last = True
        self._start_step()

    # ---- per step ------------------------------------------------------------------------------------------
    def _start_step(self) -> None:
        self._deferred = []  # UnitSteps of units updated on the device this step
        self._ok_so_far = None  # on_nonfinite=stop: device bool, this rank masked no unit of the step so far
        self._seen = [0] * len(self.units)
        self._done = [False] * len(self.units)
        self._accumulated: dict[int, torch.Tensor] = {}
        self._projected_ids: set[int] = set()
        self._norm_sq = 0.0
        self._nonfinite_units = 0
        self._halted = False
        self._postponed: list[int] = []  # units needing a first basis, stepped together in finish_step

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
        """``finish_step``, its partial values reduced (one collective over the optimizer's statistics group) and
        read at once (one host sync); the trainer folds both into its own."""
        report = self.finish_step()
        partials = report.partials()
        values = [self.optimizer.stats_comm.reduce_stats(torch.stack(partials))] if partials else []
        values += [v.float().reshape(1) for v in report.reduced]
        return report.resolve(to_host(torch.cat(values)) if values else [])

    def finish_step(self) -> "StepReport":
        """Update the units whose gradients did not all arrive (unused parameters), join the optimizer stream, then
        report the step: a ``StepReport`` whose ``partials()`` the caller sums over the ranks and whose ``reduced``
        values it reads as they are, both in one host sync, and hands to ``resolve`` for ``grad_norm`` (global,
        before clipping; None when some matrices only kept R), ``nonfinite_units``, ``torn_units``, ``halted``
        (on_nonfinite=stop met a non-finite gradient)."""
        for u, unit in enumerate(self.units):
            if self._done[u]:
                continue
            for p in unit:
                if p.grad is None and id(p) in self._accumulated:  # used earlier in the step, not in the last
                    p.grad = torch.zeros_like(p)  # micro-batch: its R is all there is to apply
            if any(p.grad is not None for p in unit):
                self._step(u)
        if self._postponed:
            self._update(self._postponed)
        self.stream.join()  # before the host sync and the next forward: they read what the updates wrote
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
                with self.stream.run(p.device):
                    R = self.optimizer.project_gradient(p)
                    acc = self._accumulated.get(id(p))
                    self._accumulated[id(p)] = R if acc is None else acc.add_(R)
                self.stream.release(p.grad)
                p.grad = None
            return
        u = self._unit_of[id(p)]
        self._seen[u] += 1
        if self._seen[u] == len(self.units[u]):
            self._step(u)

    def _step(self, u: int) -> None:
        self._done[u] = True
        # per-unit clipping needs each unit's own norm: no batching there
        batch = self.optimizer.stats_comm is not IDENTITY and self.max_unit_norm <= 0.0
        if batch and self._needs_first_basis(self.units[u]):
            self._postponed.append(u)  # its gradients stay until finish_step
            return
        self._update([u])

    def _needs_first_basis(self, unit: list[nn.Parameter]) -> bool:
        opt = self.optimizer
        return any(opt._group_of(p).get("rank") is not None and opt.state.get(p, {}).get("n_bases", 0) == 0
                   for p in unit)

    def _update(self, us: list[int]) -> None:
        """Step the units ``us`` as one (several: the postponed first bases)."""
        unit = [p for u in us for p in self.units[u]]
        stop = self.on_nonfinite == "stop"
        if not self._halted:  # set only from reduced values: alike on every rank, so are the collectives below
            with self.stream.run(unit[0].device):
                if self.before_update is not None:
                    for u in us:
                        self.before_update(self.units[u])
                projected = {id(p): self._accumulated.pop(id(p)) for p in unit if id(p) in self._accumulated}
                out = self.optimizer.step_unit(unit, projected=projected, max_norm=self.max_unit_norm, defer=True,
                                               gate=self._ok_so_far if stop else None)
            if isinstance(out, UnitStep):  # stepped on the device: its values go into the step's one reduction
                self._deferred.append(out)
                if stop:  # the units after a masked one are masked too (ok = finite and all before ok)
                    self._ok_so_far = out.ok
            elif out is None:  # decided on the host: an earlier unit was masked on some rank (stop)
                self._halted = True
            else:
                self._norm_sq += out
                if not math.isfinite(out):
                    self._nonfinite_units += 1
                    self._halted = self.on_nonfinite == "stop"
        for p in unit:
            if p.grad is not None:
                self.stream.release(p.grad)
            p.grad = None


class StepReport:
    """One optimizer step of ``OptimizerInBackward``: what the host-decided units reported, and the device scalars
    of the units stepped on the device: ``partials(replicas)`` (this rank's values, to be summed over the ranks:
    a 1 that counts them, the squared norm, then per unit whether this rank masked it and whether its shard was
    non-finite) or, under per-unit clipping, ``reduced`` (the same, reduced per unit already, to be read as they
    are). The caller reads them in its one host sync and passes the sums, then the reduced values, to ``resolve``.
    """

    def __init__(self, deferred: list, norm_sq: float, nonfinite_units: int, halted: bool, *, exact: bool,
                 stop: bool):
        self.deferred = deferred
        self.norm_sq, self.nonfinite_units, self.halted = norm_sq, nonfinite_units, halted
        self.exact, self.stop = exact, stop
        self.local = bool(deferred) and deferred[0].local  # all alike: max_unit_norm is fixed for the run

    def _values(self, norm_scale: float = 1.0) -> list[torch.Tensor]:
        norm_sq = torch.stack([u.norm_sq.float() for u in self.deferred]).sum()
        return [norm_sq / norm_scale if norm_scale != 1 else norm_sq,
                *[(~u.ok).float() for u in self.deferred], *[(~u.finite).float() for u in self.deferred]]

    def partials(self, replicas: int = 1) -> list[torch.Tensor]:
        """This rank's share; ``replicas``: how many ranks of the summing group hold each shard (HSDP's replicas,
        when the sum runs over the whole world), so that the norms add up to the global norm once."""
        if not self.local:
            return []
        one = torch.ones((), dtype=torch.float32, device=self.deferred[0].norm_sq.device)
        return [one, *self._values(replicas)]

    @property
    def reduced(self) -> list[torch.Tensor]:
        return self._values() if self.deferred and not self.local else []

    def resolve(self, values: list[float]) -> dict:
        norm_sq, bad, torn = self.norm_sq, self.nonfinite_units, 0
        if self.deferred:
            ranks = values[0] if self.local else None
            values = values[1:] if self.local else values
            n = len(self.deferred)
            norm_sq += values[0]
            for unit, masked, nonfinite in zip(self.deferred, values[1:1 + n], values[1 + n:1 + 2 * n]):
                if masked > 0:  # masked on some rank: its counters go back on every rank alike
                    unit.undo()
                    torn += ranks is not None and masked < ranks
                bad += nonfinite > 0
        return {
            "grad_norm": math.sqrt(norm_sq) if self.exact or not math.isfinite(norm_sq) else None,
            "nonfinite_units": bad,
            "torn_units": torn,
            "halted": self.halted or (self.stop and bad > self.nonfinite_units),
        }


__all__ = ["OptimizerInBackward", "StepReport", "units_of"]
