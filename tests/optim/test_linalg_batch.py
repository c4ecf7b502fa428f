"""A refresh decomposes a batch's same-shaped small matrices in one call per stage (issue 25): on CUDA each linalg
call is a host sync, so the count must follow the distinct shapes, not the matrices; the bases stay bit for bit
those of solving one matrix at a time (the seeds and arithmetic of earlier releases: resume depends on it)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lotus_dist.optim import LowRankAdamW
from lotus_dist.optim import basis_solvers as bs
from lotus_dist.optim import linalg_batch as lb
from lotus_dist.optim import solver_rounds as sr
from lotus_dist.optim import subspace as ss

DECOMPOSITIONS = {"linalg_qr": "qr", "_linalg_eigh": "eigh", "_linalg_svd": "svd", "linalg_cholesky_ex": "cholesky"}


class CountLinalg(TorchDispatchMode):
    """Counts the aten decompositions that reach the backend (where CUDA checks their info on the host)."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = DECOMPOSITIONS.get(func.overloadpacket.__name__)
        if name:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# 8 matrices, 3 shapes; every one's projected side d is 40 or 64 (two shapes of d x k sketches), k = r + p = 14
SHAPES = [(40, 130), (130, 40), (64, 64), (40, 130), (130, 40), (64, 64), (64, 64), (40, 130)]
POWER_ITERS = 2


def _grad(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    return (U * torch.logspace(0, -3, min(m, n))) @ V.T + 1e-3 * torch.randn(m, n, generator=g)


def _first_step(solver: str) -> tuple[list[torch.Tensor], Counter]:
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = LowRankAdamW([{"params": params, "rank": 6, "solver": solver, "power_iters": POWER_ITERS}], lr=0.01)
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, i)
    with CountLinalg() as mode:
        opt.step()  # every matrix's first basis: one refresh batch of all 8
    return [opt.state[p]["projector"].clone() for p in params], mode.calls


@pytest.mark.parametrize("solver, expected", [
    ("rsvd", {"qr": (1 + POWER_ITERS) * 2, "eigh": 1}),  # per stage: one QR per d (40, 64), one eigh (14 x 14)
    ("svd", {"svd": 3}),  # one per matrix shape
    ("random", {"qr": 2}),  # one per d
])
def test_one_linalg_call_per_stage_and_shape_not_per_matrix(solver, expected):
    bases, calls = _first_step(solver)
    assert dict(calls) == expected, calls  # one matrix at a time: 8x as many (rsvd: 24 QRs and 8 eighs)
    # and the bases are those each matrix gets alone
    for i, (shape, P) in enumerate(zip(SHAPES, bases)):
        p = torch.nn.Parameter(torch.zeros(shape))
        opt = LowRankAdamW([{"params": [p], "rank": 6, "solver": solver, "power_iters": POWER_ITERS}], lr=0.01)
        opt._indices = {id(p): i}  # the same matrix index (seed) as in the batch
        p.grad = _grad(shape, i)
        opt.step()
        assert torch.equal(opt.state[p]["projector"], P), (solver, i)


def test_batched_solvers_equal_each_alone_bit_for_bit():
    """run_batched over several same-shaped matrices per solver against each solver alone (a lone matrix is
    decomposed as in earlier releases, unstacked)."""
    mats = [_grad(s, 10 + i) for i, s in enumerate(SHAPES)]
    prevs = [bs.compute_projector("random", G, ss.side_for(tuple(G.shape), "std"), 6,
                                  gen=torch.Generator().manual_seed(50 + i)) for i, G in enumerate(mats)]
    # linalg calls of the whole batch: rsvd 3 QR stages x 2 values of d + 1 eigh; svd one per matrix shape; random
    # and grasswalk (its first basis is random's; later ones an svd of the d x r tangent) one per d
    for solver, calls in {"rsvd": 7, "svd": 3, "random": 2, "grasswalk": 2, "online_pca": 3}.items():
        def steps(i, G):
            return bs.projector_steps(solver, G, ss.side_for(tuple(G.shape), "std"), 6, prev=prevs[i],
                                      gen=torch.Generator().manual_seed(i))
        together = sr.run_batched([steps(i, G) for i, G in enumerate(mats)])
        alone = [sr.run_batched([steps(i, G)])[0] for i, G in enumerate(mats)]
        with CountLinalg() as mode:
            sr.run_batched([steps(i, G) for i, G in enumerate(mats)])
        assert sum(mode.calls.values()) == calls, (solver, mode.calls)  # not one per matrix (8)
        assert all(torch.equal(a, b) for a, b in zip(alone, together)), solver


def test_a_failing_matrix_fails_alone():
    good = [_grad((40, 130), i) for i in range(3)]
    bad = good[1].clone()
    bad[0, 0] = float("nan")
    out = lb.run_stacked("svd", [good[0], bad, good[2]])
    assert isinstance(out[1], torch.linalg.LinAlgError)
    for o, G in zip((out[0], out[2]), (good[0], good[2])):
        assert all(torch.equal(a, b) for a, b in zip(o, torch.linalg.svd(G, full_matrices=False)))
    # inside a solver the error is raised where the call is, and run_batched hands it back for that matrix only
    res = sr.run_batched([bs.projector_steps("svd", G, "left", 4, gen=torch.Generator()) for G in (good[0], bad)])
    assert isinstance(res[1], torch.linalg.LinAlgError) and torch.equal(res[0], sr.svd_projector(good[0], "left", 4))


def test_precision_rule_by_device(monkeypatch):
    assert lb.linalg_dtype("cpu") == torch.float64
    assert lb.linalg_dtype("mps") == torch.float32
    lb._cuda_full_rate_fp64.cache_clear()
    capability = {}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    for cc, want in [((8, 0), torch.float64), ((9, 0), torch.float64), ((8, 9), torch.float32),
                     ((8, 6), torch.float32), ((7, 5), torch.float32)]:
        capability[len(capability)] = cc  # a new device index: the rule is cached per device
        assert lb.linalg_dtype(torch.device("cuda", len(capability) - 1)) == want, cc
    lb._cuda_full_rate_fp64.cache_clear()
    x64 = torch.zeros(2, dtype=torch.float64)
    assert lb.solve_dtype(x64) == torch.float64 and lb.solve_dtype(x64.float()) == torch.float64  # CPU
