"""The `galore` method against a GaLore reference written from docs/algorithms.md section 3 (not from the package)."""

import math

import torch

from lotus_dist.optim import METHODS, LowRankAdamW


class ReferenceGaLore:
    """GaLore Alg. 2 with its code's semantics, one matrix: svd projector on the short side, refreshed when the
    0-based step is a multiple of T; moments kept across refreshes; eps outside the sqrt; decay after the update."""

    def __init__(self, shape, rank, T, lr, scale, betas, eps, wd):
        self.m, self.n = shape
        self.r, self.T, self.lr, self.scale, self.betas, self.eps, self.wd = rank, T, lr, scale, betas, eps, wd
        self.P, self.M, self.V, self.t = None, None, None, 0

    def step(self, W, G):
        left = self.m < self.n
        if self.P is None or self.t % self.T == 0:
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            self.P = U[:, : self.r] if left else Vh[: self.r, :]
        R = self.P.T @ G if left else G @ self.P.T
        if self.M is None:
            self.M, self.V = torch.zeros_like(R), torch.zeros_like(R)
        self.t += 1
        b1, b2 = self.betas
        self.M = b1 * self.M + (1 - b1) * R
        self.V = b2 * self.V + (1 - b2) * R * R
        N = self.M / (self.V.sqrt() + self.eps)
        step_size = self.lr * math.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        W = W - step_size * self.scale * (self.P @ N if left else N @ self.P)
        return W - self.lr * self.wd * W


def _gradient(shape, t, seed):
    """A drifting gradient with a distinct geometric spectrum, so the svd is well conditioned at every refresh."""
    g = torch.Generator().manual_seed(seed * 100003 + t)
    m, n = shape
    k = min(m, n)
    base = torch.Generator().manual_seed(seed)
    U0 = torch.randn(m, k, generator=base)
    V0 = torch.randn(n, k, generator=base)
    U = torch.linalg.qr(U0 + 0.02 * t * torch.randn(m, k, generator=g) / math.sqrt(1 + t)).Q
    V = torch.linalg.qr(V0 + 0.02 * t * torch.randn(n, k, generator=g) / math.sqrt(1 + t)).Q
    s = 0.8 ** torch.arange(k, dtype=torch.float32)
    return (U * s) @ V.T


def test_galore_method_matches_reference_over_switches():
    shapes = [(48, 24), (24, 48), (32, 32)]  # right, left, square (right)
    rank, T, steps = 6, 25, 320
    lr, wd = 0.01, 0.01
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(0.1 * torch.randn(s)) for s in shapes]
    group = {"params": weights, "rank": rank, **METHODS["galore"], "update_gap": T}
    opt = LowRankAdamW([group], lr=lr, weight_decay=wd)
    assert group["scale"] == 0.25 and opt.defaults["eps"] == 1e-6
    refs = [ReferenceGaLore(s, rank, T, lr, 0.25, (0.9, 0.999), 1e-6, wd) for s in shapes]
    ref_w = [w.detach().clone() for w in weights]
    start = [w.detach().clone() for w in weights]
    worst = 0.0
    for t in range(steps):
        for i, (w, s) in enumerate(zip(weights, shapes)):
            G = _gradient(s, t, seed=i)
            w.grad = G.clone()
            ref_w[i] = refs[i].step(ref_w[i], G)
        opt.step()
        worst = max(worst, max(float((w.detach() - r).abs().max()) for w, r in zip(weights, ref_w)))
    print('max |W - W_ref| =', worst)
    assert worst < 1e-6, worst
    for w, ref in zip(weights, refs):
        st = opt.state[w]
        assert st["n_bases"] == math.ceil(steps / T)  # 13 bases: 12 switches
        assert torch.allclose(st["projector"], ref.P, atol=1e-6)
        assert torch.allclose(st["exp_avg"], ref.M, atol=1e-6)
        assert torch.allclose(st["exp_avg_sq"], ref.V, atol=1e-9)
    # the weights moved far more than the tolerance
    assert min(float((w.detach() - s).abs().max()) for w, s in zip(weights, start)) > 1e-2
