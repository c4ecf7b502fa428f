"""The training loop: build everything from a Config, then step, log, evaluate and checkpoint.

Read top to bottom: ``Trainer.__init__`` builds the parts, ``fit`` is the loop, ``train_step`` is one optimizer
step over ``grad_accum`` micro-batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path

import torch

from lotus_dist.errors import UserError
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.train.checkpoint import Checkpointer, check_compatible
from lotus_dist.train.config import Config, dump_config
from lotus_dist.train.evaluate import evaluate
from lotus_dist.train.faults import maybe_crash, maybe_poison_gradients
from lotus_dist.train.metrics import MetricsLogger, truncate_metrics
from lotus_dist.train.schedule import lr_multiplier


class NonFiniteError(UserError):
    """A non-finite loss or gradient with ``train.on_nonfinite=stop``. ``intact``: nothing of the bad step was
    applied, so the state may be saved (False under optim.per_layer, where earlier blocks already updated)."""

    def __init__(self, message: str, intact: bool = True):
        super().__init__(message)
        self.intact = intact


def resolve_autocast(dtype: str, device: torch.device):
    """bf16 autocast on CUDA ("auto" or "bf16"); fp32 on CPU unless bf16 is asked for explicitly."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def model_fingerprint(cfg: Config, vocab_size: int) -> dict:
    fields = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "name"}
    model_cfg = llama_config(cfg.model.name, **{**fields, "vocab_size": cfg.model.vocab_size or vocab_size})
    return dataclasses.asdict(model_cfg)


class Trainer:
    def __init__(self, cfg: Config, runtime):
        self.cfg = cfg
        self.rt = runtime
        self.device = runtime.device
        self.is_main = runtime.rank == 0
        self.run_dir = Path(cfg.run.dir)
        t = cfg.train

        per_step = t.micro_batch_size * runtime.world_size
        if t.batch_size % per_step:
            raise UserError(f"config key 'train.batch_size' ({t.batch_size}) must be a multiple of "
                            f"train.micro_batch_size x world size ({t.micro_batch_size} x {runtime.world_size})")
        self.grad_accum = t.batch_size // per_step
        if t.grad_clip_unit > 0 and self.grad_accum > 1:
            raise UserError(f"train.grad_clip_unit needs each block's whole gradient, which low-rank accumulation "
                            f"({self.grad_accum} micro-batches per step) does not keep: set train.micro_batch_size to "
                            f"train.batch_size / world size ({t.batch_size // runtime.world_size}), or "
                            f"train.grad_clip_unit=0")

        from lotus_dist.data import build_train_stream, build_val_blocks, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.fingerprint = {"model": model_fingerprint(cfg, self.tokenizer.vocab_size), "optim_method": cfg.optim.name}
        model_cfg = llama_config(**{"name": cfg.model.name, **self.fingerprint["model"]})
        if t.seq_len > model_cfg.max_seq_len:
            raise UserError(f"config key 'train.seq_len' ({t.seq_len}) exceeds the model's max_seq_len "
                            f"({model_cfg.max_seq_len}); raise model.max_seq_len")

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every mode
        with torch.device(self.device):  # built where it trains: no full host copy per rank
            self.model = Llama(model_cfg)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.model = runtime.wrap_model(self.model, cfg)
        self.optimizer = runtime.build_optimizer(self.model, cfg.optim)
        self.in_backward = None  # optim.per_layer: blocks update inside backward (optim/in_backward.py)
        if cfg.optim.per_layer:
            from lotus_dist.optim import OptimizerInBackward

            self._poisoned_step = 0
            self.in_backward = OptimizerInBackward(
                self.optimizer, runtime.update_units(self.model), grad_accum=self.grad_accum,
                max_unit_norm=t.grad_clip_unit, on_nonfinite=t.on_nonfinite, before_update=self._fault_in_unit)
        self.autocast = resolve_autocast(t.dtype, self.device)

        self.stream = build_train_stream(cfg.data, self.tokenizer, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                         rank=runtime.rank, world_size=runtime.world_size, seed=cfg.seed)
        self.val_blocks = build_val_blocks(cfg.data, self.tokenizer, seq_len=t.seq_len) if t.eval_every else None
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, rank=runtime.rank,
                                         world_size=runtime.world_size, barrier=runtime.barrier,
                                         all_ranks=lambda flag: not runtime.any_rank(not flag),
                                         asynchronous=cfg.checkpoint.async_save)
        self.step = 0
        self.tokens = 0
        self.stop_requested = False
        self.skipped_steps = 0  # non-finite steps skipped by this process (train.on_nonfinite=skip)
        self.train_seconds = 0.0  # wall time in train steps since this process started (not evaluation, not saving)

    # ---- resume ----------------------------------------------------------------------------------------------
    def resume_if_possible(self) -> None:
        self.checkpointer.remove_partial()
        latest = self.checkpointer.latest()
        if latest is None:
            return
        if not self.cfg.checkpoint.resume:
            raise UserError(f"run directory {self.run_dir} holds checkpoint {latest.name} and checkpoint.resume=false; "
                            f"choose another run.dir or remove {self.checkpointer.root}")
        check_compatible(self.checkpointer.read_train_state(latest), self.fingerprint, latest)
        train_state, data_state = self.checkpointer.load(latest, self.model, self.optimizer)
        self.step, self.tokens = train_state["step"], train_state["tokens"]
        if data_state is None:
            raise UserError(f"checkpoint {latest} was written by {train_state['world_size']} ranks; this run has "
                            f"{self.rt.world_size}, and per-rank data positions (data.split=node) do not carry over; "
                            f"start runs with data.split=global to change the world size on resume")
        self.stream.load_state_dict(data_state)
        if self.is_main:
            truncate_metrics(self.run_dir, self.step)
            print(f"resumed from {latest} at step {self.step}", flush=True)

    def save(self) -> None:
        train_state = {"step": self.step, "tokens": self.tokens, **self.fingerprint}
        path = self.checkpointer.save(self.step, self.model, self.optimizer, train_state=train_state,
                                      data_state=self.stream.state_dict())
        self.logger.message(f"{'saving' if self.checkpointer.asynchronous else 'saved'} checkpoint {path}")

    # ---- one optimizer step -------------------------------------------------------------------------------------
    def set_lr(self) -> float:
        t = self.cfg.train
        lr = self.cfg.optim.lr * lr_multiplier(self.step, t.steps, t.warmup_ratio, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> dict:
        lr = self.set_lr()
        if self.in_backward is not None:
            return self.train_step_in_backward(lr)
        loss_sum = self.rt.all_reduce_mean(self.forward_backward())
        maybe_poison_gradients(self.model.parameters(), self.rt.rank, self.step + 1)
        # The global gradient norm, clipped when train.grad_clip > 0 (max_norm=inf only measures it): it is also
        # the non-finite check of every gradient, identical on all ranks.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        # The one host sync of the step: loss (for logging and the non-finite check) and grad norm together.
        loss_value, norm_value = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(f"non-finite loss ({loss_value}) or gradient norm ({norm_value}) at step "
                                     f"{self.step + 1}; saved step {self.step}; train.on_nonfinite=skip would "
                                     f"skip such steps")
            # Skipped: no update, but the step, its data and its place in the schedule are spent.
            self.end_step()
            self.skipped_steps += 1
            return {"loss": loss_value, "lr": lr, "grad_norm": norm_value, "skipped": self.skipped_steps}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.end_step()
        return {"loss": loss_value, "lr": lr, "grad_norm": norm_value}

    def forward_backward(self) -> torch.Tensor:
        """Forward and backward over the step's micro-batches; returns this rank's loss, summed.

        Backward runs outside autocast: under optim.per_layer the optimizer updates inside it, in fp32. Per-layer
        keeps gradient sync on for every micro-batch (FSDP reduce-scatters each time: that is what fires the
        hooks on the shards); otherwise the mode may defer it to the last micro-batch.
        """
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            batch = next(self.stream).to(self.device, non_blocking=True)
            if self.in_backward is not None:
                self.in_backward.begin_micro_batch(micro)
                sync = contextlib.nullcontext()
            else:
                sync = self.rt.no_sync(self.model, last=micro == self.grad_accum - 1)
            with sync:
                with self.autocast():
                    loss = self.model(batch[:, :-1], batch[:, 1:]) / self.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        return loss_sum

    def end_step(self) -> None:
        """One optimizer step is spent (applied or skipped): its data and its place in the schedule."""
        self.step += 1
        self.tokens += self.cfg.train.batch_size * self.cfg.train.seq_len

    def train_step_in_backward(self, lr: float) -> dict:
        """optim.per_layer: each block updates during backward; no optimizer.step() afterwards.

        Non-finite gradients are found per block: ``skip`` leaves that block alone, ``stop`` stops without saving,
        since the blocks updated before it cannot be undone.
        """
        loss_sum = self.forward_backward()
        report = self.in_backward.end_step()
        self.optimizer.zero_grad(set_to_none=True)  # a skipped block's gradients
        loss_value = self.rt.all_reduce_mean(loss_sum).item()
        record = {"loss": loss_value, "lr": lr}
        if report["grad_norm"] is not None:  # None: some matrices accumulated only R, so there is no exact norm
            record["grad_norm"] = report["grad_norm"]
        if report["nonfinite_units"] or not math.isfinite(loss_value):
            if self.cfg.train.on_nonfinite == "stop":
                latest = self.checkpointer.latest()
                raise NonFiniteError(
                    f"non-finite loss ({loss_value}) or gradient in {report['nonfinite_units']} block(s) at step "
                    f"{self.step + 1} with optim.per_layer=true: blocks updated earlier in that backward cannot be "
                    f"undone, so this state is not saved; resume from the last checkpoint "
                    f"({latest.name if latest else 'none yet'}); train.on_nonfinite=skip would skip such blocks",
                    intact=False)
            self.skipped_steps += 1
            record["skipped"] = self.skipped_steps
            record["skipped_units"] = report["nonfinite_units"]
        self.end_step()
        return record

    def _fault_in_unit(self, unit) -> None:
        """LOTUS_FAULT=nan_grad under optim.per_layer: poison the first block to update in the step."""
        if self._poisoned_step != self.step + 1:
            self._poisoned_step = self.step + 1
            maybe_poison_gradients(unit, self.rt.rank, self.step + 1)

    # ---- the loop --------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.resume_if_possible()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / "config.yaml")
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                                    progress=cfg.log.progress, total_steps=t.steps, start_step=self.step)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm) if self._is_main_thread() else None
        last_eval = {}
        try:
            from lotus_dist.optim import memory_report, solver_fallback_report, switch_report

            self.model.train()
            clock, clock_tokens = time.perf_counter(), self.tokens
            end = min(t.steps, t.stop_at) if t.stop_at else t.steps
            while self.step < end:
                started = time.perf_counter()
                try:
                    record = self.train_step()
                except NonFiniteError as error:
                    if error.intact:
                        self.save()  # the state before the bad step: nothing was applied from it
                    self.checkpointer.wait()
                    raise
                self.train_seconds += time.perf_counter() - started
                maybe_crash("after_step", self.rt.rank, self.step)
                self.checkpointer.poll()
                self.logger.advance()
                evaluate_now = t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps)
                if evaluate_now:
                    last_eval = self.evaluate()
                    record.update(last_eval)
                if self.step % cfg.log.every == 0 or evaluate_now or self.step == end or record.get("skipped"):
                    now = time.perf_counter()
                    record["tokens"] = self.tokens
                    record["tokens_per_s"] = (self.tokens - clock_tokens) / max(now - clock, 1e-9)
                    record["optimizer_state_bytes"] = memory_report(self.optimizer)["total"]
                    record["switches"] = sum(switch_report(self.optimizer).values())
                    record["solver_fallbacks"] = solver_fallback_report(self.optimizer)
                    record["refresh_s"] = float(getattr(self.optimizer, "refresh_seconds", 0.0))
                    record["train_s"] = self.train_seconds
                    self.logger.log({"step": self.step, **record})
                    clock, clock_tokens = time.perf_counter(), self.tokens
                stop = self.rt.any_rank(self.stop_requested)
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == end or stop:
                    self.save()
                if stop:
                    self.logger.message(f"SIGTERM received: saved step {self.step}, exiting")
                    break
            self.checkpointer.wait()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.logger.close()
        return {"step": self.step, "tokens": self.tokens, **last_eval}

    def evaluate(self) -> dict:
        return evaluate(self.model, self.val_blocks, micro_batch_size=self.cfg.train.micro_batch_size, device=self.device,
                        autocast=self.autocast, rank=self.rt.rank, world_size=self.rt.world_size,
                        all_reduce=self.rt.all_reduce_sum if self.rt.world_size > 1 else None)

    @staticmethod
    def _is_main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()
