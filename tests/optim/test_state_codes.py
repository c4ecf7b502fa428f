"""optim.state_dtype (optim/state_codes.py): the int8 codes' round-trip error against its formula, the blocks along
the never-sharded dimension, the int8 / bf16 Adam update against an fp32 recomputation, the bytes the optimizer
holds against the formula, the moment policies on decoded moments, a save/load that keeps codes and continues bit
for bit, a masked unit that leaves its codes as they were."""

import io
import math

import pytest
import torch

from lotus_dist.optim import LowRankAdamW, ProjFactor, memory_report
from lotus_dist.optim import state_codes as sc
from lotus_dist.optim.refresh import BasisRefresh

# |x̂ - x| <= scale / 2 (round to nearest), up to fp32 rounding of x / scale and of codes * scale
SLACK = 1e-5


def blocks_of(shape, gen):
    """A moment-like tensor whose blocks (rows here) span four decades, signs mixed."""
    rows = torch.logspace(-4, 0, shape[0]).unsqueeze(1)
    return rows * torch.randn(shape, generator=gen)


def test_m_round_trip_is_within_half_a_code_of_its_block_absmax():
    gen = torch.Generator().manual_seed(0)
    for shape, scale_shape in (((300, 32), (300, 1)), ((32, 300), (1, 300))):  # a right and a left moment
        X = blocks_of(shape, gen) if scale_shape[1] == 1 else blocks_of(shape[::-1], gen).T.contiguous()
        codes, scale = sc.encode("exp_avg", X, scale_shape)
        assert codes.dtype == torch.int8 and scale.shape == scale_shape and scale.dtype == torch.float32
        dims = sc.block_dims(scale_shape)
        absmax = X.abs().amax(dim=dims, keepdim=True)
        assert torch.equal(scale, absmax / 127)  # the formula: one absmax / 127 per block
        err = (sc.decode("exp_avg", codes, scale) - X).abs()
        assert (err <= absmax / 127 / 2 * (1 + SLACK)).all()
        assert codes.abs().amax(dim=dims).eq(127).all()  # every block uses its whole range


def test_v_round_trip_is_within_half_a_code_of_sqrt_v_and_never_zero():
    gen = torch.Generator().manual_seed(1)
    V = blocks_of((300, 32), gen).square()  # a dynamic range of 1e-8 in each... and across rows
    V[0, :4] = 0.0
    codes, scale = sc.encode("exp_avg_sq", V, (300, 1))
    assert codes.dtype == torch.uint8
    s, top = V.sqrt(), V.sqrt().amax(dim=1, keepdim=True)
    assert torch.equal(scale, top / 255)
    got = sc.decode("exp_avg_sq", codes, scale)
    err = (got.sqrt() - s).abs()
    resolved = s >= scale / 2  # the others are raised to one code: never a zero denominator for a positive V
    assert (err[resolved] <= (scale / 2 * (1 + SLACK)).expand_as(s)[resolved]).all()
    assert (err <= scale * (1 + SLACK)).all()
    assert ((got > 0) == (V > 0)).all()


def test_storage_rules_small_and_1d_tensors_stay_fp32():
    assert sc.storage("int8", (64, 63)) == "fp32" and sc.storage("int8", (64, 64)) == "int8"
    assert sc.storage("int8", (5000,)) == "fp32" and sc.storage("bf16", (5000,)) == "bf16"
    assert sc.storage("fp32", (4096, 4096)) == "fp32"


SHAPE, RANK, STEPS = (512, 128), 32, 100


def gradient(step: int, shape=SHAPE) -> torch.Tensor:
    """Noisy gradients (noise 2x the signal, rows three decades apart): the moments move every step."""
    rows = torch.logspace(-3, 0, shape[0]).unsqueeze(1)
    signal = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return rows * (signal + 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(step + 1)))


def updates(state_dtype: str, side_shape=SHAPE) -> tuple[list, list, LowRankAdamW]:
    """Per step ΔW of a projected matrix (fixed basis) and of a plain parameter, gradients independent of W."""
    W, E = torch.nn.Parameter(torch.zeros(side_shape)), torch.nn.Parameter(torch.zeros(side_shape))
    opt = LowRankAdamW([{"params": [W], "rank": RANK}, {"params": [E]}], lr=1.0, eps=1e-8, switch="fixed",
                       update_gap=10**9, state_dtype=state_dtype)
    dW, dE = [], []
    for step in range(STEPS):
        W.grad, E.grad = gradient(step, side_shape), gradient(step + 1000, side_shape)
        w0, e0 = W.detach().clone(), E.detach().clone()
        opt.step()
        dW.append(W.detach() - w0)
        dE.append(E.detach() - e0)
    return dW, dE, opt


def reference(P: torch.Tensor, side_shape=SHAPE, scale: float = 0.25) -> tuple[list, list]:
    """The same steps recomputed densely in fp32: Adam on R = Pᵀ G (GaLoreAdamW's semantics) and torch's AdamW."""
    E = torch.nn.Parameter(torch.zeros(side_shape))
    adamw = torch.optim.AdamW([E], lr=1.0, eps=1e-8, weight_decay=0.0)
    right = P.shape[0] != side_shape[0]  # right projector: r x n, R = G Pᵀ
    M = V = None
    dW, dE = [], []
    for t in range(1, STEPS + 1):
        G = gradient(t - 1, side_shape)
        R = G @ P.T if right else P.T @ G
        M = 0.1 * R if M is None else 0.9 * M + 0.1 * R
        V = 0.001 * R * R if V is None else 0.999 * V + 0.001 * R * R
        N = M / (V.sqrt() + 1e-8)
        step = math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        dW.append(-step * scale * (N @ P if right else P @ N))
        E.grad = gradient(t - 1 + 1000, side_shape)
        e0 = E.detach().clone()
        adamw.step()
        dE.append(E.detach() - e0)
    return dW, dE


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shape", [SHAPE, SHAPE[::-1]])  # a right-projected and a left-projected matrix
def test_quantized_adam_update_against_an_fp32_recomputation(shape):
    """Stated bounds, per step over 100 steps: int8 moments within 3 % of the fp32 update (relative Frobenius; the
    issue's probe measured 1.7 % for this form), bf16 within 1 %, fp32 states equal to the recomputation."""
    exact, plain_exact, opt = updates("fp32", shape)
    (W,) = opt.param_groups[0]["params"]
    ref_w, ref_e = reference(opt.state[W]["projector"], shape)
    assert max(rel(a, b) for a, b in zip(exact, ref_w)) < 1e-5
    assert max(rel(a, b) for a, b in zip(plain_exact, ref_e)) < 1e-5
    for state_dtype, bound in (("int8", 0.03), ("bf16", 0.01)):
        dW, dE, q = updates(state_dtype, shape)
        assert q.state[q.param_groups[0]["params"][0]]["exp_avg"].dtype == {"int8": torch.int8,
                                                                          "bf16": torch.bfloat16}[state_dtype]
        assert max(rel(a, b) for a, b in zip(dW, ref_w)) < bound, state_dtype
        assert max(rel(a, b) for a, b in zip(dE, ref_e)) < bound, state_dtype


def test_blocks_follow_the_sharded_dimension_and_bytes_equal_the_formula():
    """A low-rank moment: one scale per long-side index (r x n left, m x r right); a plain 2-D parameter: one per
    row; under 4096 elements: fp32. Bytes measured from the optimizer's tensors."""
    left, right = torch.nn.Parameter(torch.zeros(64, 512)), torch.nn.Parameter(torch.zeros(512, 64))
    plain, small, norm = (torch.nn.Parameter(torch.zeros(s)) for s in ((300, 64), (60, 60), (8192,)))
    r = 16
    formulas = {
        "fp32": 4 * 2 * (2 * 512 * r + 300 * 64 + 60 * 60 + 8192),
        "bf16": 2 * 2 * (2 * 512 * r + 300 * 64) + 4 * 2 * (60 * 60) + 2 * 2 * 8192,
        "int8": 2 * (2 * (512 * r + 4 * 512) + 300 * 64 + 4 * 300) + 4 * 2 * (60 * 60 + 8192),
    }
    for name, formula in formulas.items():
        opt = LowRankAdamW([{"params": [left, right], "rank": r}, {"params": [plain, small, norm]}],
                           state_dtype=name)
        opt.init_state()
        assert memory_report(opt)["moments"] == formula, name
        planned = (sc.moment_bytes(name, (r, 512), r * 512, 512) * 2 + sc.moment_bytes(name, (300, 64), 300 * 64, 300)
                   + sc.moment_bytes(name, (60, 60), 3600, 60) + sc.moment_bytes(name, (8192,), 8192, 8192))
        assert planned == formula, name  # the planner's function (distributed/capacity.py)
        if name == "int8":
            assert opt.state[left]["exp_avg_scale"].shape == (1, 512)
            assert opt.state[right]["exp_avg_sq_scale"].shape == (512, 1)
            assert opt.state[plain]["exp_avg_scale"].shape == (300, 1)
            assert opt.state[small]["exp_avg"].dtype == opt.state[norm]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["reset", "rotate", "rotate_subtrack"])
def test_moment_policies_transform_the_decoded_moments(mode):
    """At a switch: dequantize, transform (the fp32 policy), requantize -- against the fp32 policy applied to the
    decoded moments, within the codes' round-trip bound."""
    gen = torch.Generator().manual_seed(3)
    old = torch.linalg.qr(torch.randn(512, 16, generator=gen))[0]
    new = torch.linalg.qr(torch.randn(512, 16, generator=gen))[0]
    group = {"moments": mode, "betas": (0.9, 0.999)}
    st = {"step": 7}
    sc.allocate(st, "int8", (16, 512), lambda dt, scale: torch.zeros(1 if scale else 16, 512, dtype=dt),
                torch.float32)
    sc.store(st, [torch.randn(16, 512, generator=gen), torch.rand(16, 512, generator=gen) + 0.5])
    exact = {"step": 7, "exp_avg": sc.decode("exp_avg", st["exp_avg"], st["exp_avg_scale"]),
             "exp_avg_sq": sc.decode("exp_avg_sq", st["exp_avg_sq"], st["exp_avg_sq_scale"])}
    BasisRefresh._apply_moment_policy(group, exact, old, new, "left")
    BasisRefresh._apply_moment_policy(group, st, old, new, "left")
    M, V = sc.load(st, torch.float32)
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_sq"].dtype == torch.uint8
    assert ((M - exact["exp_avg"]).abs() <= st["exp_avg_scale"] / 2 * (1 + SLACK) + 1e-7).all()
    s_err = (V.sqrt() - exact["exp_avg_sq"].sqrt()).abs()
    assert (s_err <= st["exp_avg_sq_scale"] * (1 + SLACK) + 1e-7).all()
    if mode == "reset":
        assert not M.any() and not V.any()


def _lotus(state_dtype: str, seed: int = 0):
    torch.manual_seed(seed)
    mats = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in ((256, 32), (32, 256))]
    emb = torch.nn.Parameter(torch.randn(200, 32) * 0.1)
    opt = LowRankAdamW([{"params": mats, "rank": 16}, {"params": [emb]}], lr=1e-2, state_dtype=state_dtype,
                       verify_gap=3, gamma=0.5, moments="rotate")
    return opt, mats + [emb]


def _steps(opt, params, start, end):
    for step in range(start, end):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + p.detach()
        opt.step()


@pytest.mark.parametrize("state_dtype", ["int8", "bf16"])
def test_save_load_keeps_the_codes_and_continues_bit_for_bit(state_dtype):
    opt, params = _lotus(state_dtype)
    _steps(opt, params, 0, 10)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    _steps(opt, params, 10, 20)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, params2 = _lotus(state_dtype, seed=5)
    with torch.no_grad():
        for p, v in zip(params2, saved["params"]):
            p.copy_(v)
    opt2.load_state_dict(saved["opt"])
    for i, q in enumerate(params2):
        for k, v in opt2.state[q].items():
            if torch.is_tensor(v):
                assert v.dtype == saved["opt"]["state"][i][k].dtype, k
    _steps(opt2, params2, 10, 20)
    assert all(torch.equal(p, q) for p, q in zip(params, params2))
    assert sum(opt.state[p]["n_bases"] for p in params[:2]) > 2  # the run switched (and rotated its codes)


def test_projfactor_first_moment_is_coded():
    W = torch.nn.Parameter(torch.zeros(256, 64))
    opt = ProjFactor([{"params": [W], "rank": 32}], state_dtype="int8")
    W.grad = torch.randn(256, 64)
    opt.step()
    st = opt.state[W]
    assert st["exp_avg"].dtype == torch.int8 and st["exp_avg_scale"].shape == (256, 1)
    assert st["v_row"].dtype == torch.float32
    assert torch.isfinite(W).all() and W.abs().sum() > 0


def test_masked_unit_leaves_its_codes_exactly():
    """step_unit(defer=True) with a closed gate: the codes and scales are the ones before the step, bit for bit."""
    opt, params = _lotus("int8")
    _steps(opt, params[:2], 0, 5)  # bases exist, the next step checks nothing; the plain parameter is not in the unit
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params[:2]}
    for p in params[:2]:
        p.grad = torch.randn(p.shape)
    assert opt.can_defer(params[:2])
    opt.step_unit(params[:2], defer=True, gate=torch.zeros((), dtype=torch.bool))
    for p in params[:2]:
        for k, v in before[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k
