"""Hugging Face LLaMA interop without importing ``transformers``: names, config, and safetensors folders.

Our ``Llama`` is ``transformers.LlamaForCausalLM`` with shorter names (no ``model.`` prefix; the same rotary layout,
untied head, RMSNorm in fp32), so conversion is a rename: ``embed_tokens.weight`` <-> ``model.embed_tokens.weight``,
``lm_head.weight`` <-> ``lm_head.weight``. A folder holds ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` with its shards (``save_pretrained``'s layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from lotus_dist.errors import UserError

from .llama import LlamaConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Buffers that some exports carry and that we compute instead.
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
# transformers.LlamaConfig's defaults for the keys below, which a config.json may leave out
HF_DEFAULTS = {"model_type": "llama", "num_attention_heads": 32, "hidden_act": "silu", "rope_theta": 10000.0,
               "rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False}


def hf_name(name: str) -> str:
    """Our parameter name -> the LlamaForCausalLM one."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def our_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def hf_config(cfg: LlamaConfig, *, dtype: torch.dtype, bos_id: int | None, eos_id: int) -> dict:
    """``config.json`` of a ``LlamaForCausalLM`` that computes what ``Llama(cfg)`` computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta, >= 5 rope_parameters: both, so either version loads it
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
    }


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose bytes stay within ``max_bytes`` (a tensor larger than that alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class HFFolder:
    """The weights of a local Hugging Face LLaMA folder, read one tensor at a time (memory-mapped safetensors)."""

    def __init__(self, path: str | Path, key: str = "model.init_from"):
        from safetensors import safe_open

        self.path, self.key = Path(path), key
        if not self.path.is_dir():
            raise UserError(f"config key '{key}': '{path}' is not a directory (expected a Hugging Face LLaMA folder)")
        self.config = self._json("config.json")
        if (self.path / INDEX_FILE).is_file():
            weight_map = self._json(INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise UserError(f"config key '{key}': {self.path / INDEX_FILE} has no \"weight_map\" object of "
                                f"tensor name -> file name (is it save_pretrained's index?)")
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise UserError(f"config key '{key}': {self.path} has neither {SINGLE_FILE} nor {INDEX_FILE} "
                            f"(only safetensors weights are read)")
        self._handles = {}
        self.where: dict[str, str] = {}
        for name in files:
            try:
                handle = self._handles[name] = safe_open(str(self.path / name), framework="pt")
            except Exception as e:  # safetensors raises its own error types for damaged headers
                raise UserError(f"config key '{key}': {self.path / name} is not a readable safetensors file "
                                f"({type(e).__name__}: {e})") from None
            for tensor in handle.keys():
                if weight_map is None or weight_map.get(tensor) == name:
                    self.where[tensor] = name

    def _json(self, name: str) -> dict:
        """A JSON object of the folder; UserError naming the file when it is unreadable or not an object."""
        try:
            value = json.loads((self.path / name).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"config key '{self.key}': {self.path / name} cannot be read "
                            f"({type(e).__name__}: {e})") from None
        if not isinstance(value, dict):
            raise UserError(f"config key '{self.key}': {self.path / name} holds a JSON {type(value).__name__}, "
                            f"not an object (is it a Hugging Face model folder?)")
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors' name of the tensor's dtype: F32, BF16, F8_E4M3, I8, U8, BOOL, ..."""
        return self._handles[self.where[name]].get_slice(name).get_dtype()

    def read(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def check_config(cfg: LlamaConfig, folder: HFFolder) -> None:
    """UserError naming the first ``config.json`` value with which ``LlamaForCausalLM`` would compute another
    function than ``Llama(cfg)`` although every shape matches (absent keys take transformers' defaults)."""
    config, key, where = folder.config, folder.key, folder.path
    value = lambda k: config[k] if config.get(k) is not None else HF_DEFAULTS[k]  # noqa: E731
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        rope = {"rope_type": rope}
    refuse = lambda what, fix: UserError(f"config key '{key}': {where} has {what}; {fix}")  # noqa: E731

    if value("model_type") != "llama":
        raise refuse(f"model_type={value('model_type')}", "only LLaMA folders (model_type llama) are read")
    if int(value("num_attention_heads")) != cfg.n_heads:
        raise refuse(f"num_attention_heads={value('num_attention_heads')} but this run's model.n_heads is "
                     f"{cfg.n_heads}", f"set model.n_heads={value('num_attention_heads')}")
    kv_heads = config.get("num_key_value_heads") or cfg.n_heads
    if int(kv_heads) != cfg.n_heads:
        raise refuse(f"num_key_value_heads={kv_heads} of {cfg.n_heads} heads (grouped-query attention)",
                     "this model has one key/value head per head; only such LLaMA folders are read")
    if config.get("head_dim") is not None and int(config["head_dim"]) != cfg.head_dim:
        raise refuse(f"head_dim={config['head_dim']} but this model's is model.dim / model.n_heads = {cfg.head_dim}",
                     "only folders with head_dim = hidden_size / num_attention_heads are read")
    if value("hidden_act") not in ("silu", "swish"):
        raise refuse(f"hidden_act={value('hidden_act')} but this model's MLP uses silu (SwiGLU)",
                     "only silu LLaMA folders are read")
    scaling = config.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) if isinstance(scaling, dict) else scaling
    for what, kind in ((f"rope_scaling={json.dumps(scaling)}", rope_type),
                       (f"rope_parameters={json.dumps(rope)}", rope.get("rope_type", rope.get("type")))):
        if kind not in (None, "default"):
            raise refuse(what, "this model has the default rotary embeddings only (no linear, dynamic, yarn or "
                               "llama3 scaling); use a folder without rope scaling")
    factor = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    if factor is not None and float(factor) != 1.0:
        raise refuse(f"partial_rotary_factor={factor}", "this model rotates the whole head dimension")
    for hf_key, ours, our_key in (("rope_theta", cfg.rope_theta, "model.rope_theta"),
                                  ("rms_norm_eps", cfg.norm_eps, "model.norm_eps")):
        theirs = config.get(hf_key) if config.get(hf_key) is not None else rope.get(hf_key)
        theirs = HF_DEFAULTS[hf_key] if theirs is None else theirs
        if float(theirs) != float(ours):
            raise refuse(f"{hf_key}={theirs}{'' if hf_key in config or hf_key in rope else ' (by default)'} but "
                         f"this run's {our_key} is {ours}", f"set {our_key}={theirs}")
    for bias in ("attention_bias", "mlp_bias"):
        if value(bias):
            raise refuse(f"{bias}=true", "this model's projections have no bias; only bias-free LLaMA folders are "
                                         "read")


def check_folder(model: nn.Module, folder: HFFolder) -> dict[str, str]:
    """Our parameter name -> the folder's tensor that initialises it; UserError naming the first tensor that is
    missing, has another shape, or is not part of this model."""
    key, shapes = folder.key, {name: tuple(p.shape) for name, p in model.named_parameters()}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        try:
            check_config(cfg, folder)
        except (TypeError, ValueError, AttributeError) as e:  # a number that is not one, a list for an object
            raise UserError(f"config key '{key}': {folder.path / 'config.json'} has a malformed value "
                            f"({type(e).__name__}: {e})") from None
    source = {}
    for name, shape in shapes.items():
        wanted = hf_name(name)
        if wanted not in folder.where and name == "lm_head.weight" and folder.config.get("tie_word_embeddings"):
            wanted = hf_name("embed_tokens.weight")  # tied in the folder, untied here: the head starts as the embedding
        if wanted not in folder.where:
            raise UserError(f"config key '{key}': {folder.path} has no tensor {wanted} (this model's {name}, "
                            f"shape {list(shape)})")
        if folder.shape(wanted) != shape:
            raise UserError(f"config key '{key}': tensor {wanted} has shape {list(folder.shape(wanted))} in "
                            f"{folder.path} but this model's {name} is {list(shape)}; set model.* to the folder's "
                            f"config.json (e.g. model.dim={folder.config.get('hidden_size')}, "
                            f"model.n_layers={folder.config.get('num_hidden_layers')}, "
                            f"model.vocab_size={folder.config.get('vocab_size')})")
        if not folder.dtype(wanted).startswith(("F", "BF")):  # F64 ... F8_E5M2, BF16: floating point
            raise UserError(f"config key '{key}': tensor {wanted} in {folder.path} has dtype {folder.dtype(wanted)}, "
                            f"not floating point (a quantized model?); save it in float32, bfloat16 or float16")
        source[name] = wanted
    used = set(source.values())
    head = hf_name("lm_head.weight")
    if source.get("lm_head.weight") == head and folder.config.get("tie_word_embeddings"):
        # transformers uses one matrix for both: only a folder where they agree computes what we would
        if not torch.equal(folder.read(head), folder.read(source["embed_tokens.weight"])):
            raise UserError(f"config key '{key}': {folder.path} has tie_word_embeddings=true but its {head} differs "
                            f"from {source['embed_tokens.weight']}; set tie_word_embeddings to false in its "
                            f"config.json if the head is its own")
    extra = [t for t in folder.where if t not in used and not IGNORED.match(t)]
    if extra:
        raise UserError(f"config key '{key}': {folder.path} has tensor {extra[0]} that this model does not have "
                        f"({len(extra)} such tensors); is it a LLaMA of the same size?")
    return source


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | Path,
                    local_part: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    log: Callable[[str], None] = print) -> None:
    """Fill a materialised model (whole or sharded: ``local_part(param, full)`` keeps this process's part, as in
    ``init_parameters``) from a Hugging Face LLaMA folder, one tensor at a time; checks everything first."""
    folder = HFFolder(path)
    source = check_folder(model, folder)
    if source.get("lm_head.weight") == hf_name("embed_tokens.weight"):
        log(f"note: {folder.path} ties lm_head to embed_tokens; this model's head starts as a copy and trains "
            f"untied")
    for name, p in model.named_parameters():
        full = folder.read(source[name])
        local = p.to_local() if hasattr(p, "to_local") else p  # duck-typed: the model never imports distributed
        part = full if local_part is None else local_part(p, full.to(local.device))
        local.copy_(part)  # copy_ casts to the parameter's dtype and device
        del full, part


def read_hf_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder under our names (for tests and small models)."""
    folder = HFFolder(path, key="path")
    return {our_name(name): folder.read(name) for name in folder.where}


__all__ = ["HFFolder", "check_config", "hf_config", "hf_name", "our_name", "plan_shards", "shard_file_names",
           "load_hf_weights", "check_folder", "read_hf_folder", "SINGLE_FILE", "INDEX_FILE"]
