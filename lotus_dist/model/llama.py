"""LLaMA as GaLore and Lotus pre-train it: RMSNorm, SwiGLU MLP, rotary embeddings, causal SDPA, untied head.

Built from a dataclass; constructible on the ``meta`` device (``with torch.device("meta"): Llama(cfg)``) so that a
7B model can be planned and sharded without memory, then materialised with ``to_empty`` + ``init_parameters``
(the trainer's path: each rank initialises only its shards, and gets the weights one process would).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    ffn_dim: int = 1376
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} (model.dim {self.dim} / model.n_heads {self.n_heads}) must be "
                             f"even for rotary embeddings")


# The GaLore configs (llama_60m ... llama_7b, vocab 32000) and a tiny model for CPU tests and the default run.
NAMED_SIZES: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab_size=8000, dim=128, n_layers=4, n_heads=4, ffn_dim=344, max_seq_len=512),
    "llama_60m": LlamaConfig(dim=512, n_layers=8, n_heads=8, ffn_dim=1376),
    "llama_130m": LlamaConfig(dim=768, n_layers=12, n_heads=12, ffn_dim=2048),
    "llama_350m": LlamaConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=2736),
    "llama_1b": LlamaConfig(dim=2048, n_layers=24, n_heads=32, ffn_dim=5461),
    "llama_7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, max_seq_len=2048),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """The named size with non-None ``overrides`` applied; unknown names fail listing the known ones."""
    if name not in NAMED_SIZES:
        raise ValueError(f"unknown model.name '{name}' (known: {', '.join(NAMED_SIZES)})")
    return dataclasses.replace(NAMED_SIZES[name], **{k: v for k, v in overrides.items() if v is not None})


def shape_overrides(m) -> dict:
    """The shape keys ``llama_config(m.name, **...)`` takes, read from any object with the model fields (the run
    config's ``model`` section): every ``LlamaConfig`` field, None (the named size's value) where ``m`` has none.
    Not the preset name, nor ``model.init_from`` (where the weights come from, not the shape)."""
    return {f.name: getattr(m, f.name, None) for f in dataclasses.fields(LlamaConfig)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF LLaMA does) whatever the activation dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim] in the HF layout (frequencies repeated over the two halves).

    Computed per forward rather than stored as buffers: no buffer to re-initialise after ``meta`` construction
    and nothing to shard, at a cost of O(seq_len * head_dim) per step.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Recompute each block's forward in backward (train.activation_checkpointing): one block's activations
        # at a time instead of all of them; a training choice, not part of the model's identity.
        self.activation_checkpointing = False
        if self.embed_tokens.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF LLaMA init: every Linear and the embedding ~ N(0, init_std), norms = 1.

        Draws in module order from the default generator, so the same seed gives the same model on any device
        layout; call after ``to_empty`` when the model was built on ``meta``.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits [b, t, vocab]; with ``targets`` the mean next-token cross-entropy instead."""
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        h = self.embed_tokens(tokens)
        cos, sin = rotary_cos_sin(t, self.cfg.head_dim, self.cfg.rope_theta, h.device, h.dtype)
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            h = checkpoint(layer, h, cos, sin, use_reentrant=False) if recompute else layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: a stable hash of (run seed, parameter name)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_parameters(model: Llama, seed: int,
                    local_part: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
    """Sharding-invariant initialisation (HF LLaMA's rule: Linear and Embedding ~ N(0, init_std), norms = 1).

    Each parameter's full tensor is drawn on its device from a generator of its own, seeded by (``seed``, its
    name), one parameter at a time, and this process keeps its part of it (``local_part(param, full)``, the whole
    tensor by default; a DTensor's local shard is written through ``to_local()``). So the same seed gives the same
    weights at any world size and sharding, and the transient is one full matrix, never the model.
    """
    std = model.cfg.init_std
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding, RMSNorm)):
            continue
        p = module.weight
        local = p.to_local() if hasattr(p, "to_local") else p  # duck-typed: the model never imports distributed
        if isinstance(module, RMSNorm):
            local.fill_(1.0)
            continue
        gen = torch.Generator(device=local.device).manual_seed(parameter_seed(seed, f"{module_name}.weight"))
        if local_part is None:  # the whole tensor is this process's: draw in place (the same values, no copy)
            local.normal_(0.0, std, generator=gen)
            continue
        full = torch.empty(p.shape, dtype=local.dtype, device=local.device).normal_(0.0, std, generator=gen)
        local.copy_(local_part(p, full))
        del full


def compile_blocks(model: Llama, backend: str = "inductor") -> None:
    """``train.compile``: each block's forward compiled by ``torch.compile`` (torchtitan's unit), in place.

    The forward, not the module: the state-dict keys stay those of the eager model (no ``_orig_mod.``), so
    checkpoints resume across the switch both ways, and the hooks on the block (FSDP2's all-gather and
    reshard, activation checkpointing's ``checkpoint(layer, ...)`` around it) run outside the compiled graph,
    as with torchtitan's wrapper. Call it before ``fully_shard``. The blocks share one code object, so they
    share one graph per shape and grad mode (one compile for the training step, one for evaluation).
    """
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=True, backend=backend)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token, for throughput/MFU (the one formula: scripts, planner): 6 N + 12 L d T, N the
    weights that multiply (blocks and lm_head; the embedding is a lookup), 12 L d T the attention scores."""
    n = cfg.vocab_size * cfg.dim + cfg.n_layers * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_dim)
    return 6 * n + 12 * cfg.n_layers * cfg.dim * seq_len


__all__ = ["LlamaConfig", "NAMED_SIZES", "llama_config", "Llama", "RMSNorm", "compile_blocks", "count_parameters",
           "flops_per_token", "init_parameters", "parameter_seed"]
