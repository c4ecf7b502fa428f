"""optim.projector_dtype=bf16: the projectors are stored in bf16 (half their bytes), each basis computed in fp32 and
rounded once when stored, and used upcast to the state dtype. Checked against bf16's rounding bound (drift from
orthonormality over a basis's lifetime, for each solver and over many grasswalk refreshes), against a hand-written
GaLore step on the rounded basis and the fp32-projector run (the update), against the memory formula, and through a
save/load; the solvers that cannot take a bf16 basis are refused in one line."""

from __future__ import annotations

import io

import pytest
import torch

from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import LowRankAdamW, build_optimizer
from lotus_dist.optim.methods import resolve_parts, route_parameters
from lotus_dist.optim.projfactor import ProjFactor
from lotus_dist.optim.reports import memory_report
from lotus_dist.optim.subspace import projected_dim, side_for
from lotus_dist.train.config import OptimConfig

U = 2.0**-8  # bf16's relative rounding per entry (round to nearest: 2^-9; the issue's bound 2^-8)
# P̃ = P + E with |E| <= U|P| entrywise: |(P̃ᵀP̃ - I)_ij| <= |(PᵀP - I)_ij| + 2U Σ_k |p_ki||p_kj| + U² <= 2U + U² + fp32
ORTHO_BOUND = 2 * U + U**2 + 1e-5


def basis(P: torch.Tensor) -> torch.Tensor:
    """S (d x r) of a stored projector, in fp64."""
    P = P.double()
    return P if P.shape[0] >= P.shape[1] else P.T


def ortho_error(P: torch.Tensor) -> float:
    S = basis(P)
    return (S.T @ S - torch.eye(S.shape[1], dtype=S.dtype)).abs().max().item()


def lifetime_drift(solver: str, dtype: str, steps: int, gap: int, shape=(256, 64), r=16, **extra) -> list[float]:
    """‖PᵀP − I‖max of the stored projector after every step: one refresh every ``gap`` steps."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape) * 0.1)
    opt = LowRankAdamW([{"params": [W], "rank": r}], lr=1e-3, solver=solver, switch="fixed", update_gap=gap,
                       projector_dtype=dtype, **extra)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        W.grad = torch.randn(shape, generator=g)
        opt.step()
        assert opt.state[W]["projector"].dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
        out.append(ortho_error(opt.state[W]["projector"]))
    return out


@pytest.mark.parametrize("solver", ["svd", "rsvd", "random"])
def test_a_bf16_basis_is_one_rounding_from_orthonormal_over_its_lifetime(solver):
    """A solver that computes its basis afresh: every stored basis is within bf16's rounding bound, and visibly
    rounded (the fp32 one is orthonormal to 1e-5)."""
    bf16 = lifetime_drift(solver, "bf16", 40, 4)
    fp32 = lifetime_drift(solver, "fp32", 40, 4)
    assert max(fp32) < 1e-5
    assert 1e-4 < max(bf16) <= ORTHO_BOUND, (solver, max(bf16))


def test_grasswalk_walks_from_the_stored_basis_without_accumulating_rounding():
    """grasswalk evolves the old basis: 200 refreshes, each walking from the stored bf16 basis. The walk starts from
    its QR (optim/subspace.py grasswalk_steps), so the drift stays one rounding; walking from the rounded basis as is
    grows it like √(refreshes) (0.02 here, past the bound)."""
    bf16 = lifetime_drift("grasswalk", "bf16", 400, 2, moments="rotate")
    fp32 = lifetime_drift("grasswalk", "fp32", 400, 2, moments="rotate")
    assert max(fp32) < 1e-5
    assert max(bf16) <= ORTHO_BOUND, max(bf16)
    assert max(bf16[-50:]) <= ORTHO_BOUND  # no growth towards the end


def test_solvers_that_cannot_take_a_bf16_basis_are_refused_naming_both_keys():
    W = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"^projector_dtype=bf16 does not fit solver=online_pca .*"
                                         r"use projector_dtype=fp32$"):
        LowRankAdamW([{"params": [W], "rank": 4}], solver="online_pca", projector_dtype="bf16")
    with pytest.raises(ValueError, match=r"^optim\.projector_dtype=bf16 does not fit optim\.solver=online_pca"):
        resolve_parts(OptimConfig(name="osd", projector_dtype="bf16"))
    with pytest.raises(ValueError, match=r"^projector_dtype=bf16 does not apply to projfactor"):
        ProjFactor([{"params": [W], "rank": 4}], projector_dtype="bf16")
    LowRankAdamW([{"params": [W], "rank": 4}], solver="online_pca")  # fp32, the default, as before


def _structured_gradients(shape, steps: int, seed: int = 3) -> list[torch.Tensor]:
    """A slowly turning low-rank signal plus noise: R has few entries near zero, as in training."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    A, B = torch.randn(m, 6, generator=g), torch.randn(6, n, generator=g)
    return [(A + 0.1 * t * torch.randn(m, 6, generator=g) / steps) @ B + 0.3 * torch.randn(m, n, generator=g)
            for t in range(steps)]


def _run(shape, dtype: str, grads, **extra):
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape) * 0.1)
    W0 = W.detach().clone()
    opt = LowRankAdamW([{"params": [W], "rank": 8}], lr=1e-2, betas=(0.9, 0.999), eps=1e-6, switch="fixed",
                       update_gap=10, projector_dtype=dtype, scale=0.25, **extra)
    bases = []
    for G in grads:
        W.grad = G.clone()
        opt.step()
        bases.append(opt.state[W]["projector"].clone())
    return W0, W.detach().clone(), bases


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])  # right and left projector
def test_the_bf16_update_is_the_fp32_update_of_the_rounded_basis(shape):
    """20 steps, two refreshes (svd): the bf16-projector run equals a hand-written GaLore step in fp64 on the stored
    (rounded) bases, and the weight change is within a few roundings of the fp32-projector run's."""
    grads = _structured_gradients(shape, 20)
    W0, W_bf16, bases = _run(shape, "bf16", grads, solver="svd")
    _, W_fp32, _ = _run(shape, "fp32", grads, solver="svd")
    assert all(b.dtype == torch.bfloat16 for b in bases)
    side = side_for(shape, "std")
    W, M, V = W0.double(), None, None
    for t, (G, P) in enumerate(zip(grads, bases), start=1):
        P = P.double()
        if (t - 1) % 10 == 0 and t > 1:
            assert not torch.equal(P, bases[t - 2].double())  # a refresh happened; moments kept (GaLore)
        R = P.T @ G.double() if side == "left" else G.double() @ P.T
        M = 0.1 * R if M is None else 0.9 * M + 0.1 * R
        V = 0.001 * R.square() if V is None else 0.999 * V + 0.001 * R.square()
        N = M / (V.sqrt() + 1e-6)
        step = 1e-2 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
        W = W - step * 0.25 * (P @ N if side == "left" else N @ P)
    dW_ref, dW = W - W0.double(), (W_bf16 - W0).double()
    assert (dW - dW_ref).norm() / dW_ref.norm() < 1e-5
    dW_fp32 = (W_fp32 - W0).double()
    rel = ((dW - dW_fp32).norm() / dW_fp32.norm()).item()
    assert 1e-4 < rel < 2 * U, rel  # the bases differ by one rounding (<= 2^-9 relative): R and P N each inherit it


def test_state_bytes_measured_equal_the_formula_and_the_projectors_halve():
    """memory_report on every tensor of a tiny LLaMA's Lotus state: the projectors are Σ d·r elements (section 10 of
    docs/algorithms.md) at 2 bytes in bf16, 4 in fp32; everything else is unchanged."""
    model = Llama(llama_config("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=32))
    projected, _ = route_parameters(model)
    r = 8
    elements = 0
    for _, p in projected:
        shape = tuple(p.shape)
        d = projected_dim(shape, side_for(shape, "std"))
        elements += d * min(r, d)
    reports = {}
    for dtype in ("fp32", "bf16"):
        opt = build_optimizer(model, OptimConfig(name="lotus", rank=r, projector_dtype=dtype))
        opt.init_state()
        reports[dtype] = memory_report(opt)
    assert reports["fp32"]["projectors"] == 4 * elements
    assert reports["bf16"]["projectors"] == 2 * elements
    for key in ("moments", "other"):
        assert reports["bf16"][key] == reports["fp32"][key]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_save_load_keeps_the_bf16_projector(param_dtype):
    """torch's load casts floating states to the parameter's dtype; the projector keeps the dtype it was saved in
    (bf16 parameters' other states: fp32), and the resumed steps equal the uninterrupted ones bit for bit."""
    shape = (48, 24)
    grads = _structured_gradients(shape, 12)

    def make():
        torch.manual_seed(0)
        W = torch.nn.Parameter((torch.randn(shape) * 0.1).to(param_dtype))
        return W, LowRankAdamW([{"params": [W], "rank": 4}], lr=1e-2, switch="fixed", update_gap=5,
                               projector_dtype="bf16")

    W, opt = make()
    for G in grads[:6]:
        W.grad = G.to(param_dtype)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    W2, opt2 = make()
    W2.data.copy_(W.data)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt2.state[W2]["projector"].dtype == torch.bfloat16
    assert opt2.state[W2]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[W2]["projector"], opt.state[W]["projector"])
    for G in grads[6:]:  # a refresh at step 11
        for p, o in ((W, opt), (W2, opt2)):
            p.grad = G.to(param_dtype)
            o.step()
    assert torch.equal(W, W2)
    assert opt2.state[W2]["projector"].dtype == torch.bfloat16
