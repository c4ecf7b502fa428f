"""Optimizer state is fp32 whatever the parameter dtype (docs/algorithms.md): a bf16 model's moments, projectors
and statistics are fp32 (``d_init`` follows ``reference_dtype``), its projectors stay orthonormal, V keeps growing
where bf16 moments stall, and a save/load round-trip keeps them fp32."""

import io

import pytest
import torch

from lotus_dist.optim import GaLoreAdamW, LotusAdamW, LowRankAdamW

SHAPES = [(48, 32), (24, 40)]  # one right- and one left-projected matrix
STEPS, GAP, BETA2 = 40, 25, 0.999


def make(kind: str, dtype: torch.dtype, **extra):
    torch.manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.1) for s in SHAPES]
    return build(kind, mats, torch.nn.Parameter(torch.zeros(16, dtype=dtype)), **extra)


def build(kind: str, mats, bias, **extra):
    groups = [{"params": [bias]}, {"params": mats, "rank": 4}]
    common = dict(lr=1e-6, betas=(0.9, BETA2), weight_decay=0.0)  # tiny updates: the gradients drive the moments
    if kind == "galore":
        groups[1]["update_proj_gap"] = GAP
        return GaLoreAdamW(groups, **common), mats + [bias]
    if kind == "lotus":
        return LotusAdamW(groups, **common, verify_gap=GAP, gamma=1.0, **extra), mats + [bias]  # switches at checks
    return LowRankAdamW(groups, **common, switch="fixed", update_gap=GAP, **extra), mats + [bias]


def gradients(step: int, params) -> list[torch.Tensor]:
    """The same gradients (bf16-representable values) for every dtype; a constant part so V converges."""
    g = torch.Generator().manual_seed(step)
    return [(1.0 + 0.05 * torch.randn(p.shape, generator=g)).bfloat16() for p in params]


def run(opt, params, steps=STEPS):
    for step in range(steps):
        for p, g in zip(params, gradients(step, params)):
            p.grad = g.to(p.dtype)
        opt.step()
    return opt, params


def states(opt, params):
    return [(i, k, v) for i, p in enumerate(params) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("kind", ["galore", "lotus", "lowrank"])
def test_bf16_parameters_keep_fp32_state_orthonormal_projectors_and_growing_moments(kind):
    opt, params = run(*make(kind, torch.bfloat16))
    keys = set()
    for i, key, v in states(opt, params):
        keys.add(key)
        want = torch.bfloat16 if key == "d_init" else torch.float32  # d_init: optim.reference_dtype (bf16)
        assert v.dtype == want, (kind, i, key, v.dtype)
    assert {"exp_avg", "exp_avg_sq", "projector"} <= keys
    for p in params[:2]:  # a refresh happened at step GAP: the new basis is orthonormal in fp32
        st = opt.state[p]
        S = st["projector"] if st["projector"].shape[0] > st["projector"].shape[1] else st["projector"].T
        assert (S.T @ S - torch.eye(S.shape[1])).abs().max() < 1e-5, kind
    # against the same optimizer on fp32 parameters fed the same gradients: the moments agree (bf16 ones would
    # stall: V moves by 1e-3 of itself a step, below bf16's resolution)
    ref, ref_params = run(*make(kind, torch.float32))
    for (i, key, v), (_, _, r) in zip(states(opt, params), states(ref, ref_params)):
        if key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(v, r, rtol=1e-4, atol=1e-9, msg=f"{kind} {i} {key}")
    V = opt.state[params[2]]["exp_avg_sq"]  # the plain bias: V_t = (1 - β2^t) E[g²] ≈ 0.039 at t = 40
    assert V.min() > 0.9 * (1 - BETA2**STEPS)


@pytest.mark.parametrize("kind, extra", [("lotus", {}), ("lotus", {"reference_dtype": "fp32"}),
                                         ("lotus", {"reference_dtype": "int4"}), ("galore", {})])
def test_save_load_keeps_fp32_state_of_bf16_parameters(kind, extra):
    opt, params = run(*make(kind, torch.bfloat16, **extra), steps=GAP + 2)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = build(kind, params[:2], params[2], **extra)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    saved, loaded = states(opt, params), states(fresh, params)
    assert [(i, k) for i, k, _ in saved] == [(i, k) for i, k, _ in loaded]
    for (i, key, v), (_, _, w) in zip(saved, loaded):
        assert w.dtype == v.dtype, (i, key, v.dtype, w.dtype)
        assert torch.equal(v, w), (i, key)
    d_init = [w for _, k, w in loaded if k == "d_init"]
    assert all(d.dtype == (torch.float32 if extra else torch.bfloat16) for d in d_init)
    codes = [w for _, k, w in loaded if k == "d_codes"]  # int4: uint8 codes, not cast to the parameter's dtype
    assert all(c.dtype == torch.uint8 for c in codes) and bool(codes) == (extra.get("reference_dtype") == "int4")


def test_fp32_parameters_still_take_the_fused_kernel_bit_for_bit():
    """The plain AdamW path of fp32 parameters is torch's fused kernel, as before: torch.optim.AdamW's numbers."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    q = torch.nn.Parameter(p.detach().clone())
    ours = LowRankAdamW([p], lr=1e-2, weight_decay=0.1)
    theirs = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1, eps=1e-6, fused=True)
    for step in range(5):
        g = gradients(step, [p])[0].float()
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(p, q)


def test_projfactor_state_of_bf16_parameters_is_fp32_and_follows_fp32_parameters():
    from lotus_dist.optim.projfactor import ProjFactor

    def make_pf(dtype):
        torch.manual_seed(0)
        mats = [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.1) for s in SHAPES]
        return ProjFactor([{"params": mats, "rank": 4}], lr=1e-6, betas=(0.9, BETA2), update_gap=GAP), mats

    opt, params = run(*make_pf(torch.bfloat16))
    ref, ref_params = run(*make_pf(torch.float32))
    for (i, key, v), (_, _, r) in zip(states(opt, params), states(ref, ref_params)):
        assert v.dtype == torch.float32, (i, key, v.dtype)
        torch.testing.assert_close(v, r, rtol=1e-4, atol=1e-9, msg=f"{i} {key}")
