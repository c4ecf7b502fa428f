"""The training loop: build everything from a Config, then step, log, evaluate and checkpoint.

Read top to bottom: ``Trainer.__init__`` builds the parts, ``fit`` is the loop (a step, then the components of
hooks.py in order: faults, checkpoint commit, progress, evaluation, metrics, skip limit, checkpoint or stop),
``train_step`` is one optimizer step over ``grad_accum`` micro-batches through the step engine (step.py, which tests
and benchmarks call too) and the run's policy for a non-finite step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from lotus_dist.errors import UserError
from lotus_dist.model.llama import Llama, compile_blocks, flops_per_token, llama_config
from lotus_dist.counters import COUNTERS
from lotus_dist.train.compile_watch import CompileWatch
from lotus_dist.train.checkpoint import Checkpointer, NonFiniteStateError, check_compatible, check_tokenizer
from lotus_dist.train import resume_changes
from lotus_dist.train.config import Config, check_init_from, shape_overrides, to_dict
from lotus_dist.train.evaluate import evaluate
from lotus_dist.train.faults import maybe_poison_gradients
from lotus_dist.train.metrics import MetricsLogger, truncate_metrics
from lotus_dist.train.peak_memory import PeakMemory
from lotus_dist.train.run_dir import RunDirectory
from lotus_dist.train.schedule import lr_multiplier
from lotus_dist.train.signals import StopSignals
from lotus_dist.train.hooks import Evaluation, default_hooks
from lotus_dist.train.step import NonFiniteError, StepEngine, resolve_autocast
from lotus_dist.train.throughput import peak_flops


def model_fingerprint(cfg: Config, vocab_size: int) -> dict:
    fields = shape_overrides(cfg.model)
    model_cfg = llama_config(cfg.model.name, **{**fields, "vocab_size": cfg.model.vocab_size or vocab_size})
    return dataclasses.asdict(model_cfg)


def resume_keys(cfg: Config) -> dict:
    """Keys a resumed run must keep: the optimizer state's shapes (projected methods only) and the batch
    geometry the data position and the token count are in. Recorded in every checkpoint (check_compatible)."""
    from lotus_dist.optim.methods import method_rank, resolve_parts

    keys = {"train.batch_size": cfg.train.batch_size, "train.seq_len": cfg.train.seq_len}
    parts = resolve_parts(cfg.optim)
    if parts is not None:
        keys["optim.rank"] = method_rank(cfg.optim)
        for key in ("proj_type", "granularity"):
            if parts.get(key) is not None:
                keys[f"optim.{key}"] = parts[key]
    return keys


class Trainer:
    def __init__(self, cfg: Config, mode, run: RunDirectory):
        self.cfg = cfg
        self.mode = mode  # the distributed mode (distributed/modes.py): rank, device, collectives
        self.device = mode.device
        self.is_main = mode.rank == 0
        self.run = run  # created and locked (RunDirectory.open) before anything else is built
        self.run_dir = run.path
        t = cfg.train

        per_step = t.micro_batch_size * mode.world_size
        if t.batch_size % per_step:
            raise UserError(f"config key 'train.batch_size' ({t.batch_size}) must be a multiple of "
                            f"train.micro_batch_size x world size ({t.micro_batch_size} x {mode.world_size})")
        self.grad_accum = t.batch_size // per_step
        if t.grad_clip_unit > 0 and self.grad_accum > 1:
            raise UserError(f"train.grad_clip_unit needs each block's whole gradient, which low-rank accumulation "
                            f"({self.grad_accum} micro-batches per step) does not keep: set train.micro_batch_size to "
                            f"train.batch_size / world size ({t.batch_size // mode.world_size}), or "
                            f"train.grad_clip_unit=0")

        # Everything built before step 1 is measured: the most tensor bytes held, for the startup record.
        with PeakMemory(self.device) as self.startup_memory:
            self.build(cfg, mode)
        self.step = 0
        self.tokens = 0
        self.signals = StopSignals()
        self.skipped_steps = 0  # non-finite steps skipped by this process (train.on_nonfinite=skip)
        self.skipped_in_row = 0
        self.train_seconds = 0.0  # wall time in train steps since this process started (not evaluation, not saving)

    def build(self, cfg: Config, mode) -> None:
        """Tokenizer, model (built on ``meta``, sharded, then materialised shard by shard), optimizer, data."""
        from lotus_dist.data import build_train_stream, build_val_blocks, check_data, check_vocab, load_tokenizer

        t = cfg.train
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, mode=mode,
                                         asynchronous=cfg.checkpoint.async_save)
        latest = self.checkpointer.latest()
        if latest is not None and not cfg.checkpoint.resume:
            raise UserError(f"run directory {self.run_dir} holds checkpoint {latest.name} and checkpoint.resume=false; "
                            f"choose another run.dir or remove {self.checkpointer.root}")
        if latest is not None and cfg.model.init_from:
            # a resume loads its weights from the checkpoint: the folder is not read (it may be gone by now)
            mode.log("model.init_from is not read: the run resumes from its checkpoints")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))
        check_init_from(cfg.model)
        # a hub tokenizer (hf:<repo>) is fetched by one process per machine, the others read the cache after it
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, first=mode.local_rank == 0,
                                        agree=mode.all_gather_object)
        check_data(cfg.data, self.tokenizer, evaluate=bool(t.eval_every))  # before minutes of model building
        check_vocab(cfg.model.vocab_size or self.tokenizer.vocab_size, self.tokenizer)
        self.fingerprint = {"model": model_fingerprint(cfg, self.tokenizer.vocab_size), "optim_method": cfg.optim.name,
                            "resume": resume_keys(cfg), "tokenizer": self.tokenizer.fingerprint}
        model_cfg = llama_config(**{"name": cfg.model.name, **self.fingerprint["model"]})
        if t.seq_len > model_cfg.max_seq_len:
            raise UserError(f"config key 'train.seq_len' ({t.seq_len}) exceeds the model's max_seq_len "
                            f"({model_cfg.max_seq_len}); raise model.max_seq_len")

        torch.manual_seed(cfg.seed)
        with torch.device("meta"):  # no storage yet: parallelize shards it, then each rank materialises its shards
            self.model = Llama(model_cfg)
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.model.activation_checkpointing = t.activation_checkpointing
        # after activation checkpointing is set, before parallelize shards (torchtitan's order)
        self.compile_watch = None
        if t.compile:
            compile_blocks(self.model, t.compile_backend)
            self.compile_watch = CompileWatch(say=mode.log)
        self.flops_per_token = flops_per_token(model_cfg, t.seq_len)  # the model's FLOPs of one trained token
        self.peak_flops = peak_flops(self.device, t.peak_tflops)  # per device; None: no mfu logged
        if self.is_main:
            self.note_rank_clipping()
        self.model, self.ctx = mode.parallelize(self.model, cfg)
        self.optimizer = mode.build_optimizer(self.model, cfg.optim, self.ctx)
        self.autocast = resolve_autocast(t.dtype, self.device)
        self._poisoned_step = 0
        self.engine = StepEngine(
            self.model, self.optimizer, mode, self.ctx, grad_accum=self.grad_accum, grad_clip=t.grad_clip,
            grad_clip_unit=t.grad_clip_unit, on_nonfinite=t.on_nonfinite, per_layer=cfg.optim.per_layer,
            autocast=self.autocast,
            after_backward=lambda: maybe_poison_gradients(self.model.parameters(), mode.rank, self.step + 1),
            before_unit_update=self._fault_in_unit, clip_norm=t.grad_clip_norm)

        self.stream = build_train_stream(cfg.data, self.tokenizer, seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                                         rank=mode.rank, world_size=mode.world_size, seed=cfg.seed,
                                         pin_memory=self.device.type == "cuda")
        self.val_blocks = build_val_blocks(cfg.data, self.tokenizer, seq_len=t.seq_len) if t.eval_every else None

    def note_rank_clipping(self) -> None:
        """Say once when optim.rank exceeds some matrices' projected side (the optimizer clips it there)."""
        from lotus_dist.optim.methods import method_rank, rank_above_size

        clipped = rank_above_size(self.model, self.cfg.optim)
        if clipped:
            name, shape, r = clipped[0]
            print(f"note: optim.rank={method_rank(self.cfg.optim)} exceeds the projected side of {len(clipped)} "
                  f"matrices "
                  f"(e.g. {name}, {shape[0]}x{shape[1]}); they are projected at their full side (rank {r}), which "
                  f"saves no memory on them", flush=True)

    # ---- resume ----------------------------------------------------------------------------------------------
    def resume_if_possible(self) -> int | None:
        """Continue from the newest good checkpoint (returns its step), or start fresh (None). Either way the
        run directory's metrics are cut back to where this run continues from."""
        self.checkpointer.remove_partial()
        wanted = resume_changes.snapshot(self.optimizer)  # the config's settings, before a load replaces them
        recorded = resume_changes.as_json(wanted)
        applied: list[str] = []

        def check(saved: dict, path) -> None:
            check_compatible(saved, self.fingerprint, path)
            check_tokenizer(saved, self.fingerprint, path, allow_change=self.cfg.data.allow_tokenizer_change,
                            name=self.cfg.data.tokenizer)
            if "optim_groups" in saved:  # refused changes are found before loading a state they do not fit
                applied[:] = resume_changes.changes(saved["optim_groups"], recorded, path)

        resumed = self.checkpointer.resume(self.model, self.optimizer, check=check)
        if resumed is not None:
            path, train_state, data_state = resumed
            if "optim_groups" not in train_state:  # written before the record: compare with the groups it loaded
                loaded = resume_changes.as_json(resume_changes.snapshot(self.optimizer))
                applied[:] = resume_changes.changes(loaded, recorded, path)
            resume_changes.apply(self.optimizer, wanted)
            if applied and self.is_main:
                print(f"resume applies the changed optimizer settings: {', '.join(applied)}", flush=True)
            self.step, self.tokens = train_state["step"], train_state["tokens"]
            if data_state is None:
                raise UserError(f"checkpoint {path} was written by {train_state['world_size']} ranks; this run has "
                                f"{self.mode.world_size}, and per-rank data positions (data.split=node) do not carry "
                                f"over; start runs with data.split=global to change the world size on resume")
            self.stream.load_state_dict(data_state)
        if self.is_main:
            truncate_metrics(self.run_dir, self.step)  # step 0: a fresh start over old metrics keeps none of them
            if resumed is not None:
                print(f"resumed from {resumed[0]} at step {self.step}", flush=True)
        return None if resumed is None else self.step

    def save(self) -> None:
        train_state = {"step": self.step, "tokens": self.tokens, **self.fingerprint,
                       "optim_groups": resume_changes.as_json(resume_changes.snapshot(self.optimizer))}
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
        """One step through the engine, then the run's policy for a non-finite one: stop, or skip and count it."""
        lr = self.set_lr()
        result = self.engine.step(self.stream, stop=self.signals.received is not None,
                                  writing=self.checkpointer.writing())
        record = {"loss": result.loss, "lr": lr}
        if result.grad_norm is not None:  # None: per-layer, some matrices accumulated only R (no exact norm)
            record["grad_norm"] = result.grad_norm
        if result.nonfinite:
            if self.cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(self.nonfinite_message(result), intact=result.intact)
            # Skipped: no update (per-layer: of the non-finite blocks), but the step, its data and its place in
            # the schedule are spent.
            self.end_step()
            if self.cfg.optim.per_layer:
                record["skipped_units"] = result.nonfinite_units
                if result.torn_units:  # skipped on the ranks whose shard was non-finite only (optim/in_backward.py)
                    record["torn_units"] = result.torn_units
            self.count_skipped()
            record["skipped"] = self.skipped_steps
            return record
        self.end_step()
        self.skipped_in_row = 0
        return record

    def nonfinite_message(self, result) -> str:
        if not self.cfg.optim.per_layer:
            return (f"non-finite loss ({result.loss}) or gradient norm ({result.grad_norm}) at step {self.step + 1}; "
                    f"train.on_nonfinite=skip would skip such steps")
        latest = self.checkpointer.latest()
        return (f"non-finite loss ({result.loss}) or gradient in {result.nonfinite_units} block(s) at step "
                f"{self.step + 1} with optim.per_layer=true: blocks updated earlier in that backward cannot be "
                f"undone, so this state is not saved; resume from the last checkpoint "
                f"({latest if latest else 'none yet'}); train.on_nonfinite=skip would skip such blocks")

    def count_skipped(self) -> None:
        self.skipped_steps += 1
        self.skipped_in_row += 1

    def skip_limit(self) -> str | None:
        """Why train.on_nonfinite=skip gives up now (past train.max_skipped in a row, or past
        train.max_skipped_fraction of train.steps in all), else None."""
        t = self.cfg.train
        if self.skipped_in_row >= t.max_skipped:
            return (f"train.on_nonfinite=skip gives up: {self.skipped_in_row} steps in a row were skipped for "
                    f"non-finite values (steps {self.step - self.skipped_in_row + 1}-{self.step}; "
                    f"train.max_skipped={t.max_skipped})")
        if self.skipped_steps > t.max_skipped_fraction * t.steps:
            return (f"train.on_nonfinite=skip gives up: {self.skipped_steps} step(s) skipped for non-finite values "
                    f"by step {self.step}, more than train.max_skipped_fraction={t.max_skipped_fraction} of "
                    f"train.steps={t.steps}")
        return None

    def end_step(self) -> None:
        """One optimizer step is spent (applied or skipped): its data and its place in the schedule."""
        self.step += 1
        self.tokens += self.cfg.train.batch_size * self.cfg.train.seq_len

    def _fault_in_unit(self, unit) -> None:
        """LOTUS_FAULT=nan_grad under optim.per_layer: poison the first block to update in the step."""
        if self._poisoned_step != self.step + 1:
            self._poisoned_step = self.step + 1
            maybe_poison_gradients(unit, self.mode.rank, self.step + 1)

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        started = time.perf_counter()
        with PeakMemory(self.device) as resume_memory:
            resumed_step = self.resume_if_possible()
        load_seconds = time.perf_counter() - started
        if self.is_main:
            self.run.write_config(to_dict(cfg), resumed_step)
        self.logger = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=cfg.log.tensorboard,
                                    progress=cfg.log.progress, total_steps=t.steps, start_step=self.step)
        self.log_startup(max(self.startup_memory.peak_bytes, resume_memory.peak_bytes),
                         load_seconds if resumed_step is not None else None)
        self.signals.install()
        self.end = min(t.steps, t.stop_at) if t.stop_at else t.steps  # this process's last step
        hooks = default_hooks(self)  # what follows each step, in order (train/hooks.py)
        try:
            self.model.train()
            while self.step < self.end:
                record = self.timed_step()
                for hook in hooks:
                    hook.after_step(self, record)
                if self.engine.consensus.stop:
                    break
            self.checkpointer.wait()
        finally:
            self.signals.restore()
            self.logger.close()
            getattr(self.stream, "close", lambda: None)()  # the prefetch thread
        last_eval = next((h.last for h in hooks if isinstance(h, Evaluation)), {})
        return {"step": self.step, "tokens": self.tokens, **last_eval}

    def timed_step(self) -> dict:
        """One step with what the loop measures around it (the step's counters, train seconds); a non-finite step
        under train.on_nonfinite=stop ends here (saved if the state is intact)."""
        started = time.perf_counter()
        COUNTERS.reset()
        try:
            with self.compiling("step", self.step + 1):
                record = self.train_step()
        except NonFiniteError as error:
            self.stop_after_nonfinite(error)
        self.train_seconds += time.perf_counter() - started
        return record

    def log_startup(self, peak_bytes: int, load_seconds: float | None = None) -> None:
        """The startup record (metrics.jsonl, before the steps): the most tensor bytes any rank held before its
        first step (CUDA allocator peak on GPU, the storage account of peak_memory.py on CPU; a resume's load
        included) against the model's bytes; ``load_s``: the slowest rank's resume (proof and load), if resumed."""
        peaks = self.mode.all_gather_object((int(peak_bytes), load_seconds))
        peak = max(p for p, _ in peaks)
        record = {"event": "startup", "step": self.step, "startup_peak_bytes": peak,
                  "model_bytes": self.model_bytes, "world_size": self.mode.world_size,
                  "device": self.device.type, "backend": self.mode.backend or "none"}
        if load_seconds is not None:
            record["load_s"] = max(s for _, s in peaks)
        self.logger.log(record)
        loaded = f", the checkpoint loaded in {record['load_s']:.1f} s" if load_seconds is not None else ""
        self.logger.message(f"start-up: at most {peak / 2**20:.1f} MiB of tensors on a rank before step "
                            f"{self.step + 1} (the model is {self.model_bytes / 2**20:.1f} MiB{loaded})")

    def stop_after_nonfinite(self, error: NonFiniteError) -> None:
        """Stop for a non-finite step (or too many skipped ones), saying what was saved; always raises."""
        self.checkpointer.wait()
        if not error.intact:
            raise error
        try:
            self.save()  # the state before the bad step: nothing was applied from it
        except NonFiniteStateError as state_error:  # ... unless an earlier step already broke the state
            raise NonFiniteError(f"{error}; {state_error}", intact=False) from None
        self.checkpointer.wait()
        raise NonFiniteError(f"{error}; saved step {self.step} as {self.checkpointer.latest()}")

    def compiling(self, phase: str, step: int):
        """train.compile: count the graphs built in this ``phase`` (of ``step``) after its first one (recompiles)."""
        if self.compile_watch is None:
            return contextlib.nullcontext()
        return self.compile_watch.phase(phase, step)

    def evaluate(self) -> dict:
        with self.compiling("eval", self.step):
            return evaluate(self.model, self.val_blocks, micro_batch_size=self.cfg.train.micro_batch_size,
                            device=self.device, autocast=self.autocast, rank=self.mode.rank,
                            world_size=self.mode.world_size,
                            all_reduce=self.mode.all_reduce_sum if self.mode.world_size > 1 else None)
