"""The DeepSpeed config of ``dist.mode=deepspeed``: generated from ours, or ``dist.deepspeed_config`` (a JSON file)
read key by key against ours (the table of keys is in docs/ddp_deepspeed.md).

Every key of a user's JSON is one lotus_dist understands, and it either says ``"auto"`` (the Hugging Face
convention; filled from our config, as is an absent key) or states the value this run uses anyway. A value that
contradicts ours is refused, naming the key of ours to set: our config stays the one place a setting is read from
(``train.grad_clip`` is what the trainer clips with, whatever the JSON says), so a JSON value can never be dropped
without a word. Unknown keys and wrongly-typed values are refused too, one line naming the key and the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from lotus_dist.errors import UserError
from lotus_dist.precision import computes_in_bf16

AUTO = "auto"
_CUT = "flat 1-D partitions of the parameters that cut matrices apart, which no low-rank projection can use"
_STAGE3 = ("dist.mode=deepspeed: ZeRO stage 3 is not supported: it shards the parameters into "
           f"{_CUT}; use dist.mode=fsdp (FSDP2, sharded along each matrix's long side) instead")
_FP16 = (f"dist.mode=deepspeed: 'fp16.enabled' is not supported: DeepSpeed's fp16 optimizer wrapper hands the "
         f"optimizer {_CUT}; use bf16 (train.dtype=bf16 or the config's bf16.enabled)")

# What the owner backend always does (so true or "auto" only): DeepSpeed's names for it.
_ALWAYS = {"overlap_comm": "overlaps the gradient reduce-scatter with backward",
           "contiguous_gradients": "reduces contiguous fp32 buckets",
           "reduce_scatter": "reduce-scatters the gradients to their owners",
           "allgather_partitions": "all-gathers the updated weights by buckets"}
_BUCKETS = ("reduce_bucket_size", "allgather_bucket_size")  # elements; one bucket of ours serves both
_OFFLOAD = ("offload_optimizer", "offload_param")
ZERO_KEYS = ("stage", *_ALWAYS, *_BUCKETS, *_OFFLOAD)
_FP16_NUMBERS = ("loss_scale", "loss_scale_window", "initial_scale_power", "hysteresis", "min_loss_scale")
_FP16_FLAGS = ("consecutive_hysteresis", "auto_cast")
# Passed to the engine, which never runs forward, backward or step (the trainer does; its metrics logger reports).
_INERT = {"steps_per_print": "an integer", "wall_clock_breakdown": "true or false",
          "zero_allow_untested_optimizer": "true or false"}
_SECTIONS = ("zero_optimization", "bf16", "torch_autocast", "fp16", "optimizer", "scheduler")
TOP_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
            *_SECTIONS, *_INERT)

_KINDS = {
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a list of numbers": lambda v: isinstance(v, list) and all(_KINDS["a number"](x) for x in v),
}


def _show(value) -> str:
    return json.dumps(value)


class _Json:
    """One user JSON; every refusal is one line naming the key (dotted) and the file."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str):
        raise UserError(f"dist.deepspeed_config: '{key}' in {self.path} {problem}")

    def object(self, parent: dict, key: str, prefix: str = "") -> dict:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            self.fail(prefix + key, f"must be an object ({{...}}), got {_show(value)}")
        return value

    def known(self, obj: dict, prefix: str, keys) -> None:
        for key in obj:
            if key not in keys:
                where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
                self.fail(prefix + key, f"is not a key lotus_dist understands; remove it (known {where}: "
                                        f"{', '.join(keys)}; see docs/ddp_deepspeed.md)")

    def typed(self, key: str, value, kind: str):
        if value != AUTO and not _KINDS[kind](value):
            self.fail(key, f"must be {kind} or \"auto\", got {_show(value)}")
        return value

    def value(self, key: str, value, ours, kind: str, fix: str):
        """``value`` ("auto" when absent) resolved to ``ours``; a different value is refused with ``fix``."""
        if self.typed(key, value, kind) != AUTO and value != ours:
            raise UserError(f"dist.deepspeed_config: {key}={_show(value)} in {self.path} contradicts this run's "
                            f"{_show(ours)} ({fix}); or write \"auto\"")
        return ours


def _zero(j: _Json, ds: dict, bucket_mb: float) -> dict:
    zero = j.object(ds, "zero_optimization")
    stage = zero.get("stage", 0)
    if not _KINDS["an integer"](stage) or stage not in (0, 1, 2, 3):
        j.fail("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {_show(stage)}")
    if stage == 3:  # before the key check: a stage-3 config's stage3_* keys would hide the reason
        raise UserError(_STAGE3)
    j.known(zero, "zero_optimization.", ZERO_KEYS)
    out = {**zero, "stage": stage}
    for key, what in _ALWAYS.items():
        if key in zero:
            out[key] = j.value(f"zero_optimization.{key}", zero[key], True, "true or false",
                               f"the owner backend always {what}; remove the key")
    elements = round(bucket_mb * 2**20 / 4)  # dist.bucket_mb: MiB of fp32 gradients per bucket, all ranks' segments
    for key in _BUCKETS:
        value = j.typed(f"zero_optimization.{key}", zero.get(key, AUTO), "a number")
        if value != AUTO and not (value > 0 and abs(value - elements) <= 1e-3 * elements):
            raise UserError(f"dist.deepspeed_config: zero_optimization.{key}={_show(value)} in {j.path} "
                            f"contradicts this run's {elements} elements per bucket (dist.bucket_mb={bucket_mb:g}); "
                            f"set dist.bucket_mb={max(value, 0) * 4 / 2**20:.6g}, or write \"auto\"")
        if key in zero:
            out[key] = elements
    for key in _OFFLOAD:
        if key in zero:
            section = j.object(zero, key, "zero_optimization.")
            device = section.get("device", "none")
            if device != "none":
                j.fail(f"zero_optimization.{key}.device", f"is {_show(device)}: offloading is not supported (each "
                                                          f"owner keeps its matrices' state on its device); remove "
                                                          f"the '{key}' section")
            j.known(section, f"zero_optimization.{key}.", ("device", "pin_memory"))
    return out


def _precision(j: _Json, ds: dict, autocast: bool, dtype: str, device_type: str) -> dict:
    computes = f"this run computes in {'bf16' if autocast else 'fp32'}: train.dtype={dtype} on {device_type}"
    out = {}
    for section, keys in (("bf16", ("enabled",)), ("torch_autocast", ("enabled", "dtype"))):
        given = j.object(ds, section)
        j.known(given, f"{section}.", keys)
        enabled = given.get("enabled", AUTO)
        set_to = "bf16 (the trainer's autocast applies it)" if enabled is True else "fp32"
        j.value(f"{section}.enabled", enabled, autocast, "true or false", f"{computes}; set train.dtype={set_to}")
        if section == "torch_autocast" and "dtype" in given and given["dtype"] not in (AUTO, "bfloat16",
                                                                                       "torch.bfloat16"):
            j.fail("torch_autocast.dtype", f"is {_show(given['dtype'])}: only bfloat16 autocast is supported "
                                           f"(train.dtype=bf16)")
    out["bf16"] = {"enabled": autocast}
    if autocast:
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # applied by the trainer's autocast
    fp16 = j.object(ds, "fp16")
    j.known(fp16, "fp16.", ("enabled", *_FP16_NUMBERS, *_FP16_FLAGS))
    if j.typed("fp16.enabled", fp16.get("enabled", AUTO), "true or false") is True:
        raise UserError(_FP16)
    for key in _FP16_NUMBERS:  # loss scaling: inert without fp16
        j.typed(f"fp16.{key}", fp16.get(key, AUTO), "a number")
    for key in _FP16_FLAGS:
        j.typed(f"fp16.{key}", fp16.get(key, AUTO), "true or false")
    out["fp16"] = {"enabled": False}
    return out


def _optimizer(j: _Json, ds: dict, o) -> None:
    """An 'optimizer' section may only restate optim.* (the optimizer is ours); it is not given to the engine."""
    section = j.object(ds, "optimizer")
    j.known(section, "optimizer.", ("type", "params"))
    kind = j.typed("optimizer.type", section.get("type", AUTO), "a string")
    if kind != AUTO and kind.lower() != o.name:
        j.fail("optimizer.type", f"is {_show(kind)} but this run's optimizer is optim.name={o.name} (the optimizer "
                                 f"is optim.*); remove the 'optimizer' section or set optim.name")
    params = j.object(section, "params", "optimizer.")
    j.known(params, "optimizer.params.", ("lr", "betas", "eps", "weight_decay"))
    for key in ("lr", "eps", "weight_decay"):
        value = params.get(key, AUTO)
        j.value(f"optimizer.params.{key}", value, getattr(o, key), "a number", f"set optim.{key}={_show(value)}")
    value = params.get("betas", AUTO)
    j.value("optimizer.params.betas", value, list(o.betas), "a list of numbers", f"set optim.betas={_show(value)}")


def _scheduler(j: _Json, ds: dict, t) -> None:
    """A 'scheduler' section may only restate train.*'s schedule (linear warmup, then cosine decay): DeepSpeed's
    WarmupCosineLR with "auto" or equal params; it is not given to the engine."""
    section = j.object(ds, "scheduler")
    j.known(section, "scheduler.", ("type", "params"))
    kind = section.get("type")
    if kind != "WarmupCosineLR":
        j.fail("scheduler.type", f"is {_show(kind)}: the schedule is train.* (linear warmup over train.warmup_ratio, "
                                 f"cosine decay to train.min_lr_ratio); remove the 'scheduler' section, or give "
                                 f"WarmupCosineLR with \"auto\" params")
    params = j.object(section, "params", "scheduler.")
    j.known(params, "scheduler.params.",
            ("total_num_steps", "warmup_num_steps", "cos_min_ratio", "warmup_type", "warmup_min_ratio"))
    warmup = int(round(t.warmup_ratio * t.steps))  # schedule.lr_multiplier's warmup steps
    for key, ours, kind, fix in (
            ("total_num_steps", t.steps, "an integer", "set train.steps"),
            ("warmup_num_steps", warmup, "an integer", "set train.warmup_ratio (warmup steps = warmup_ratio x steps)"),
            ("cos_min_ratio", t.min_lr_ratio, "a number", "set train.min_lr_ratio"),
            ("warmup_type", "linear", "a string", "the warmup is linear")):
        j.value(f"scheduler.params.{key}", params.get(key, AUTO), ours, kind, fix)
    if params.get("warmup_min_ratio", AUTO) != AUTO:
        j.fail("scheduler.params.warmup_min_ratio", "must be \"auto\" (the warmup starts at lr / warmup steps)")


def resolve_user_config(ds, path: Path, cfg, world_size: int, autocast: bool, device_type: str) -> dict:
    """The engine config a user's JSON amounts to, with every "auto" filled from ours (module docstring)."""
    j = _Json(path)
    if not isinstance(ds, dict):
        raise UserError(f"dist.deepspeed_config: {path} must hold a JSON object")
    j.known(ds, "", TOP_KEYS)
    t = cfg.train
    batch = "from train.batch_size, train.micro_batch_size and the world size"
    out = {
        "train_batch_size": j.value("train_batch_size", ds.get("train_batch_size", AUTO), t.batch_size,
                                    "an integer", f"{batch}; set train.batch_size"),
        "train_micro_batch_size_per_gpu": j.value(
            "train_micro_batch_size_per_gpu", ds.get("train_micro_batch_size_per_gpu", AUTO), t.micro_batch_size,
            "an integer", f"{batch}; set train.micro_batch_size"),
        "gradient_accumulation_steps": j.value(
            "gradient_accumulation_steps", ds.get("gradient_accumulation_steps", AUTO),
            t.batch_size // (t.micro_batch_size * world_size), "an integer", f"{batch}; set train.micro_batch_size"),
    }
    clip = ds.get("gradient_clipping", AUTO)
    out["gradient_clipping"] = j.value("gradient_clipping", clip, t.grad_clip, "a number",
                                       f"the trainer clips with train.grad_clip; set train.grad_clip={_show(clip)}")
    out["zero_optimization"] = _zero(j, ds, cfg.dist.bucket_mb)
    out.update(_precision(j, ds, autocast, t.dtype, device_type))
    if "optimizer" in ds:
        _optimizer(j, ds, cfg.optim)
    if "scheduler" in ds:
        _scheduler(j, ds, t)
    for key, kind in _INERT.items():
        if key in ds and j.typed(key, ds[key], kind) != AUTO:
            out[key] = ds[key]
    out.setdefault("steps_per_print", 2**31 - 1)  # our metrics logger reports
    return out


def deepspeed_config(cfg, world_size: int, device_type: str = "cpu") -> dict:
    """The engine config: ``dist.deepspeed_config`` resolved against ours, or one generated from ours."""
    t = cfg.train
    autocast = computes_in_bf16(t.dtype, device_type)  # the trainer's autocast rule
    if cfg.dist.deepspeed_config:
        path = Path(cfg.dist.deepspeed_config)
        try:
            ds = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"dist.deepspeed_config: cannot read {path} as JSON ({e})") from None
        ds = resolve_user_config(ds, path, cfg, world_size, autocast, device_type)
    else:
        ds = {
            "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": t.batch_size // (t.micro_batch_size * world_size),
            "train_batch_size": t.batch_size,
            # The trainer clips with train.grad_clip after the all-reduce; the engine sees the same value.
            "gradient_clipping": t.grad_clip,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
            "steps_per_print": 2**31 - 1,  # our metrics logger reports
            "wall_clock_breakdown": False,
        }
        if autocast:
            ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # applied by the trainer's autocast
    check_config(ds)
    return ds


def check_config(ds: dict) -> int:
    """Refuse what cannot run on whole matrices; returns the ZeRO stage asked for (0, 1 or 2)."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"dist.mode=deepspeed: zero_optimization.stage={stage!r} is not one of 0, 1, 2, 3")
    if stage == 3:
        raise UserError(_STAGE3)
    if (ds.get("fp16") or {}).get("enabled"):
        raise UserError(_FP16)
    return stage


def engine_config(ds: dict) -> dict:
    """What the engine itself is given: stage 0 and no bf16 wrapper (our owner backend and autocast do those)."""
    out = {**ds, "zero_optimization": {**(ds.get("zero_optimization") or {}), "stage": 0}}
    if (ds.get("bf16") or {}).get("enabled"):
        out["bf16"] = {**ds["bf16"], "enabled": False}
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # applied by the trainer's autocast
    return out
