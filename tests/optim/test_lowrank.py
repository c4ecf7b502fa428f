"""LowRankAdamW: AdamW groups, moment policies, Fira residual, state round trip, zero gradients, host syncs."""

import copy
import io
import math

import pytest
import torch

from lotus_dist.optim import LowRankAdamW, memory_report, switch_report
from lotus_dist.optim import solver_rounds as sr
from lotus_dist.optim import subspace as ss
from lotus_dist.optim.subspace import Comm

BETAS, EPS = (0.9, 0.999), 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_plain_groups_match_torch_adamw(fused, monkeypatch):
    import lotus_dist.optim.adamw_step as adamw_step

    monkeypatch.setattr(adamw_step, "_FUSED_ADAMW", fused and adamw_step._FUSED_ADAMW)
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 4, 2)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=3e-3, betas=(0.85, 0.99), eps=1e-8, weight_decay=0.1)
    a = LowRankAdamW([{"params": ours[:2]}, {"params": ours[2:], "lr": 1e-2}], **kw)
    b = torch.optim.AdamW([{"params": theirs[:2]}, {"params": theirs[2:], "lr": 1e-2}], **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
        assert torch.allclose(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], atol=1e-7)


def _two_steps_around_switch(shape, moments, seed=0):
    """Run a `random`/fixed(T=2) optimizer for 2 steps; return (state before step 3, grads, state after)."""
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = LowRankAdamW(
        [{"params": [w], "rank": 3, "solver": "random", "switch": "fixed", "update_gap": 2, "moments": moments}]
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        w.grad = torch.randn(shape, generator=gen)
        opt.step()
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].items()}
    G = torch.randn(shape, generator=gen)
    w.grad = G
    opt.step()  # step 3: 0-based count 2 % 2 == 0 -> switch
    return before, G, opt.state[w]


@pytest.mark.parametrize("shape", [(10, 24), (24, 10)])
@pytest.mark.parametrize("moments", ["keep", "reset", "rotate", "rotate_subtrack"])
def test_moment_policies_match_formulas(shape, moments):
    before, G, after = _two_steps_around_switch(shape, moments)
    assert after["n_bases"] == before["n_bases"] + 1
    side = ss.side_for(shape, "std")
    old, new = before["projector"].double(), after["projector"].double()
    M, V = before["exp_avg"].double(), before["exp_avg_sq"].double()
    b1, b2 = BETAS
    if moments == "keep":
        M2, V2 = M, V
    elif moments == "reset":
        M2, V2 = torch.zeros_like(M), torch.zeros_like(V)
    elif moments == "rotate":  # LDAdam: V <- c2 |C²(V/c2 - M²/c1²) + (C M)²/c1²|, c1, c2 after s = 2 steps
        c1, c2 = 1 - b1**2, 1 - b2**2
        if side == "left":  # C = S_newᵀ S_old;  M <- C M
            C = new.T @ old
            M2, V2 = C @ M, c2 * (C**2 @ (V / c2 - M**2 / c1**2) + (C @ M) ** 2 / c1**2).abs()
        else:  # C = B_old B_newᵀ;  M <- M C
            C = old @ new.T
            M2, V2 = M @ C, c2 * ((V / c2 - M**2 / c1**2) @ C**2 + (M @ C) ** 2 / c1**2).abs()
    elif side == "left":  # rotate_subtrack: V <- (1-b2)|C²(V - M²) + (C M)²|
        C = new.T @ old
        M2, V2 = C @ M, (1 - b2) * (C**2 @ (V - M**2) + (C @ M) ** 2).abs()
    else:
        C = old @ new.T
        M2, V2 = M @ C, (1 - b2) * ((V - M**2) @ C**2 + (M @ C) ** 2).abs()
    R = ss.project(G.double(), new, side)
    assert torch.allclose(after["exp_avg"].double(), b1 * M2 + (1 - b1) * R, atol=1e-6)
    assert torch.allclose(after["exp_avg_sq"].double(), b2 * V2 + (1 - b2) * R * R, atol=1e-7)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_fira_residual_matches_formula(shape):
    side = ss.side_for(shape, "std")
    w = torch.nn.Parameter(torch.randn(shape))
    lr, scale = 0.01, 0.25
    opt = LowRankAdamW(
        [{"params": [w], "rank": 4, "solver": "svd", "switch": "fixed", "residual": "fira", "scale": scale}], lr=lr
    )
    gen = torch.Generator().manual_seed(5)
    prev_norm = None
    for t, amp in ((1, 1.0), (2, 10.0), (3, 0.1)):  # step 2 grows the residual 10x: the limiter acts
        G = amp * torch.randn(shape, generator=gen)
        W0 = w.detach().double().clone()
        w.grad = G
        opt.step()
        st = opt.state[w]
        P, M, V = (st[k].double() for k in ("projector", "exp_avg", "exp_avg_sq"))
        Gd = G.double()
        R = ss.project(Gd, P, side)
        N = M / (V.sqrt() + EPS)
        dim = 0 if side == "left" else 1  # column-wise phi for left (r x n states), row-wise for right
        phi = N.norm(dim=dim, keepdim=True) / (R.norm(dim=dim, keepdim=True) + 1e-8)
        lam = phi * (Gd - ss.project_back(R, P, side))
        if prev_norm is not None:
            lam = lam / (max(float(lam.norm()) / prev_norm, 1.01) / 1.01)
        prev_norm = float(lam.norm())
        step_size = lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)
        expected = W0 - step_size * (scale * ss.project_back(N, P, side) + lam)
        assert torch.allclose(w.detach().double(), expected, atol=1e-6), t
        assert abs(float(st["fira_norm"]) - prev_norm) < 1e-4 * prev_norm


# ----------------------------------------------------------------------------------------- state round trip

ROUND_TRIP = {
    "lotus": dict(solver="rsvd", switch="displacement", gamma=1.0, verify_gap=3),
    "galore": dict(solver="svd", switch="fixed", update_gap=4),
    "lotus_rho": dict(solver="rsvd", switch="path_efficiency", gamma=0.99, window=3, t_min=3),
    "grasswalk": dict(solver="grasswalk", switch="fixed", update_gap=4, moments="rotate", residual="fira"),
    "osd": dict(solver="online_pca", switch="every_step"),
}


def _make(kind, seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(0.1 * torch.randn(s)) for s in ((24, 10), (10, 24), (16, 16))]
    plain = [torch.nn.Parameter(torch.randn(7))]
    if kind == "projfactor":
        from lotus_dist.optim import ProjFactor

        opt = ProjFactor([{"params": params[:2], "rank": 4, "granularity": 2, "update_gap": 4}, {"params": plain}])
    else:
        groups = [{"params": params, "rank": 4, **ROUND_TRIP[kind]}, {"params": plain}]
        opt = LowRankAdamW(groups, lr=0.01, weight_decay=0.01)
    return params + plain, opt


def _steps(params, opt, start, stop):
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("kind", list(ROUND_TRIP) + ["projfactor"])
def test_state_dict_round_trip_is_bitwise(kind):
    k, total = 6, 14
    params, opt = _make(kind)
    _steps(params, opt, 0, total)

    params2, opt2 = _make(kind)
    _steps(params2, opt2, 0, k)
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in params2], "optim": opt2.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # tensors and primitives only
    switches_at_save = sum(switch_report(opt2).values())

    params3, opt3 = _make(kind, seed=123)  # a fresh optimizer on freshly initialised weights
    with torch.no_grad():
        for p, v in zip(params3, saved["model"]):
            p.copy_(v)
    opt3.load_state_dict(saved["optim"])
    _steps(params3, opt3, k, total)

    for p, q in zip(params, params3):
        assert torch.equal(p, q)
    for p, q in zip(params, params3):
        a, b = opt.state[p], opt3.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert sum(switch_report(opt3).values()) > switches_at_save  # the continuation crossed a switch


def test_zero_gradient_creates_no_projector():
    w = torch.nn.Parameter(torch.randn(12, 20))
    b = torch.nn.Parameter(torch.randn(5))
    opt = LowRankAdamW([{"params": [w], "rank": 4}, {"params": [b]}], weight_decay=0.1)
    w0 = w.detach().clone()
    w.grad = torch.zeros_like(w)
    b.grad = torch.zeros_like(b)
    opt.step()
    st = opt.state[w]
    assert st["n_bases"] == 0 and st["step"] == 0
    assert not st["projector"].any()  # allocated (DCP sees the full structure) but not computed
    assert torch.equal(w, w0)
    assert set(st) >= {"exp_avg", "exp_avg_sq", "projector", "d_init"}
    w.grad = torch.randn(12, 20)
    opt.step()
    assert st["n_bases"] == 1 and st["step"] == 1 and st["projector"].any()


class _CountingComm(Comm):
    def __init__(self):
        self.calls = 0

    def reduce_stats(self, t):
        self.calls += 1
        return t


def test_at_most_one_statistics_sync_per_step(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((20, 8), (8, 20), (12, 12), (9, 30))]
    opt = LowRankAdamW([{"params": params, "rank": 3, "verify_gap": 2, "gamma": 1e-9}])  # checks, never switches
    comm = _CountingComm()
    opt.stats_comm = comm
    syncs = {"n": 0}
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        syncs["n"] += 1
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    calls, host = [], []
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape)
        before, before_syncs = comm.calls, syncs["n"]
        opt.step()
        calls.append(comm.calls - before)
        host.append(syncs["n"] - before_syncs)
    # step 1: first-basis check (all 4 at once); then the displacement checks at tau = 2, 4, 6, ... (tau = 1 at
    # the basis step), all four matrices batched into one sync; no sync on the other steps
    assert calls == [1, 1, 0, 1, 0, 1, 0, 1]
    # and the host syncs: those, plus one for the four first bases together (their finiteness), none per matrix
    assert host == [2, 1, 0, 1, 0, 1, 0, 1]


def test_fixed_policy_needs_no_sync_after_init():
    w = torch.nn.Parameter(torch.randn(10, 20))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "switch": "fixed", "update_gap": 2}])
    comm = _CountingComm()
    opt.stats_comm = comm
    for _ in range(6):
        w.grad = torch.randn(10, 20)
        opt.step()
    assert comm.calls == 1


def test_refresh_seconds_and_reports():
    params, opt = _make("galore")
    _steps(params, opt, 0, 9)
    assert opt.refresh_seconds > 0
    rep = switch_report(opt)
    assert list(rep) == ["group0.param0", "group0.param1", "group0.param2"] and set(rep.values()) == {2}
    mem = memory_report(opt)
    assert mem["total"] == mem["moments"] + mem["projectors"] + mem["other"]


def test_rank_larger_than_short_side_is_clamped():
    w = torch.nn.Parameter(torch.randn(6, 20))
    opt = LowRankAdamW([{"params": [w], "rank": 64, "solver": "svd"}])
    w.grad = torch.randn(6, 20)
    opt.step()
    assert opt.state[w]["projector"].shape == (6, 6)


def test_bad_options_name_the_key():
    w = torch.nn.Parameter(torch.randn(6, 20))
    with pytest.raises(ValueError, match="solver"):
        LowRankAdamW([{"params": [w], "rank": 4, "solver": "qr"}])
    with pytest.raises(ValueError, match="verify_gap"):
        LowRankAdamW([{"params": [w], "rank": 4, "verify_gap": 0}])
    with pytest.raises(TypeError, match="unknown"):
        LowRankAdamW([w], colour="red")
    # a deep copy (e.g. for EMA / checkpoint helpers) keeps working
    copy.deepcopy(LowRankAdamW([{"params": [w], "rank": 4}]))


def test_bf16_resume_keeps_fp32_statistics():
    def make():
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, dtype=torch.bfloat16)) for s in ((24, 10), (10, 24))]
        group = {"params": ps, "rank": 4, **ROUND_TRIP["lotus_rho"], "residual": "fira"}
        return ps, LowRankAdamW([group])

    ps, opt = make()
    _steps(ps, opt, 0, 12)
    ps2, opt2 = make()
    _steps(ps2, opt2, 0, 5)
    buf = io.BytesIO()
    torch.save(opt2.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[ps2[0]]["pe_acc"].dtype == torch.float32
    assert opt2.state[ps2[0]]["fira_norm"].dtype == torch.float32
    assert opt2.state[ps2[0]]["exp_avg"].dtype == torch.float32  # moments too (tensors.state_dtype)
    _steps(ps2, opt2, 5, 12)
    for p, q in zip(ps, ps2):
        assert torch.equal(p, q)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_online_pca_projector_takes_one_adamw_step_per_step(shape):
    side = ss.side_for(shape, "std")
    T, lr = 50, 0.02
    w = torch.nn.Parameter(torch.randn(shape))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "solver": "online_pca", "switch": "every_step",
                         "update_gap": T}], lr=lr)
    gen = torch.Generator().manual_seed(9)
    G1, G2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w.grad = G1
    opt.step()
    P1 = opt.state[w]["projector"].clone()
    assert torch.equal(P1, sr.svd_projector(G1, side, 3))  # first basis: svd, no online step yet
    # reference: torch AdamW (lr = lr_t / lr_0 / T, wd 0.01) on L(P) = ‖P Pᵀ g − g‖² (left) / ‖g Pᵀ P − g‖² (right)
    P = torch.nn.Parameter(P1.clone())
    ref = torch.optim.AdamW([P], lr=1.0 / T, betas=BETAS, eps=EPS, weight_decay=0.01)
    g = G2 / G2.norm()
    loss = (P @ (P.T @ g) - g).square().sum() if side == "left" else ((g @ P.T) @ P - g).square().sum()
    loss.backward()
    ref.step()
    w.grad = G2
    opt.step()
    assert torch.allclose(opt.state[w]["projector"], P.detach(), atol=1e-6)
    assert switch_report(opt) == {"group0.param0": 1}


def test_projfactor_step_matches_formula():
    from lotus_dist.optim import ProjFactor
    from lotus_dist.optim.projfactor import SALT_PROJFACTOR

    m, n, c, r, lr = 6, 16, 2, 3, 0.01
    w = torch.nn.Parameter(torch.randn(m, n))
    opt = ProjFactor([{"params": [w], "rank": r, "granularity": c, "update_gap": 5, "seed": 3}], lr=lr)
    gen = torch.Generator().manual_seed(4)
    mt = torch.zeros(m * c, r, dtype=torch.float64)
    vr, vc = torch.zeros(m * c, dtype=torch.float64), torch.zeros(n // c, dtype=torch.float64)
    W = w.detach().double().clone()
    for t in range(1, 8):
        G = torch.randn(m, n, generator=gen)
        draw = (t - 1) // 5 + 1  # P̃ regenerated every T = 5 steps, from (seed, matrix index, draw count)
        Pt = torch.randn(n // c, r, generator=torch.Generator().manual_seed(
            ss.derive_seed(3, 0, draw, SALT_PROJFACTOR))).div(math.sqrt(r)).double()
        Gt = G.double().reshape(m * c, n // c) @ Pt
        mt = 0.9 * mt + 0.1 * Gt
        Gh = Gt @ Pt.T
        vr = 0.999 * vr + 0.001 * (Gh * Gh).sum(1)
        vc = 0.999 * vc + 0.001 * (Gh * Gh).sum(0)
        vhat = torch.outer(vr, vc) / vr.sum()
        delta = ((mt @ Pt.T) / (vhat + EPS).sqrt()).reshape(m, n)
        W = W - lr * math.sqrt(1 - 0.999**t) / (1 - 0.9**t) * delta
        w.grad = G
        opt.step()
        assert torch.allclose(w.detach().double(), W, atol=1e-5), t
    assert opt.state[w]["n_bases"] == 2


@pytest.mark.parametrize("moments, factor", [("rotate", 1.0), ("rotate_subtrack", 1 - BETAS[1])])
def test_rotating_into_the_same_basis_keeps_the_second_moment_only_in_ldadams_form(moments, factor):
    """A switch to the same subspace (C = I): LDAdam's rotate leaves V as it was (it is the gradient's second moment
    expressed in the new coordinates), SubTrack++'s form multiplies it by (1 - beta2), ~1000x too small."""
    w = torch.nn.Parameter(torch.zeros(20, 8))
    opt = LowRankAdamW([{"params": [w], "rank": 3, "solver": "svd", "switch": "fixed", "update_gap": 2,
                         "moments": moments}])
    G = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        w.grad = G.clone()
        opt.step()
    V = opt.state[w]["exp_avg_sq"].double().clone()
    M = opt.state[w]["exp_avg"].double().clone()
    w.grad = G.clone()
    opt.step()  # switches to the svd basis of the same G: the same projector
    R = ss.project(G.double(), opt.state[w]["projector"].double(), "right")
    b1, b2 = BETAS
    assert torch.allclose(opt.state[w]["exp_avg"].double(), b1 * M + (1 - b1) * R, atol=1e-6)
    assert torch.allclose(opt.state[w]["exp_avg_sq"].double(), b2 * factor * V + (1 - b2) * R * R, rtol=1e-4,
                          atol=1e-9)
