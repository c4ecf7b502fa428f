"""Run configuration: nested dataclasses loaded from YAML plus ``section.key=value`` overrides.

Every key has a type (a ``Literal`` lists a key's allowed values); an unknown key or a value of the wrong type
fails at start-up with the key named (``ConfigError``), before any process group, model or data is touched.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lotus_dist.distributed.fsdp import REDUCE_DTYPES
from lotus_dist.distributed.matrix_comm import PROJECTOR_LAYOUTS
from lotus_dist.distributed.modes import MODES
from lotus_dist.model.llama import shape_overrides  # noqa: F401  (the model layer's; importable here too)
from lotus_dist.optim.options import (OPTIONS, MomentPolicy, ProjectorDtype, ProjType, ReferenceDtype, Residual,
                                      Solver, StateDtype, SwitchPolicy)
from lotus_dist.precision import TRAIN_DTYPES
from lotus_dist.train.config_checks import ConfigError, check_init_from, validate  # noqa: F401  (importable here)

# The allowed values of the keys that are not the optimizer's (the low-rank parts' types are optim/options.py's).
Projectors = Literal[("auto", *PROJECTOR_LAYOUTS)]  # type: ignore[valid-type]
Refresh = Literal["distributed", "owner"]
DataSource = Literal["embedded", "c4", "indexed"]
DataSplit = Literal["auto", "node", "global"]
TrainDtype = Literal[TRAIN_DTYPES]  # type: ignore[valid-type]
OnNonfinite = Literal["stop", "skip"]
DistMode = Literal[("auto", *MODES)]  # type: ignore[valid-type]
DistBackend = Literal["auto", "nccl", "gloo"]
ReduceDtype = Literal[tuple(REDUCE_DTYPES)]  # type: ignore[valid-type]
ReplicaSync = Literal["full", "lowrank"]
GradClipNorm = Literal["full", "consumed"]
CompileBackend = Literal["inductor", "aot_eager"]


@dataclass
class ModelConfig:
    # A named size (lotus_dist.model.llama.NAMED_SIZES); any field below set to non-null overrides it.
    name: str = "tiny"
    vocab_size: Optional[int] = None  # null: the tokenizer's vocabulary size
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    max_seq_len: Optional[int] = None
    rope_theta: Optional[float] = None
    norm_eps: Optional[float] = None
    init_std: Optional[float] = None
    # A local Hugging Face LLaMA folder (config.json + safetensors, e.g. one scripts/export_hf.py wrote): a fresh
    # run starts from its weights instead of a random init (continued pre-training); a resume loads its checkpoint.
    init_from: Optional[str] = None


def _part(key: str, default: Any = None) -> Any:
    """A low-rank part key (null: the method's value); its doc is the optimizer's schema's (optim/options.py)."""
    return field(default=default, metadata={"doc": OPTIONS[key].doc})


@dataclass
class OptimConfig:
    # A method of docs/algorithms.md section 8: adamw, galore, lotus, lotus_rho, golore, grassjump, grasswalk,
    # osd, fira, projfactor, apollo, apollo_mini. The part keys below (defaulting to null) take the method's value
    # when null; their docs, bounds and allowed values are the optimizer's (optim/options.py OPTIONS).
    name: str = "lotus"
    lr: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.0
    rank: int = _part("rank", 128)  # apollo_mini's is 1 whatever this says (optim.methods.FIXED_RANKS)
    scale: Optional[float] = _part("scale")
    proj_type: Optional[ProjType] = _part("proj_type")
    solver: Optional[Solver] = _part("solver")
    switch: Optional[SwitchPolicy] = _part("switch")
    update_gap: Optional[int] = _part("update_gap")
    gamma: Optional[float] = _part("gamma")
    verify_gap: Optional[int] = _part("verify_gap")
    t_min: Optional[int] = _part("t_min")
    window: Optional[int] = _part("window")
    moments: Optional[MomentPolicy] = _part("moments")
    residual: Optional[Residual] = _part("residual")
    oversample: Optional[int] = _part("oversample")
    power_iters: Optional[int] = _part("power_iters")
    geodesic_step: Optional[float] = _part("geodesic_step")
    granularity: Optional[int] = None  # c of projfactor
    reference_dtype: Optional[ReferenceDtype] = _part("reference_dtype")
    state_dtype: Optional[StateDtype] = _part("state_dtype")  # every group's Adam moments, plain ones too
    projector_dtype: Optional[ProjectorDtype] = _part("projector_dtype")
    fused: Optional[bool] = _part("fused")
    seed: int = _part("seed", 0)
    # Update each block (FSDP unit) inside backward and free its gradients at once (single, fsdp): no full-model
    # gradient; with train.grad_accum > 1 projected matrices accumulate R (long x r), not G. Clip with
    # train.grad_clip_unit (global-norm train.grad_clip must be 0).
    per_layer: bool = False
    # fsdp: where projectors live. replicate: whole on every rank, no traffic; shard: 1/W row slices, all-gathered
    # one at a time in a step; auto: shard where that lowers the per-rank peak and replicated projectors would
    # outweigh the rank's weight shard (plan.choose_projectors), said in the start-up log
    projectors: Projectors = "auto"
    # fsdp: how a refresh is solved. distributed: sketch rsvd across ranks; owner: exact SVD on each matrix's owner rank
    refresh: Refresh = "distributed"
    # MiB of solver workspace (global matrix shapes) per batch of a refresh's matrices solved together, one
    # collective per stage per batch; > 0, default = optim/refresh.py REFRESH_BATCH_BYTES
    refresh_batch_mb: float = 256.0


@dataclass
class DataConfig:
    # embedded: the offline Shakespeare corpus in C4 format; c4: allenai/c4 from the hub or a local mirror
    # (data.path); indexed: Megatron .bin/.idx prefixes (data.path, or data.blend for weighted blends).
    source: DataSource = "embedded"
    path: Optional[str] = None
    tokenizer: str = "tokenizer/embedded.model"
    hub_name: str = "allenai/c4"
    hub_config: str = "en"
    shuffle_buffer: int = 1000
    val_tokens: int = 32768  # validation perplexity is measured on exactly this many tokens
    blend: Optional[list] = None  # indexed: [weight, prefix, weight, prefix, ...]
    cache_dir: Optional[str] = None  # embedded corpus / indexed-dataset caches; null: ~/.cache/lotus_dist
    # node: each rank reads its own shards/examples (split_dataset_by_node); global: every rank reads the whole
    # stream and takes its slice of each global batch (world-size-invariant batches, exact resume at any size);
    # auto: global for the (small, local) embedded corpus, node for c4 and indexed data.
    split: DataSplit = "auto"
    val_path: Optional[str] = None  # indexed: validation .bin/.idx prefix; null: the '*validation*' sibling
    # micro-batches prepared ahead by a background thread (0: none); checkpoints hold the position of the batches
    # trained on, so a run resumes exactly at any depth. Raise it (e.g. 8) for small micro-batches.
    prefetch: int = 2
    # a tokenizer other than the one indexed data (its recorded fingerprint) or the checkpoint was made with is
    # refused: every id would mean another token. true: train on anyway (a warning), e.g. a re-saved identical model.
    allow_tokenizer_change: bool = False


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16  # global, in sequences, per optimizer step
    micro_batch_size: int = 8  # per rank, per forward/backward
    seq_len: int = 128
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    # the norm train.grad_clip clips by: full, of every gradient; consumed, of what the optimizer consumes (R =
    # project(G) of each projected matrix, in the basis it updates with, and the plain gradients): docs/distributed.md
    grad_clip_norm: GradClipNorm = "full"
    activation_checkpointing: bool = False  # recompute each block's forward in backward: less memory, ~1/3 more compute
    grad_clip_unit: float = 0.0  # optim.per_layer only: clip each block's (FSDP unit's) gradient norm; 0 = off
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    eval_every: int = 50
    dtype: TrainDtype = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    on_nonfinite: OnNonfinite = "stop"  # a step with a non-finite loss or gradient: stop (save, exit) or skip it
    # skip gives up (saves and stops) after this many skipped steps in a row, or once more than this fraction of
    # train.steps has been skipped in all
    max_skipped: int = 10
    max_skipped_fraction: float = 0.01
    stop_at: Optional[int] = None  # save and exit after this step (a job's time slice); the schedule follows steps
    # torch.compile each transformer block's forward (after activation checkpointing, before fully_shard; every
    # dist.mode, optim.per_layer too). Checkpoints resume across the switch; graphs compiled after the first
    # step and first evaluation are counted in metrics.jsonl's `recompiles` (0 in a healthy run)
    compile: bool = False
    # torch.compile's backend for train.compile: inductor (fused kernels, the GPU's choice); aot_eager traces the
    # same graphs (forward and backward) without generating code, which a CPU check compiles in seconds
    compile_backend: CompileBackend = "inductor"
    # dense bf16 peak TFLOP/s per device for metrics.jsonl's `mfu`; null: the datasheet value of a known CUDA
    # device (train/throughput.py), and no `mfu` on a CPU or an unknown device
    peak_tflops: Optional[float] = None


@dataclass
class DistConfig:
    mode: DistMode = "auto"  # auto: single alone, fsdp under torchrun
    world_size: Optional[int] = None  # dry runs only: the world size to plan for
    replicate: int = 1  # HSDP: replicas (outer mesh dim); 1 = plain FSDP
    backend: DistBackend = "auto"  # auto: nccl on CUDA, gloo on CPU
    deepspeed_config: Optional[str] = None  # deepspeed only: a DeepSpeed JSON file; null: generated from this config
    bucket_mb: float = 25.0  # ddp/deepspeed: MiB of one fp32 gradient bucket, all ranks' segments, at any world size
    reduce_dtype: ReduceDtype = "fp32"  # fsdp: dtype of the gradient reduce-scatter / all-reduce (bf16: half the bytes)
    # fsdp, train.grad_accum > 1: reduce gradients on the last micro-batch of a step only. Flat FSDP skips the
    # reduce-scatter before it (each rank accumulates its blocks' unsharded gradients, the whole model's in
    # dist.reduce_dtype); HSDP reduce-scatters inside the shard group every micro-batch and defers only the
    # all-reduce across replicas (the inter-node bytes). Not with optim.per_layer (its hooks need every reduce).
    reduce_last_micro_batch: bool = False
    # HSDP: what replicas exchange for a projected matrix. full: FSDP2 all-reduces its gradient shard; lowrank: the
    # optimizer all-reduces R = project(G) instead (the solver's input on refresh steps), needs
    # train.grad_clip_norm=consumed; methods that read G every step use full (docs/distributed.md)
    replica_sync: ReplicaSync = "full"


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 = only at the end
    keep: int = 2
    resume: bool = True  # false: refuse to start on a run directory that holds a checkpoint
    async_save: bool = False  # DCP async_save: the loop waits only for the staging copy


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/tiny"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if annotation is Any:
        return value
    if origin is Literal:  # the allowed values of a key, checked at load time so that a typo fails before the run
        allowed = typing.get_args(annotation)
        if all(isinstance(a, str) for a in allowed) and not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin is list or annotation is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation) or (Any,)
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if not math.isfinite(number):  # nan or inf reach the weights at step 1 and poison every later step
            raise ConfigError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {annotation}")


def _apply(obj: Any, prefix: str, mapping: dict) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{full}' (known keys here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}': expected a section (mapping), got {value!r}")
            _apply(current, f"{full}.", value)
            continue
        value = _check_type(full, value, hints[key])
        setattr(obj, key, value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key '{key}' appears twice in one section (lines {seen[key] + 1} and "
                              f"{key_node.start_mark.line + 1}); keep one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (['optim', 'lr'], 0.0003). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparsable scalar is taken as a string; the type check decides
    return key.split("."), value


def merge_overrides(*groups: list[str]) -> list[str]:
    """Compose override lists for a script, later groups replacing earlier ones key by key (a command line that
    sets one key twice is refused by ``load_config``: there it is a mistake, here it is the intent)."""
    merged: dict[str, str] = {}
    for group in groups:
        for text in group:
            key = text.split("=", 1)[0].strip().lstrip("-")
            merged.pop(key, None)  # the replacing value takes the later place, as it would on a command line
            merged[key] = text
    return list(merged.values())


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML) into a Config, then apply ``section.key=value`` overrides in order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
        except ConfigError as e:
            raise ConfigError(f"config file '{path}': {e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"config file '{path}'{where}: invalid YAML ({problem})") from None
        if data is None:  # an empty file (or comments only) is almost always a mistake, not "all defaults"
            raise ConfigError(f"config file '{path}' is empty; give at least one section (an empty mapping "
                              f"'{{}}' trains on the defaults)")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': top level must be a mapping of sections")
        _apply(cfg, "", data)
    given: dict[str, str] = {}
    for text in overrides:
        key_path, value = parse_override(text)
        key = ".".join(key_path)
        if key in given:
            raise ConfigError(f"config key '{key}' is overridden twice on the command line ('{given[key]}', then "
                              f"'{text}'); keep one")
        given[key] = text
        _apply(cfg, "", _nest(key_path, value))
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
