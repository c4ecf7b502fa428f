"""Named methods, parameter routing, config errors, memory accounting, and a loss decrease per method."""

import math

import pytest
import torch

from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import (METHODS, LowRankAdamW, ProjFactor, build_optimizer, memory_report, route_parameters,
                              switch_report)
from lotus_dist.train.config import OptimConfig

SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=48)


def _small_model(seed=0):
    torch.manual_seed(seed)
    return Llama(llama_config("tiny", **SMALL))


def test_routing_projects_attention_and_mlp_weights_only():
    model = _small_model()
    opt = build_optimizer(model, OptimConfig(name="galore", rank=8))
    names = {id(p): n for n, p in model.named_parameters()}
    projected = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    expected = {f"layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    expected |= {f"layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    assert projected == expected
    assert "embed_tokens.weight" in plain and "lm_head.weight" in plain and "norm.weight" in plain
    assert opt.param_groups[0]["rank"] == 8 and "rank" not in opt.param_groups[1]
    g = opt.param_groups[0]
    assert (g["solver"], g["switch"], g["moments"], g["residual"], g["update_gap"]) == ("svd", "fixed", "keep", "none", 200)
    assert set(switch_report(opt)) == expected  # names from the model


def test_method_table_and_part_overrides():
    model = _small_model()
    lotus = build_optimizer(model, OptimConfig(name="lotus"))
    g = lotus.param_groups[0]
    assert (g["solver"], g["switch"], g["gamma"], g["verify_gap"], g["oversample"], g["power_iters"]) == (
        "rsvd", "displacement", None, 50, 8, 2)  # gamma None = the policy default 0.01
    ablation = build_optimizer(model, OptimConfig(name="lotus", solver="rsvd", switch="fixed", update_gap=100))
    assert (ablation.param_groups[0]["switch"], ablation.param_groups[0]["update_gap"]) == ("fixed", 100)
    assert isinstance(build_optimizer(model, OptimConfig(name="projfactor", rank=4)), ProjFactor)
    adamw = build_optimizer(model, OptimConfig(name="adamw"))
    assert isinstance(adamw, LowRankAdamW) and all("rank" not in g for g in adamw.param_groups)
    assert set(METHODS) == {"adamw", "galore", "lotus", "lotus_rho", "golore", "grassjump", "grasswalk", "osd",
                            "fira", "projfactor", "apollo", "apollo_mini"}


def test_config_errors_name_the_key():
    model = _small_model()
    with pytest.raises(ValueError, match=r"optim\.name.*'sgd'.*known: adamw, galore, lotus"):
        build_optimizer(model, OptimConfig(name="sgd"))
    with pytest.raises(ValueError, match=r"optim\.solver"):
        build_optimizer(model, OptimConfig(name="lotus", solver="qr"))
    with pytest.raises(ValueError, match=r"optim\.update_gap"):
        build_optimizer(model, OptimConfig(name="galore", update_gap=0))
    with pytest.raises(ValueError, match=r"optim\.rank"):
        build_optimizer(model, OptimConfig(name="galore", rank=0))
    with pytest.raises(ValueError, match=r"optim\.granularity"):
        build_optimizer(model, OptimConfig(name="projfactor", granularity=5))


def _formula(model, r, bytes_per=4):
    """Σ(2·long·r + short·r)·bytes over projected matrices + 2·(unprojected numel)·bytes; and the d_init bytes
    (long·r per matrix in bf16, optim.reference_dtype's default)."""
    total, d_init = 0, 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.split(".")[-2].endswith("_proj"):
            long, short = max(p.shape), min(p.shape)
            rr = min(r, short)
            total += (2 * long * rr + short * rr) * bytes_per
            d_init += long * rr * 2
        else:
            total += 2 * p.numel() * bytes_per
    return total, d_init


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_memory_report_equals_formula(device):
    cfg = llama_config("tiny", **SMALL)
    with torch.device(device):
        model = Llama(cfg)
    formula, d_init = _formula(model, 8)
    for name, extra in (("galore", 0), ("lotus", d_init), ("adamw", None)):
        opt = build_optimizer(model, OptimConfig(name=name, rank=8))
        opt.init_state()  # exactly the tensors the first step allocates
        mem = memory_report(opt)
        if name == "adamw":
            assert mem["total"] == mem["moments"] == 2 * 4 * sum(p.numel() for p in model.parameters())
        else:
            assert mem["moments"] + mem["projectors"] == formula
            assert mem["other"] == extra  # lotus: the displacement policy's d_init (long x r, bf16)
    if device == "cpu":  # a real step allocates the same
        opt = build_optimizer(model, OptimConfig(name="galore", rank=8))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        assert memory_report(opt)["total"] == formula


def test_apollo_state_is_galores_plus_one_scalar_and_mini_is_rank_one():
    """APOLLO holds GaLore's state at its rank plus the limiter's fp32 norm per matrix; APOLLO-Mini projects at rank 1
    whatever optim.rank says (its rank is part of the method)."""
    cfg = llama_config("tiny", **SMALL)
    with torch.device("meta"):
        model = Llama(cfg)
    n_matrices = len(route_parameters(model)[0])
    for name, r in (("apollo", 8), ("apollo_mini", 1)):
        opt = build_optimizer(model, OptimConfig(name=name, rank=8))
        assert opt.param_groups[0]["rank"] == r
        opt.init_state()
        mem = memory_report(opt)
        assert mem["moments"] + mem["projectors"] == _formula(model, r)[0]
        assert mem["other"] == 4 * n_matrices  # fira_norm, the norm-growth limiter's last norm


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_lowers_the_loss(name):
    torch.manual_seed(0)
    model = Llama(llama_config("tiny", vocab_size=256))
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(1))
    cfg = OptimConfig(name=name, rank=16, lr=0.01 if name != "adamw" else 3e-3, update_gap=10, verify_gap=10)
    opt = build_optimizer(model, cfg)
    losses = []
    for _ in range(30):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    if name not in ("adamw",):
        assert sum(switch_report(opt).values()) >= (0 if name in ("lotus", "lotus_rho") else 1)

def test_works_with_torch_lr_scheduler_and_zero_grad_init():
    model = _small_model()
    opt = build_optimizer(model, OptimConfig(name="osd", rank=4))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["initial_lr"] == 0.01 and opt.param_groups[0]["lr"] == 0.01 * 0.125
    # DCP-style initialisation: zero gradients with lr 0 allocate every state key, compute no projector
    fresh = build_optimizer(_small_model(), OptimConfig(name="lotus", rank=4))
    for g in fresh.param_groups:
        g["lr"] = 0.0
    for p in [q for g in fresh.param_groups for q in g["params"]]:
        p.grad = torch.zeros_like(p)
    fresh.step()
    keys = {k for st in fresh.state.values() for k in st}
    assert {"exp_avg", "exp_avg_sq", "projector", "d_init", "step", "n_bases"} <= keys
    assert sum(switch_report(fresh).values()) == 0
    assert all(st["n_bases"] == 0 for st in fresh.state.values() if "n_bases" in st)
