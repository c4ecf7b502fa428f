"""A failing basis solve (degenerate gradient) never puts NaN into a projector or the low-rank state."""

import pytest
import torch

import lotus_dist.optim.refresh as refresh
from lotus_dist.optim import LowRankAdamW, solver_fallback_report


def _step(opt, W, G):
    W.grad = G.clone()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("failure", ["nan", "linalg"])
def test_failed_solve_keeps_the_basis_and_is_counted(monkeypatch, failure):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(32, 16))
    opt = LowRankAdamW([{"params": [W], "rank": 4, "solver": "svd", "switch": "fixed", "update_gap": 2}], lr=0.01)
    _step(opt, W, torch.randn(32, 16))  # first basis, a real one
    before = opt.state[W]["projector"].clone()
    real = refresh.projector_steps

    def broken(solver, G, *args, **kwargs):  # a solver generator (refresh._refresh runs them batched)
        if failure == "linalg":
            raise torch.linalg.LinAlgError("svd did not converge")
        P = yield from real(solver, G, *args, **kwargs)
        return torch.full_like(P, float("nan"))

    monkeypatch.setattr(refresh, "projector_steps", broken)
    for _ in range(3):  # crosses a scheduled switch (update_gap 2)
        _step(opt, W, torch.randn(32, 16))
    st = opt.state[W]
    assert torch.equal(st["projector"], before), "the previous basis is kept"
    assert solver_fallback_report(opt) >= 1 and st["solver_fallbacks"] >= 1
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.isfinite(st[key]).all()
    assert torch.isfinite(W).all()


def test_failed_first_solve_starts_from_a_random_orthonormal_basis(monkeypatch):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 32))
    opt = LowRankAdamW([{"params": [W], "rank": 4, "solver": "rsvd"}], lr=0.01)
    def nan_basis(solver, G, *args, **kwargs):  # every solve fails; the random fallback does not use this path
        return G.new_full((16, 4), float("nan"))
        yield

    monkeypatch.setattr(refresh, "projector_steps", nan_basis)
    _step(opt, W, torch.randn(16, 32))
    A = opt.state[W]["projector"]  # m < n: a left projector, m x r
    assert torch.isfinite(A).all() and opt.state[W]["solver_fallbacks"] == 1
    torch.testing.assert_close(A.T @ A, torch.eye(4), atol=1e-5, rtol=0)
