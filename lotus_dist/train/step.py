"""One optimizer step, written once: the trainer, the test workers that stand for it and the benchmarks call it.

``StepEngine.step(batches)`` runs forward and backward over ``grad_accum`` micro-batches and updates the model,
either after backward (the mode reduces the gradients, on the last micro-batch where it may defer) or inside it
(``per_layer``: each block updates as its gradients are reduced, optim/in_backward.py). The loss and the squared
gradient norm (the non-finite check of every gradient and global-norm clipping) ride with the loop's stop and
checkpoint flags in one all-reduce and are read in the step's one host sync (consensus.py). A non-finite step is
reported, never half-handled: whole-model steps apply nothing; per-layer steps skip the non-finite blocks.
What the run does with it (stop, or count a skip) is the caller's policy.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

import torch

from lotus_dist.distributed.modes import ParallelContext
from lotus_dist.errors import UserError
from lotus_dist.precision import computes_in_bf16
from lotus_dist.train.consensus import StepConsensus, clip_, grad_sq_partial, replicas_of


class NonFiniteError(UserError):
    """A non-finite loss or gradient with ``train.on_nonfinite=stop``. ``intact``: nothing of the bad step was
    applied, so the state may be saved (False under optim.per_layer, where earlier blocks already updated)."""

    def __init__(self, message: str, intact: bool = True):
        super().__init__(message)
        self.intact = intact


def resolve_autocast(train_dtype: str, device: torch.device) -> Callable[[], ContextManager]:
    """The forward's autocast: bf16 where lotus_dist.precision's one rule says so, else none (fp32)."""
    if not computes_in_bf16(train_dtype, device.type):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def default_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a block of ``seq_len + 1`` tokens per row (the model computes it)."""
    return model(batch[:, :-1], batch[:, 1:])


@dataclass
class StepResult:
    loss: float  # the mean over the ranks of each rank's summed micro-batch losses
    # global norm before clipping; None: per-layer steps that accumulated only R; a device scalar under
    # train.grad_clip_norm=consumed (the optimizer's own norm, read only on logged steps)
    grad_norm: float | torch.Tensor | None
    nonfinite: bool = False  # a non-finite loss or gradient: see ``intact``
    intact: bool = True  # nothing of a non-finite step was applied (False: per-layer, other blocks updated)
    nonfinite_units: int = 0  # per-layer: blocks left alone for non-finite gradients
    torn_units: int = 0  # per-layer: blocks skipped on some ranks only (their shard was non-finite)


class StepEngine:
    """``mode``: the distributed mode (modes.py: ``no_sync``, ``gradients``, ``update_units``, ``all_reduce_sum``,
    ``device``, ``world_size``); ``ctx``: what its ``parallelize`` decided (the single process's by default). ``after_backward()`` runs once the step's gradients exist, before they are read
    (fault injection, a test's look at what a rank holds); ``before_unit_update(unit)`` before each per-layer
    block update; ``around_update()`` is a context entered around ``optimizer.step()`` (what the update alone
    costs: its collectives, its peak memory). ``loss_fn(model, batch)`` is divided by ``grad_accum`` here.
    ``clip_norm`` (train.grad_clip_norm): ``consumed`` hands clipping to the low-rank optimizer's consumed step
    (optim/consumed_step.py; its replica mean where the optimizer has one, dist.replica_sync=lowrank); the step's
    norm is then that one, a device scalar the metrics read on logged steps (no second host sync per step)."""

    def __init__(self, model, optimizer, mode, ctx: ParallelContext = ParallelContext(), *, grad_accum: int = 1, grad_clip: float = 0.0,
                 grad_clip_unit: float = 0.0, on_nonfinite: str = "stop", per_layer: bool = False,
                 autocast: Callable = contextlib.nullcontext, loss_fn: Callable = default_loss,
                 after_backward: Callable[[], None] | None = None,
                 before_unit_update: Callable | None = None,
                 around_update: Callable[[], ContextManager] = contextlib.nullcontext, clip_norm: str = "full"):
        self.model, self.optimizer, self.mode, self.ctx = model, optimizer, mode, ctx
        self.device = mode.device
        self.grad_accum, self.grad_clip, self.autocast, self.loss_fn = grad_accum, grad_clip, autocast, loss_fn
        self.after_backward = after_backward or (lambda: None)
        self.around_update = around_update
        self.consensus = StepConsensus(mode)
        self.consumed = None
        if clip_norm == "consumed" and hasattr(optimizer, "consumed"):  # without it (AdamW): consumed is full
            from lotus_dist.optim.consumed_step import NO_REPLICAS, ConsumedStep

            self.consumed = optimizer.consumed = ConsumedStep(grad_clip, getattr(optimizer, "replicas", NO_REPLICAS))
        elif getattr(optimizer, "replicas", None) is not None:
            raise UserError("dist.replica_sync=lowrank never forms the full gradient across replicas: set "
                            f"train.grad_clip_norm=consumed (got train.grad_clip_norm={clip_norm})")
        self.in_backward = None
        if per_layer:
            from lotus_dist.optim import OptimizerInBackward

            self.in_backward = OptimizerInBackward(
                optimizer, mode.update_units(model), grad_accum=grad_accum, max_unit_norm=grad_clip_unit,
                on_nonfinite=on_nonfinite, before_update=before_unit_update)
            # the blocks' norms are summed over the whole world in the step's one all-reduce: HSDP's replicas
            # hold the same shards, so each rank's share is divided by them (every parameter has one mesh)
            self._unit_replicas = replicas_of(next(model.parameters()))

    def step(self, batches: Iterator[torch.Tensor], *, stop: bool = False, writing: bool = False) -> StepResult:
        """One optimizer step over the next ``grad_accum`` micro-batches of ``batches``. ``stop`` / ``writing``:
        this rank's flags, agreed in the step's reduction (``self.consensus.stop`` / ``saves_done`` after)."""
        if self.in_backward is not None:
            return self._step_in_backward(batches, stop, writing)
        loss_sum = self.forward_backward(batches)
        self.after_backward()
        # Loss and squared gradient norm with the stop and checkpoint flags in one all-reduce; clipping scales on
        # the device from the reduced norm; then the step's one host sync.
        grads = self.mode.gradients(self.model, self.optimizer)
        summed = self.consensus.reduce([loss_sum, grad_sq_partial(grads, self.device)], stop=stop, writing=writing)
        if self.grad_clip > 0 and self.consumed is None:
            clip_(grads, summed[1].sqrt(), self.grad_clip)
        loss_total, norm_sq = self.consensus.read(summed)
        loss, norm = loss_total / self.mode.world_size, math.sqrt(norm_sq) if norm_sq >= 0 else norm_sq
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)  # nothing applied
            return StepResult(loss, norm, nonfinite=True)
        with self.around_update():
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.consumed is not None and self.consumed.norm is not None:
            norm = self.consumed.norm  # on the device: read when the step is logged, not a second sync per step
        return StepResult(loss, norm)

    def forward_backward(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns this rank's loss, summed.

        Backward runs outside autocast: under per_layer the optimizer updates inside it, in fp32. Per-layer keeps
        gradient sync on for every micro-batch (FSDP reduce-scatters each time: that is what fires the hooks on the
        shards); otherwise the mode may defer it to the last micro-batch.
        """
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            batch = next(batches).to(self.device, non_blocking=True)
            if self.in_backward is not None:
                self.in_backward.begin_micro_batch(micro)
                sync = contextlib.nullcontext()
            else:
                sync = self.mode.no_sync(self.model, self.optimizer, self.ctx, last=micro == self.grad_accum - 1)
            with sync:
                with self.autocast():
                    loss = self.loss_fn(self.model, batch) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def _step_in_backward(self, batches, stop: bool, writing: bool) -> StepResult:
        """per_layer: each block updated during backward; no optimizer.step() afterwards."""
        loss_sum = self.forward_backward(batches)
        pending = self.in_backward.finish_step()
        self.optimizer.zero_grad(set_to_none=True)  # a skipped block's gradients
        # the blocks stepped on the device ride in the step's one all-reduce and host sync: their norms and which
        # ranks masked them (per-unit clipping reduced them per block already: read as they are)
        summed = self.consensus.reduce([loss_sum, *pending.partials(self._unit_replicas)], stop=stop, writing=writing)
        loss_total, *unit_values = self.consensus.read(summed, exact=pending.reduced)
        report = pending.resolve(unit_values)
        loss = loss_total / self.mode.world_size
        nonfinite = bool(report["nonfinite_units"]) or not math.isfinite(loss)
        return StepResult(loss, report["grad_norm"], nonfinite=nonfinite, intact=not nonfinite,
                          nonfinite_units=report["nonfinite_units"], torn_units=report["torn_units"])


__all__ = ["NonFiniteError", "StepEngine", "StepResult", "default_loss", "resolve_autocast"]
