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
        try:
            self.config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"config key '{key}': {self.path / 'config.json'} cannot be read "
                            f"({type(e).__name__}: {e})") from None
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
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

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


def check_folder(model: nn.Module, folder: HFFolder) -> dict[str, str]:
    """Our parameter name -> the folder's tensor that initialises it; UserError naming the first tensor that is
    missing, has another shape, or is not part of this model."""
    key, shapes = folder.key, {name: tuple(p.shape) for name, p in model.named_parameters()}
    cfg = getattr(model, "cfg", None)
    if cfg is not None:  # values that change the function without changing a shape
        for hf_key, ours, our_key in (("rope_theta", cfg.rope_theta, "model.rope_theta"),
                                      ("rms_norm_eps", cfg.norm_eps, "model.norm_eps")):
            theirs = folder.config.get(hf_key, (folder.config.get("rope_parameters") or {}).get(hf_key))
            if theirs is not None and float(theirs) != float(ours):
                raise UserError(f"config key '{key}': {folder.path} has {hf_key}={theirs} but this run's "
                                f"{our_key} is {ours}; set {our_key}={theirs}")
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
        source[name] = wanted
    used = set(source.values())
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


__all__ = ["HFFolder", "hf_config", "hf_name", "our_name", "plan_shards", "shard_file_names", "load_hf_weights",
           "check_folder", "read_hf_folder", "SINGLE_FILE", "INDEX_FILE"]
