"""Side rule, projections and basis solvers against direct linear algebra."""

import threading

import pytest
import torch

from lotus_dist.optim import basis_solvers as bs
from lotus_dist.optim import solver_rounds as sr
from lotus_dist.optim import subspace as ss


def test_side_rule():
    assert ss.side_for((64, 32), "std") == "right"
    assert ss.side_for((32, 32), "std") == "right"
    assert ss.side_for((32, 64), "std") == "left"
    assert ss.side_for((64, 32), "reverse_std") == "left"
    assert ss.side_for((32, 64), "left") == "left"
    assert ss.side_for((32, 64), "right") == "right"
    with pytest.raises(ValueError, match="proj_type"):
        ss.side_for((3, 4), "diagonal")
    # states on the long side, projector on the short side
    assert ss.lowrank_shape((64, 32), "right", 8) == (64, 8)
    assert ss.projector_shape((64, 32), "right", 8) == (8, 32)
    assert ss.lowrank_shape((32, 64), "left", 8) == (8, 64)
    assert ss.projector_shape((32, 64), "left", 8) == (32, 8)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_svd_solver_equals_torch_svd_top_r(shape, decaying_matrix):
    G = decaying_matrix(*shape, seed=1)
    side = ss.side_for(shape, "std")
    P = sr.svd_projector(G, side, 6)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    expected = U[:, :6] if side == "left" else Vh[:6]
    assert torch.equal(P, expected)
    R = ss.project(G, P, side)
    assert torch.allclose(R, P.T @ G if side == "left" else G @ P.T)
    assert torch.allclose(ss.project_back(R, P, side), P @ R if side == "left" else R @ P)
    W = torch.zeros(shape)
    ss.add_project_back_(W, R, P, side, alpha=-0.5)
    assert torch.allclose(W, -0.5 * ss.project_back(R, P, side), atol=1e-7)


def _residual(G, S):
    return float((G - S @ (S.T @ G)).norm() / G.norm())


@pytest.mark.parametrize("shape", [(96, 300), (300, 96)])
def test_rsvd_captures_top_subspace(shape, decaying_matrix, principal_sines):
    r = 10
    G = decaying_matrix(*shape, seed=2, decay=0.8)
    side = ss.side_for(shape, "std")
    Gs = ss.oriented(G, side)
    gen = torch.Generator().manual_seed(0)
    S = bs.rsvd_columns(Gs, r, oversample=8, power_iters=2, gen=gen)
    assert torch.allclose(S.T @ S, torch.eye(r), atol=1e-5)
    U = torch.linalg.svd(Gs.double(), full_matrices=False).U[:, :r].float()
    # Bound: residual within 1% of the optimal rank-r residual (Eckart-Young), largest principal angle < 0.02 rad.
    assert _residual(Gs, S) <= 1.01 * _residual(Gs, U)
    assert principal_sines(S, U).max() < 0.02
    # the stored projector of the same draw projects the same subspace
    P = bs.compute_projector("rsvd", G, side, r, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(ss.columns(P, side), S)


def test_rsvd_deterministic_per_seed(decaying_matrix):
    G = decaying_matrix(50, 70, seed=3)
    a = bs.rsvd_columns(G, 5, 8, 2, torch.Generator().manual_seed(7))
    b = bs.rsvd_columns(G, 5, 8, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert ss.derive_seed(0, 1, 2) != ss.derive_seed(0, 2, 1) != ss.derive_seed(1, 1, 2)


class _ThreadShards(ss.Comm):
    """In-process stand-in for an all-reduce over long-side shards: each thread is one 'rank'."""

    def __init__(self, rank, world, shared, barrier, long_len):
        self.rank, self.world, self.shared, self.barrier, self.long_len = rank, world, shared, barrier, long_len

    def reduce(self, t):
        self.shared[self.rank] = t
        self.barrier.wait()
        total = sum(self.shared[i] for i in range(self.world))
        self.barrier.wait()
        return total

    def sketch(self, gen, rows, cols, device):
        full = torch.randn(self.long_len, cols, generator=gen, device=device)
        bounds = torch.tensor_split(torch.arange(self.long_len), self.world)[self.rank]
        return full[bounds[0] : bounds[-1] + 1]


def test_rsvd_sketch_form_is_shardable(decaying_matrix):
    """The sketch form run on 2 long-side shards with a summing reduce gives the unsharded basis."""
    G = decaying_matrix(40, 130, seed=4)  # left projector, long side = columns
    full = bs.rsvd_columns(G, 6, 8, 2, torch.Generator().manual_seed(5))
    world, shared, barrier = 2, {}, threading.Barrier(2)
    shards = torch.tensor_split(G, world, dim=1)
    out = {}

    def run(rank):
        comm = _ThreadShards(rank, world, shared, barrier, G.shape[1])
        out[rank] = bs.rsvd_columns(shards[rank], 6, 8, 2, torch.Generator().manual_seed(5), comm)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(out[0], out[1])  # identical on every rank
    assert torch.allclose(out[0] @ out[0].T, full @ full.T, atol=1e-5)  # same subspace up to float order


def test_random_basis_orthonormal():
    S = bs.random_columns(30, 7, torch.Generator().manual_seed(0), "cpu")
    assert S.shape == (30, 7)
    assert torch.allclose(S.T @ S, torch.eye(7), atol=1e-5)


@pytest.mark.parametrize("eta", [0.05, 0.3])
def test_grasswalk_orthonormal_and_geodesic_step(eta, principal_sines):
    S = bs.random_columns(40, 6, torch.Generator().manual_seed(1), "cpu")
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        new = bs.grasswalk_columns(S, eta, gen)
        assert torch.allclose(new.T @ new, torch.eye(6), atol=1e-5)
        # principal angles between the bases are eta * sigma(H) with ‖H‖_F = 1: their 2-norm is eta
        angles = torch.asin(principal_sines(S, new).clamp(max=1.0))
        assert abs(float(angles.norm()) - eta) < 2e-3
        S = new


def test_online_pca_grad_matches_autograd():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(20, 35, generator=g, dtype=torch.float64)
    S = torch.randn(20, 4, generator=g, dtype=torch.float64, requires_grad=True)
    gn = G / G.norm()
    loss = (S @ (S.T @ gn) - gn).square().sum()
    (expected,) = torch.autograd.grad(loss, S)
    got = bs.online_pca_grad(S.detach().float(), G.float())
    assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_batched_solvers_equal_each_solver_alone(decaying_matrix):
    """run_batched (the optimizer's refresh of every switching matrix together) gives, in one process, exactly the
    bases each solver gives alone: same seeds, same draws, same arithmetic."""
    mats = [decaying_matrix(40, 130, seed=1), decaying_matrix(130, 40, seed=2), decaying_matrix(64, 64, seed=3)]
    kinds = [("rsvd", "left"), ("rsvd", "right"), ("svd", "right")]
    alone = [bs.compute_projector(solver, G, side, 6, gen=torch.Generator().manual_seed(i))
             for i, (G, (solver, side)) in enumerate(zip(mats, kinds))]
    together = sr.run_batched([bs.projector_steps(solver, G, side, 6, gen=torch.Generator().manual_seed(i))
                               for i, (G, (solver, side)) in enumerate(zip(mats, kinds))])
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
