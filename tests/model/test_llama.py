"""LLaMA: named sizes against the GaLore configs, and logits against a plain re-implementation."""

import math
import time

import pytest
import torch

from lotus_dist.model.llama import NAMED_SIZES, Llama, count_parameters, llama_config

# Published parameter counts of the GaLore LLaMA configs (vocab 32000), in millions, to 0.1 %.
GALORE_COUNTS_M = {"llama_60m": 58.07, "llama_130m": 134.11, "llama_350m": 367.97, "llama_1b": 1339.08,
                   "llama_7b": 6738.42}


@pytest.mark.parametrize("name", list(GALORE_COUNTS_M))
def test_named_sizes_match_galore_counts(name):
    with torch.device("meta"):
        model = Llama(llama_config(name))
    cfg = model.cfg
    by_hand = 2 * cfg.vocab_size * cfg.dim + cfg.n_layers * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim) + cfg.dim
    assert count_parameters(model) == by_hand
    assert count_parameters(model) / 1e6 == pytest.approx(GALORE_COUNTS_M[name], rel=1e-3)


def test_7b_builds_on_meta_in_seconds():
    start = time.perf_counter()
    with torch.device("meta"):
        model = Llama(llama_config("llama_7b"))
    assert time.perf_counter() - start < 10
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_size_names_the_known_ones():
    with pytest.raises(ValueError, match="llama_60m"):
        llama_config("llama_3m")


def reference_logits(model: Llama, tokens: torch.Tensor) -> torch.Tensor:
    """A loop-level LLaMA forward written from the paper's equations, sharing only the weights."""
    cfg = model.cfg
    d, h = cfg.dim, cfg.n_heads
    hd = d // h
    b, t = tokens.shape

    def rmsnorm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)

    def rope(x):  # x [b, h, t, hd]; rotate pairs (i, i + hd/2) by angle pos * theta^(-2i/hd)
        out = x.clone()
        for pos in range(t):
            for i in range(hd // 2):
                ang = pos * cfg.rope_theta ** (-2 * i / hd)
                c, s = math.cos(ang), math.sin(ang)
                a, bb = x[:, :, pos, i], x[:, :, pos, i + hd // 2]
                out[:, :, pos, i] = a * c - bb * s
                out[:, :, pos, i + hd // 2] = a * s + bb * c
        return out

    x = model.embed_tokens.weight[tokens]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for layer in model.layers:
        a = layer.self_attn
        y = rmsnorm(x, layer.input_layernorm.weight)
        q, k, v = ((y @ p.weight.T).view(b, t, h, hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, t, d) @ a.o_proj.weight.T
        m = layer.mlp
        y = rmsnorm(x, layer.post_attention_layernorm.weight)
        g = y @ m.gate_proj.weight.T
        x = x + ((g * torch.sigmoid(g)) * (y @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rmsnorm(x, model.norm.weight) @ model.lm_head.weight.T


def test_logits_match_reference_implementation():
    torch.manual_seed(0)
    model = Llama(llama_config("tiny", vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_dim=48))
    with torch.no_grad():  # non-trivial norm weights, so the norms are really exercised
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        ours, ref = model(tokens), reference_logits(model, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = Llama(llama_config("tiny", vocab_size=50, dim=16, n_layers=1, n_heads=2, ffn_dim=32))
    tokens = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        loss = model(tokens[:, :-1], tokens[:, 1:])
        logits = model(tokens[:, :-1])
    expected = -torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).mean()
    torch.testing.assert_close(loss, expected)


def test_tiny_is_in_named_sizes():
    assert "tiny" in NAMED_SIZES


def test_activation_checkpointing_recomputes_exactly():
    """Recomputing each block in backward gives the same loss and gradients bit for bit, and keeps fewer tensors
    alive between forward and backward (the autograd graph holds one block input per block, not all activations)."""
    from torch.autograd.graph import saved_tensors_hooks

    cfg = llama_config("tiny", vocab_size=64, dim=32, n_layers=3, n_heads=2, ffn_dim=48)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = Llama(cfg)
        model.activation_checkpointing = recompute
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], sum(saved)))
    (loss0, grads0, saved0), (loss1, grads1, saved1) = results
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert saved1 < saved0 / 2
    with torch.no_grad():  # evaluation runs the plain forward
        on = model(tokens[:, :-1])
        model.activation_checkpointing = False
        assert torch.equal(on, model(tokens[:, :-1]))
