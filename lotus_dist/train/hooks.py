"""What the training loop does after each step, as components it calls in order (OLMo-core's callbacks,
torchtitan's components): each one job, each reading the trainer's state and the step's metrics ``record``.

    faults -> commit an asynchronous checkpoint -> progress -> evaluation -> metrics -> skip limit -> checkpoint/stop

The order is the contract: evaluation results go into the logged record; the skip limit saves before it stops; a
stop signal (agreed by every rank in the step's reduction) saves at this step boundary and ends the loop.
"""

from __future__ import annotations

import time

import torch

from lotus_dist.counters import COUNTERS, to_host
from lotus_dist.train.faults import maybe_crash, maybe_poison_weights
from lotus_dist.train.step import NonFiniteError
from lotus_dist.train.throughput import mfu


def due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


class FaultInjection:
    """LOTUS_FAULT: a crash after a step, a NaN written into a weight (train/faults.py)."""

    def after_step(self, trainer, record: dict) -> None:
        maybe_crash("after_step", trainer.mode.rank, trainer.step)
        maybe_poison_weights(trainer.model.parameters(), trainer.mode.rank, trainer.step)


class AsyncCommit:
    """Every rank's asynchronous checkpoint writer has finished (agreed in the step's reduction): commit it."""

    def after_step(self, trainer, record: dict) -> None:
        if trainer.engine.consensus.saves_done:
            trainer.checkpointer.wait()


class Progress:
    def after_step(self, trainer, record: dict) -> None:
        trainer.logger.advance()


class Evaluation:
    """Validation perplexity every ``train.eval_every`` steps and at the last step; its metrics join the record."""

    def __init__(self):
        self.last: dict = {}

    @staticmethod
    def now(trainer) -> bool:
        t = trainer.cfg.train
        return bool(t.eval_every) and (due(trainer.step, t.eval_every) or trainer.step == t.steps)

    def after_step(self, trainer, record: dict) -> None:
        if self.now(trainer):
            self.last = trainer.evaluate()
            record.update(self.last)


class StepMetrics:
    """A metrics.jsonl / TensorBoard line every ``log.every`` steps, at evaluations, at the end and on a skip:
    throughput since the last line, optimizer state and switches, and what the step cost (lotus_dist.counters)."""

    def __init__(self, trainer):
        self.clock, self.clock_tokens, self.clock_train_s = time.perf_counter(), trainer.tokens, trainer.train_seconds

    def after_step(self, trainer, record: dict) -> None:
        from lotus_dist.optim import gathered_switch_report, memory_report, solver_fallback_report

        if not (due(trainer.step, trainer.cfg.log.every) or Evaluation.now(trainer) or trainer.step == trainer.end
                or record.get("skipped")):
            return
        now = time.perf_counter()
        record["tokens"] = trainer.tokens
        record["tokens_per_s"] = (trainer.tokens - self.clock_tokens) / max(now - self.clock, 1e-9)
        record["optimizer_state_bytes"] = memory_report(trainer.optimizer)["total"]
        record["switches"] = sum(gathered_switch_report(trainer.optimizer).values())  # owner backend: a collective
        record["solver_fallbacks"] = solver_fallback_report(trainer.optimizer)
        record["refresh_s"] = float(getattr(trainer.optimizer, "refresh_seconds", 0.0))
        record["train_s"] = trainer.train_seconds
        if isinstance(record.get("grad_norm"), torch.Tensor):  # train.grad_clip_norm=consumed: read here, counted
            record["grad_norm"] = to_host(record["grad_norm"])
        record["model_flops_per_token"] = trainer.flops_per_token
        if trainer.peak_flops is not None:  # over the steps' own time since the last line (not evaluation, saving)
            record["mfu"] = mfu(trainer.flops_per_token, trainer.tokens - self.clock_tokens,
                                trainer.train_seconds - self.clock_train_s, trainer.mode.world_size, trainer.peak_flops)
        if trainer.compile_watch is not None:
            record["recompiles"] = trainer.compile_watch.recompiles
        record.update(COUNTERS.snapshot())  # what this step cost: collectives, bytes, host syncs
        trainer.logger.log({"step": trainer.step, **record})
        self.clock, self.clock_tokens, self.clock_train_s = time.perf_counter(), trainer.tokens, trainer.train_seconds


class SkipLimit:
    """train.on_nonfinite=skip gives up past its limits; skips applied nothing, so the state is saved first."""

    def after_step(self, trainer, record: dict) -> None:
        if record.get("skipped") and trainer.skip_limit():
            trainer.stop_after_nonfinite(NonFiniteError(trainer.skip_limit()))


class Checkpointing:
    """A checkpoint every ``checkpoint.every`` steps, at the end, and on a stop signal, which then ends the run."""

    def after_step(self, trainer, record: dict) -> None:
        stop = trainer.engine.consensus.stop  # a SIGTERM/SIGINT on any rank, agreed in the step's reduction
        if due(trainer.step, trainer.cfg.checkpoint.every) or trainer.step == trainer.end or stop:
            trainer.save()
        if stop:
            trainer.logger.message(f"{trainer.signals.received or 'a stop signal (on another rank)'} received: "
                                   f"saved step {trainer.step}, exiting")


def default_hooks(trainer) -> list:
    return [FaultInjection(), AsyncCommit(), Progress(), Evaluation(), StepMetrics(trainer), SkipLimit(),
            Checkpointing()]


__all__ = ["AsyncCommit", "Checkpointing", "Evaluation", "FaultInjection", "Progress", "SkipLimit", "StepMetrics",
           "default_hooks", "due"]
