"""optim.projector_dtype=bf16 | int8: the projectors are stored in bf16 (half their bytes) or as int8 codes with one
fp32 scale per stored row (optim/projector_codes.py), each basis computed in fp32 and rounded once when stored, and
used upcast or decoded to the state dtype. Checked against each format's rounding bound (drift from orthonormality
over a basis's lifetime, for each solver and over many grasswalk refreshes; int8 entry by entry against the fp32
run's basis), against a hand-written GaLore step on the rounded basis and the fp32-projector run (the update),
against the memory formula, and through a save/load; the solvers that cannot take a rounded basis are refused in
one line."""

from __future__ import annotations

import io

import pytest
import torch

from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import LowRankAdamW, build_optimizer
from lotus_dist.optim.projector_codes import decode
from lotus_dist.optim.methods import resolve_parts, route_parameters
from lotus_dist.optim.projfactor import ProjFactor
from lotus_dist.optim.reports import memory_report
from lotus_dist.optim.subspace import projected_dim, projector_shape, side_for
from lotus_dist.train.config import OptimConfig

U = 2.0**-8  # bf16's relative rounding per entry (round to nearest: 2^-9; the issue's bound 2^-8)
# P̃ = P + E with |E| <= U|P| entrywise: |(P̃ᵀP̃ - I)_ij| <= |(PᵀP - I)_ij| + 2U Σ_k |p_ki||p_kj| + U² <= 2U + U² + fp32
ORTHO_BOUND = 2 * U + U**2 + 1e-5


# int8: each entry within half a code (absmax / 254 of its stored row); with a_k the bound of row k of S (‖a‖² <= r),
# |(P̃ᵀP̃ - I)_ij| <= 2‖a‖/254 + ‖a‖²/254² <= 2√r/254 + r/254²
INT8_HALF_CODE = 1 / 254
STORED = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.uint8}


def ortho_bound(dtype: str, r: int) -> float:
    return ORTHO_BOUND if dtype == "bf16" else 2 * r**0.5 * INT8_HALF_CODE + r * INT8_HALF_CODE**2 + 1e-5


def as_float(P: torch.Tensor) -> torch.Tensor:
    """A stored projector's value in fp64 (int8 codes decoded)."""
    return decode(P, torch.float64) if P.dtype == torch.uint8 else P.double()


def basis(P: torch.Tensor) -> torch.Tensor:
    """S (d x r) of a stored projector, in fp64."""
    P = as_float(P)
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
        assert opt.state[W]["projector"].dtype == STORED[dtype]
        out.append(ortho_error(opt.state[W]["projector"]))
    return out


def stored_bases(solver: str, dtype: str, steps: int, gap: int, shape, r=16) -> list[torch.Tensor]:
    """The stored projector after every step (gradients independent of W: every format solves the same bases)."""
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(shape) * 0.1)
    opt = LowRankAdamW([{"params": [W], "rank": r}], lr=1e-3, solver=solver, switch="fixed", update_gap=gap,
                       projector_dtype=dtype)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        W.grad = torch.randn(shape, generator=g)
        opt.step()
        out.append(opt.state[W]["projector"].clone())
    return out


@pytest.mark.parametrize("solver", ["svd", "rsvd", "random"])
def test_a_bf16_basis_is_one_rounding_from_orthonormal_over_its_lifetime(solver):
    """A solver that computes its basis afresh: every stored basis is within bf16's rounding bound, and visibly
    rounded (the fp32 one is orthonormal to 1e-5)."""
    bf16 = lifetime_drift(solver, "bf16", 40, 4)
    fp32 = lifetime_drift(solver, "fp32", 40, 4)
    assert max(fp32) < 1e-5
    assert 1e-4 < max(bf16) <= ORTHO_BOUND, (solver, max(bf16))


@pytest.mark.parametrize("shape", [(256, 64), (64, 256)])  # right (B: a row is a basis vector) and left projector
@pytest.mark.parametrize("solver", ["svd", "rsvd", "random"])
def test_an_int8_basis_is_within_half_a_code_of_the_fp32_one(solver, shape):
    """The same bases solved in fp32: every stored int8 entry decodes to within half a code (absmax / 254 of its
    stored row) of the fp32 basis, the codes pack (rows, cols + 4) bytes, and the drift from orthonormality stays
    within the bound above over the basis's lifetime."""
    r = 16
    exact = stored_bases(solver, "fp32", 20, 4, shape, r)
    coded = stored_bases(solver, "int8", 20, 4, shape, r)
    for P, C in zip(exact, coded):
        assert C.dtype == torch.uint8 and C.shape == (P.shape[0], P.shape[1] + 4)
        half_code = P.double().abs().amax(dim=1, keepdim=True) * INT8_HALF_CODE
        err = (as_float(C) - P.double()).abs()
        assert (err <= half_code * (1 + 1e-6) + 1e-9).all(), (err / half_code).max()
        assert 1e-4 < ortho_error(C) <= ortho_bound("int8", r), ortho_error(C)
    assert len({C.sum().item() for C in coded}) == 5  # a new basis at steps 1, 5, 9, 13, 17


def test_grasswalk_walks_from_the_stored_basis_without_accumulating_rounding():
    """grasswalk evolves the old basis: 200 refreshes, each walking from the stored bf16 basis. The walk starts from
    its QR (optim/subspace.py grasswalk_steps), so the drift stays one rounding; walking from the rounded basis as is
    grows it like √(refreshes) (0.02 here, past the bound)."""
    bf16 = lifetime_drift("grasswalk", "bf16", 400, 2, moments="rotate")
    fp32 = lifetime_drift("grasswalk", "fp32", 400, 2, moments="rotate")
    int8 = lifetime_drift("grasswalk", "int8", 400, 2, moments="rotate")
    assert max(fp32) < 1e-5
    assert max(bf16) <= ORTHO_BOUND, max(bf16)
    assert max(bf16[-50:]) <= ORTHO_BOUND  # no growth towards the end
    assert max(int8) <= ortho_bound("int8", 16), max(int8)
    assert max(int8[-50:]) <= ortho_bound("int8", 16)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_solvers_that_cannot_take_a_rounded_basis_are_refused_naming_both_keys(dtype):
    W = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=rf"^projector_dtype={dtype} does not fit solver=online_pca .*"
                                         r"use projector_dtype=fp32$"):
        LowRankAdamW([{"params": [W], "rank": 4}], solver="online_pca", projector_dtype=dtype)
    with pytest.raises(ValueError, match=rf"^optim\.projector_dtype={dtype} does not fit optim\.solver=online_pca"):
        resolve_parts(OptimConfig(name="osd", projector_dtype=dtype))
    with pytest.raises(ValueError, match=rf"^projector_dtype={dtype} does not apply to projfactor"):
        ProjFactor([{"params": [W], "rank": 4}], projector_dtype=dtype)
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


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])  # right and left projector
def test_the_rounded_update_is_the_fp32_update_of_the_rounded_basis(shape, dtype):
    """20 steps, two refreshes (svd): the bf16- or int8-projector run equals a hand-written GaLore step in fp64 on the
    stored (rounded) bases, and the weight change is within a few roundings of the fp32-projector run's."""
    grads = _structured_gradients(shape, 20)
    W0, W_rounded, bases = _run(shape, dtype, grads, solver="svd")
    _, W_fp32, _ = _run(shape, "fp32", grads, solver="svd")
    assert all(b.dtype == STORED[dtype] for b in bases)
    side = side_for(shape, "std")
    W, M, V = W0.double(), None, None
    for t, (G, P) in enumerate(zip(grads, bases), start=1):
        P = as_float(P)
        if (t - 1) % 10 == 0 and t > 1:
            assert not torch.equal(P, as_float(bases[t - 2]))  # a refresh happened; moments kept (GaLore)
        R = P.T @ G.double() if side == "left" else G.double() @ P.T
        M = 0.1 * R if M is None else 0.9 * M + 0.1 * R
        V = 0.001 * R.square() if V is None else 0.999 * V + 0.001 * R.square()
        N = M / (V.sqrt() + 1e-6)
        step = 1e-2 * (1 - 0.999**t) ** 0.5 / (1 - 0.9**t)
        W = W - step * 0.25 * (P @ N if side == "left" else N @ P)
    dW_ref, dW = W - W0.double(), (W_rounded - W0).double()
    assert (dW - dW_ref).norm() / dW_ref.norm() < 1e-5
    dW_fp32 = (W_fp32 - W0).double()
    rel = ((dW - dW_fp32).norm() / dW_fp32.norm()).item()
    # the bases differ by one rounding, relative ε in norm (bf16: <= 2^-9; int8: half a code of each row's absmax):
    # R = PᵀG, the normalised moments and P N each inherit it (measured: rel ≈ 2.6-3.1 ε for both formats)
    _, _, exact = _run(shape, "fp32", grads, solver="svd")
    eps = max(((as_float(b) - e.double()).norm() / e.double().norm()).item() for b, e in zip(bases, exact))
    assert eps < (U / 2 if dtype == "bf16" else INT8_HALF_CODE * 2), eps
    assert 1e-4 < rel < 4 * eps, (rel, eps)
    if dtype == "bf16":
        assert rel < 2 * U, rel


def test_state_bytes_measured_equal_the_formula_and_the_projectors_halve():
    """memory_report on every tensor of a tiny LLaMA's Lotus state: the projectors are Σ d·r elements (section 10 of
    docs/algorithms.md) at 2 bytes in bf16, 4 in fp32, 1 in int8 plus 4 per stored row; everything else is
    unchanged."""
    model = Llama(llama_config("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=32))
    projected, _ = route_parameters(model)
    r = 8
    elements = rows = 0
    for _, p in projected:
        shape = tuple(p.shape)
        d = projected_dim(shape, side_for(shape, "std"))
        elements += d * min(r, d)
        rows += projector_shape(shape, side_for(shape, "std"), min(r, d))[0]
    reports = {}
    for dtype in ("fp32", "bf16", "int8"):
        opt = build_optimizer(model, OptimConfig(name="lotus", rank=r, projector_dtype=dtype))
        opt.init_state()
        reports[dtype] = memory_report(opt)
    assert reports["fp32"]["projectors"] == 4 * elements
    assert reports["bf16"]["projectors"] == 2 * elements
    assert reports["int8"]["projectors"] == elements + 4 * rows  # a code an element, an fp32 scale a stored row
    for key in ("moments", "other"):
        assert reports["bf16"][key] == reports["int8"][key] == reports["fp32"][key]


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_save_load_keeps_the_rounded_projector(param_dtype, dtype):
    """torch's load casts floating states to the parameter's dtype; the projector keeps the dtype it was saved in
    (bf16, or int8's uint8 codes; bf16 parameters' other states: fp32), and the resumed steps equal the
    uninterrupted ones bit for bit."""
    shape = (48, 24)
    grads = _structured_gradients(shape, 12)

    def make():
        torch.manual_seed(0)
        W = torch.nn.Parameter((torch.randn(shape) * 0.1).to(param_dtype))
        return W, LowRankAdamW([{"params": [W], "rank": 4}], lr=1e-2, switch="fixed", update_gap=5,
                               projector_dtype=dtype)

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
    assert opt2.state[W2]["projector"].dtype == STORED[dtype]
    assert opt2.state[W2]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[W2]["projector"], opt.state[W]["projector"])
    for G in grads[6:]:  # a refresh at step 11
        for p, o in ((W, opt), (W2, opt2)):
            p.grad = G.to(param_dtype)
            o.step()
    assert torch.equal(W, W2)
    assert opt2.state[W2]["projector"].dtype == STORED[dtype]
