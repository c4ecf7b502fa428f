"""APOLLO / APOLLO-Mini (the ``apollo`` / ``apollo_mini`` methods and ``ApolloAdamW``): apollo-torch 1.0.3's numbers
for every parameter with the projection injected, and the Gaussian solver's draws."""

import math
import zlib

import pytest
import torch
from torch import nn

from hf_adamw_reference import hf_adam_direction
from lotus_dist.optim import METHODS, ApolloAdamW, LowRankAdamW, switch_report
from lotus_dist.optim.basis_solvers import compute_projector
from lotus_dist.optim.subspace import derive_seed


class ApolloTorchReference:
    """apollo-torch 1.0.3's ``AdamW`` (apollo_torch/apollo.py with random_projector.py), written here from its source
    and independent of lotus_dist, with its defaults scale_front=False and disable_nl=False, for groups of 2-D
    projected matrices and plain tensors. ``draw(p, side, shape, rank)`` gives the projection (injected: apollo-torch
    draws ``stable_randn(...) / sqrt(rank)`` from a per-parameter seed advanced by ``next_seed``).

    Per projected parameter, with ``step`` the count before the increment: the projection is (re)drawn when there is
    none or ``step % update_proj_gap == 0``; ``std``: right (r x n, R = G Pᵀ) when rows >= cols, else left (m x r,
    R = Pᵀ G). Moments are created once (R-shaped) and kept; N = M / (sqrt(V) + eps); step size
    lr·sqrt(1−β2^t)/(1−β1^t). ``norm_dim`` = 0 if rows < cols else 1; channel: φ = ‖N‖/(‖R‖ + 1e-8) along norm_dim
    (unsqueezed to a column when norm_dim = 1), tensor: φ = ‖N‖/(‖R‖ + 1e-8). U = G·φ; Fira's limiter: with the last
    limited norm stored, limiter = max(‖U‖/(stored + 1e-8), 1.01)/1.01, U /= limiter, stored = ‖U‖/limiter (the
    first step only stores ‖U‖); then U *= sqrt(scale); p −= step_size·U; then p −= lr·wd·p. Plain tensors: the same
    Adam with N in place of U (Hugging Face's AdamW).
    """

    def __init__(self, groups, draw, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        self.groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state, self.draw = {}, draw

    @torch.no_grad()
    def step(self):
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state.setdefault(id(p), {"step": 0, "draws": 0})
                if "rank" in group:
                    norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1
                    assert group["proj_type"] == "std"
                    side = "right" if grad.shape[0] >= grad.shape[1] else "left"
                    if "P" not in st or st["step"] % group["update_proj_gap"] == 0:
                        st["P"] = self.draw(p, side, tuple(grad.shape), group["rank"])
                        st["draws"] += 1
                    grad = grad @ st["P"].t() if side == "right" else st["P"].t() @ grad
                norm_grad, step_size = hf_adam_direction(st, grad, group)
                if "rank" in group:
                    if group["scale_type"] == "channel":
                        phi = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(grad, dim=norm_dim) + 1e-8)
                        if norm_dim == 1:
                            phi = phi.unsqueeze(1)
                    else:
                        phi = torch.norm(norm_grad) / (torch.norm(grad) + 1e-8)
                    scaled = p.grad * phi
                    if "scaled_grad" in st:
                        norm = torch.norm(scaled)
                        limiter = max(norm / (st["scaled_grad"] + 1e-8), 1.01) / 1.01
                        scaled = scaled / limiter
                        st["scaled_grad"] = norm / limiter
                    else:
                        st["scaled_grad"] = torch.norm(scaled)
                    norm_grad = scaled * math.sqrt(group["scale"])
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


# ------------------------------------------------------------------------------------------------- fixtures

SHAPES = {
    "up.weight": (24, 40),  # rows < cols: projected on the left, channels are columns
    "up.bias": (24,),
    "down.weight": (40, 24),  # rows >= cols: projected on the right, channels are rows
    "norm.weight": (24,),
    "mini.weight": (32, 48),  # tensor-wise (APOLLO-Mini), rank 1
    "mini2.weight": (48, 16),
    "head.weight": (16, 40),  # a plain 2-D matrix
}
PROJECTED = ("up.weight", "down.weight", "mini.weight", "mini2.weight")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (0.1 * torch.randn(s, generator=g, dtype=torch.float64)).float() for k, s in SHAPES.items()}


def _groups(t, gap):
    """apollo-torch's group format, as its README writes it."""
    return [
        {"params": [t["up.bias"], t["norm.weight"], t["head.weight"]]},
        {"params": [t["up.weight"], t["down.weight"]], "rank": 8, "proj": "random", "scale_type": "channel",
         "update_proj_gap": gap, "scale": 1.0, "proj_type": "std"},
        {"params": [t["mini.weight"], t["mini2.weight"]], "rank": 1, "proj": "random", "scale_type": "tensor",
         "update_proj_gap": gap, "scale": 128.0, "proj_type": "std"},
    ]


def _gradient(name, shape, t):
    """Deterministic: a slowly drifting low-rank direction plus fresh noise each step (channel norms differ)."""
    key = zlib.crc32(name.encode()) % 10007
    base, step = torch.Generator().manual_seed(key), torch.Generator().manual_seed(1000 * key + t)
    if len(shape) == 1:
        return (torch.randn(shape, generator=base) + 0.5 * torch.randn(shape, generator=step)).float()
    m, n = shape
    U = torch.randn(m, 3, generator=base, dtype=torch.float64)
    V = torch.randn(n, 3, generator=base, dtype=torch.float64)
    U = U + math.sin(0.05 * t) * torch.randn(m, 3, generator=base, dtype=torch.float64)
    rows = torch.rand(m, 1, generator=base, dtype=torch.float64) + 0.5
    return (rows * (U @ V.T / math.sqrt(n) + 0.3 * torch.randn(m, n, generator=step, dtype=torch.float64))).float()


def _run(opt_params, opt, steps, gap, **hyper):
    ref = _tensors()
    refresh_log = []

    def draw(p, side, shape, rank):  # the injected projection: the one our optimizer drew at this refresh
        name = next(k for k, v in ref.items() if v is p)
        st = opt.state[opt_params[name]]
        refresh_log.append((name, st["n_bases"]))
        return st["projector"].clone()

    reference = ApolloTorchReference(_groups(ref, gap), draw, **hyper)
    start = {k: v.detach().clone() for k, v in opt_params.items()}
    for t in range(steps):
        for k, shape in SHAPES.items():
            G = _gradient(k, shape, t)
            opt_params[k].grad, ref[k].grad = G.clone(), G.clone()
        opt.step()
        reference.step()
    rel = {k: float((opt_params[k].detach() - ref[k]).abs().max() / ref[k].abs().max()) for k in SHAPES}
    moved = {k: float((opt_params[k].detach() - start[k]).abs().max() / start[k].abs().max()) for k in SHAPES}
    return reference, ref, rel, moved, refresh_log


@pytest.mark.parametrize("correct_bias", [True, False])
def test_apollo_adamw_matches_apollo_torch_for_every_parameter(correct_bias):
    """fp32, 200 steps, 4 projection refreshes (T = 50), channel (rank 8) and tensor (Mini: rank 1, scale 128)
    scaling, weight decay: the max relative weight difference is fp32 rounding, the weights move by far more."""
    steps, gap = 200, 50
    params = {k: nn.Parameter(v) for k, v in _tensors().items()}
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05, correct_bias=correct_bias)
    opt = ApolloAdamW(_groups(params, gap), **hyper)
    reference, ref, rel, moved, log = _run(params, opt, steps, gap, **hyper)
    print("max relative |ours - apollo-torch| per parameter:", {k: f"{d:.1e}" for k, d in rel.items()})
    assert max(rel.values()) <= 1e-5, rel
    assert min(moved.values()) > 1e-2, moved
    for k in PROJECTED:  # both refreshed at steps 0, 50, 100, 150; ours had just drawn the basis it handed over
        assert [n for name, n in log if name == k] == [1, 2, 3, 4]
        assert reference.state[id(ref[k])]["draws"] == opt.state[params[k]]["n_bases"] == steps // gap
        st, rs = opt.state[params[k]], reference.state[id(ref[k])]
        assert torch.allclose(st["exp_avg"], rs["exp_avg"], rtol=1e-4, atol=1e-7)
        assert float(st["fira_norm"]) == pytest.approx(float(rs["scaled_grad"]), rel=1e-4)
    assert sum(switch_report(opt).values()) == 3 * len(PROJECTED)
    assert opt.state[params["up.weight"]]["exp_avg"].shape == (8, 40)
    assert opt.state[params["down.weight"]]["exp_avg"].shape == (40, 8)
    assert opt.state[params["mini.weight"]]["exp_avg"].shape == (1, 48)


def test_apollo_methods_match_apollo_torch_on_the_projected_matrices():
    """``optim.name=apollo`` / ``apollo_mini``'s groups (LowRankAdamW, the pretrain path): the same numbers on the
    projected matrices (its plain tensors take torch.optim.AdamW's form instead, as for every method)."""
    steps, gap = 200, 50
    params = {k: nn.Parameter(v) for k, v in _tensors().items()}
    groups = _groups(params, gap)
    groups[1] = {"params": groups[1]["params"], "rank": 8, **METHODS["apollo"], "update_gap": gap}
    groups[2] = {"params": groups[2]["params"], "rank": 1, **METHODS["apollo_mini"], "update_gap": gap}
    opt = LowRankAdamW(groups, lr=0.01, weight_decay=0.05)
    _, _, rel, moved, _ = _run(params, opt, steps, gap, lr=0.01, weight_decay=0.05)
    print("LowRankAdamW(apollo) vs apollo-torch:", {k: f"{d:.1e}" for k, d in rel.items()})
    assert max(rel[k] for k in PROJECTED) <= 1e-5, rel
    assert min(moved[k] for k in PROJECTED) > 1e-2, moved


def test_apollo_rows_are_apollo_torchs_defaults():
    apollo, mini = METHODS["apollo"], METHODS["apollo_mini"]
    for row in (apollo, mini):
        assert (row["solver"], row["switch"], row["moments"], row["update_gap"], row["proj_type"]) == (
            "gaussian", "fixed", "keep", 200, "std")
    assert (apollo["residual"], apollo["scale"]) == ("apollo_channel", 1.0)
    assert (mini["residual"], mini["scale"]) == ("apollo_tensor", 128.0)


# ------------------------------------------------------------------------------------------- the solver


def test_gaussian_solver_draws_the_same_basis_for_the_same_seed_index_and_count():
    G = torch.randn(64, 40)

    def draw(index, count, side="left", r=8):
        gen = torch.Generator().manual_seed(derive_seed(3, index, count, 0x42))
        return compute_projector("gaussian", G, side, r, gen=gen)

    assert torch.equal(draw(2, 5), draw(2, 5))
    assert not torch.equal(draw(2, 5), draw(2, 6)) and not torch.equal(draw(2, 5), draw(3, 5))
    assert draw(2, 5).shape == (64, 8) and draw(2, 5, side="right").shape == (8, 40)


def test_gaussian_solver_has_n0_1_over_r_entries_and_is_not_orthonormal():
    r, d = 16, 4096
    gen = torch.Generator().manual_seed(0)
    P = compute_projector("gaussian", torch.zeros(d, 64), "left", r, gen=gen)  # d x r; the gradient is not read
    x = P.double().flatten()
    n = x.numel()
    assert abs(float(x.mean())) < 4 / math.sqrt(r * n)  # 4 standard errors of the mean
    assert float(x.var()) == pytest.approx(1 / r, rel=4 * math.sqrt(2 / n))
    kurt = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert kurt == pytest.approx(3.0, abs=0.1)  # Gaussian tails
    gram = P.T @ P  # columns of squared norm d/r, not 1: no QR
    assert float(gram.diagonal().mean()) == pytest.approx(d / r, rel=0.02)


# ------------------------------------------------------------------------------------------- the drop-in


def test_apollo_adamw_trains_a_tiny_model_and_validates_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
    X, Y = torch.randn(128, 32), torch.randn(128, 16)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    opt = ApolloAdamW([{"params": others}, {"params": matrices, "rank": 4, "proj": "random", "scale_type": "channel",
                                            "update_proj_gap": 20, "scale": 1.0, "proj_type": "std"}], lr=0.01)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(s == 2 for s in switch_report(opt).values())  # bases at steps 0, 20, 40
    w = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="proj"):
        ApolloAdamW([{"params": [w], "rank": 2, "proj": "svd"}])
    with pytest.raises(ValueError, match="scale_type"):
        ApolloAdamW([{"params": [w], "rank": 2, "scale_type": "row"}])
    with pytest.raises(ValueError, match="scale_front"):
        ApolloAdamW([{"params": [w], "rank": 2}], scale_front=True)
    group = ApolloAdamW([{"params": [w], "rank": 2, "scale_type": "tensor"}]).param_groups[0]
    assert (group["solver"], group["residual"], group["update_gap"], group["scale"]) == (
        "gaussian", "apollo_tensor", 200, 1.0)
