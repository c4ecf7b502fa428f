"""The range and cross-key checks of a run configuration that a key's type cannot express (train/config.py loads
and types the keys first); every message is one line that names the key and its value (``ConfigError``)."""

from __future__ import annotations

from pathlib import Path

from lotus_dist.errors import UserError
from lotus_dist.model.llama import shape_overrides

class ConfigError(UserError, ValueError):
    """A bad config file, key or value. The message is one line and names the culprit."""


def _at_least(key: str, value, low, what: str = "") -> None:
    if value is not None and value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}{what}, got {value}")


def validate(cfg) -> None:  # a train.config.Config (not imported: config.py imports this module)
    """Range and cross-field checks that a key's type cannot express; every message names the key and value."""
    t = cfg.train
    for key in ("steps", "batch_size", "micro_batch_size", "seq_len"):
        _at_least(f"train.{key}", getattr(t, key), 1)
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"config key 'train.batch_size' ({t.batch_size}) must be a multiple of "
            f"'train.micro_batch_size' ({t.micro_batch_size})"
        )
    _at_least("train.grad_clip", t.grad_clip, 0)
    _at_least("train.grad_clip_unit", t.grad_clip_unit, 0)
    if cfg.optim.per_layer and t.grad_clip > 0:
        raise ConfigError(
            f"train.grad_clip={t.grad_clip} clips by the global gradient norm, which is not known while "
            f"optim.per_layer=true updates each block during backward: set train.grad_clip=0, and "
            f"train.grad_clip_unit=<max norm> to clip each block's gradient instead")
    if t.grad_clip_unit > 0 and not cfg.optim.per_layer:
        raise ConfigError("config key 'train.grad_clip_unit' applies to optim.per_layer=true only; "
                          "use train.grad_clip for the global norm")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"config key 'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    _at_least("train.eval_every", t.eval_every, 0, " (0 = never)")
    _at_least("train.stop_at", t.stop_at, 1, " (null = run to train.steps)")
    _at_least("train.max_skipped", t.max_skipped, 1)
    if t.peak_tflops is not None and not t.peak_tflops > 0:
        raise ConfigError(f"config key 'train.peak_tflops' must be positive (or null), got {t.peak_tflops}")
    if not 0 <= t.max_skipped_fraction <= 1:
        raise ConfigError(f"config key 'train.max_skipped_fraction' must be in [0, 1], got {t.max_skipped_fraction}")
    _validate_optim(cfg.optim)
    _validate_model(cfg.model)
    d = cfg.data
    _at_least("data.shuffle_buffer", d.shuffle_buffer, 0, " (0 or 1 = no shuffling)")
    _at_least("data.prefetch", d.prefetch, 0, " (0 = no background thread)")
    if t.eval_every and d.val_tokens < t.seq_len:
        raise ConfigError(f"config key 'data.val_tokens' ({d.val_tokens}) must be at least train.seq_len "
                          f"({t.seq_len}) to make one validation sequence; or set train.eval_every=0")
    _at_least("dist.replicate", cfg.dist.replicate, 1)
    _at_least("dist.world_size", cfg.dist.world_size, 1)
    # dist.replica_sync=lowrank with train.grad_clip_norm=full: refused where lowrank applies (train/step.py)
    if cfg.dist.replica_sync == "lowrank" and cfg.optim.per_layer:
        raise ConfigError("dist.replica_sync=lowrank does not support optim.per_layer=true yet: set "
                          "dist.replica_sync=full")
    if t.grad_clip_norm == "consumed" and cfg.dist.mode in ("ddp", "deepspeed"):
        raise ConfigError(f"train.grad_clip_norm=consumed is not supported under dist.mode={cfg.dist.mode} yet "
                          "(single and fsdp): set train.grad_clip_norm=full")
    if t.grad_clip_norm == "consumed" and cfg.optim.per_layer:
        raise ConfigError("train.grad_clip_norm=consumed is the global rule of whole-model steps: with "
                          "optim.per_layer=true use train.grad_clip_unit")
    if cfg.dist.reduce_last_micro_batch and cfg.optim.per_layer:
        raise ConfigError("dist.reduce_last_micro_batch=true defers the gradient reduction that optim.per_layer=true "
                          "updates from (its hooks run on every micro-batch's reduce-scatter): set one of them false")
    if cfg.dist.mode in ("ddp", "deepspeed"):  # the owner backend reduces fp32 buckets on the last micro-batch
        for key, default in (("reduce_dtype", "fp32"), ("reduce_last_micro_batch", False)):
            if getattr(cfg.dist, key) != default:
                raise ConfigError(f"config key 'dist.{key}' applies to dist.mode=fsdp only (dist.mode="
                                  f"{cfg.dist.mode} reduces fp32 gradients on the last micro-batch already)")
    if cfg.dist.deepspeed_config and cfg.dist.mode != "deepspeed":  # no other mode reads it: not silently ignored
        raise ConfigError(f"config key 'dist.deepspeed_config' ({cfg.dist.deepspeed_config}) applies to "
                          f"dist.mode=deepspeed only, but dist.mode={cfg.dist.mode}; set dist.mode=deepspeed or "
                          f"drop dist.deepspeed_config")
    if cfg.dist.bucket_mb <= 0:
        raise ConfigError(f"config key 'dist.bucket_mb' must be positive, got {cfg.dist.bucket_mb}")
    _at_least("checkpoint.every", cfg.checkpoint.every, 0, " (0 = only at the end)")
    _at_least("checkpoint.keep", cfg.checkpoint.keep, 1)
    _at_least("log.every", cfg.log.every, 1)
    if not cfg.run.dir.strip():
        raise ConfigError("config key 'run.dir' is empty")


def _validate_optim(o) -> None:  # its OptimConfig
    from lotus_dist.optim.methods import resolve_parts

    if o.lr < 0:
        raise ConfigError(f"config key 'optim.lr' must be >= 0, got {o.lr}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"config key 'optim.betas' must be two numbers in [0, 1), got {o.betas}")
    _at_least("optim.eps", o.eps, 0)
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _at_least("optim.rank", o.rank, 1)
    if not o.refresh_batch_mb > 0:
        raise ConfigError(f"config key 'optim.refresh_batch_mb' must be positive, got {o.refresh_batch_mb}")
    try:
        resolve_parts(o)  # the method exists and its parts are valid (the messages name optim.<key>)
    except ValueError as e:  # "optim.<key>: <problem>"
        key, _, problem = str(e).partition(": ")
        raise ConfigError(f"config key '{key}': {problem}") from None


def _validate_model(m) -> None:  # its ModelConfig
    from lotus_dist.model.llama import llama_config

    for key in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
        _at_least(f"model.{key}", getattr(m, key), 1)
    for key in ("rope_theta", "norm_eps", "init_std"):
        value = getattr(m, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key 'model.{key}' must be positive, got {value}")
    try:
        llama_config(m.name, **shape_overrides(m))  # a known size, and a shape it can build (dim divisible by n_heads, ...)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_init_from(m) -> None:  # a ModelConfig
    """``model.init_from`` names a Hugging Face folder. Checked when a run starts fresh, not at config load: a
    resume never reads the folder, so a moved or deleted one must not block it."""
    if m.init_from is not None:
        folder = Path(m.init_from).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"config key 'model.init_from': '{m.init_from}' is not a Hugging Face model folder "
                              f"(no config.json{'' if folder.is_dir() else '; no such directory'})")


__all__ = ["ConfigError", "check_init_from", "validate"]
