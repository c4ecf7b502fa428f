"""optim.reference_dtype=int4 (reference_codes.py): the codec against its definition, its estimator against the exact
fp32 reference, on random blocks and on a recorded training run, and its bytes."""

import math

import pytest
import torch

from lotus_dist.optim import LowRankAdamW, memory_report
from lotus_dist.optim import reference_codes as rc
from lotus_dist.optim.switching import POLICIES
from script_loader import load_script  # tests/ is on sys.path (pyproject's pythonpath)

DISPLACEMENT = POLICIES["displacement"]


def _encoded(R: torch.Tensor, side: str) -> dict:
    r = R.shape[0] if side == "left" else R.shape[1]
    st = {}
    rc.allocate(st, tuple(R.shape), side, r, "int4", torch.float32, "cpu")
    rc.store(st, R)
    return st


def test_pack_round_trips_every_code():
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    q = torch.arange(-8, 8).repeat(3, 1)[:, order][:, :15].float()  # odd r: a padded nibble
    assert torch.equal(rc.unpack(rc.pack(q), 15), q)
    assert torch.equal(rc.unpack(torch.zeros(2, 3, dtype=torch.uint8), 5), torch.zeros(2, 5))  # zeros decode to 0


@pytest.mark.parametrize("side, shape", [("left", (9, 50)), ("right", (50, 9)), ("left", (1, 4)), ("right", (4, 1))])
def test_blocks_follow_the_long_side_and_the_sums_are_exact_for_r_along_d(side, shape):
    R = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    st = _encoded(R, side)
    long = shape[1] if side == "left" else shape[0]
    r = shape[0] if side == "left" else shape[1]
    assert st["d_codes"].dtype == torch.uint8 and st["d_codes"].shape == (
        ((r + 1) // 2, long) if side == "left" else (long, (r + 1) // 2))
    D = rc.decoded(st, side, r).double()
    Rd = R.double()
    blocks = (lambda t: t.T) if side == "left" else (lambda t: t)
    # per block: the largest entry exact, ⟨D_j, D̂_j⟩ = ‖D_j‖² (the noise is orthogonal to D), ‖D‖² stored exactly
    assert torch.allclose((blocks(Rd) * blocks(D)).sum(1), blocks(Rd).square().sum(1), rtol=1e-5)
    top = blocks(Rd).abs().argmax(1, keepdim=True)
    assert torch.equal(blocks(D).gather(1, top), blocks(Rd).gather(1, top))
    rd, dd = rc.sums(st, R)
    assert math.isclose(float(dd), float(Rd.square().sum()), rel_tol=1e-5)
    assert math.isclose(float(rd), float(Rd.square().sum()), rel_tol=1e-5)
    # R = D: distance 0 (the exact rule's), where absmax codes without the estimator give sqrt(ε²)
    assert DISPLACEMENT.distance(DISPLACEMENT.statistics(st, {}, R).tolist()) < 3e-3


def test_distance_error_on_random_pairs_is_bounded_by_the_quantisation_residual():
    """|Δdist| ≤ 2ε (ε = ‖D̂ − D‖ / ‖D‖, Cauchy-Schwarz on ⟨R⊥, e⟩); typically ε / sqrt(elements)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        D = torch.randn(16, 300, generator=gen) * torch.logspace(0, -1.5, 16).reshape(-1, 1)  # decaying spectrum
        R = D * (0.2 + 0.1 * trial) + torch.randn(16, 300, generator=gen) * torch.logspace(0, -1.5, 16).reshape(-1, 1)
        st = _encoded(D, "left")
        eps = float((rc.decoded(st, "left", 16) - D).norm() / D.norm())
        exact = math.sqrt(2 - 2 * float((R.double() * D.double()).sum() / R.double().norm() / D.double().norm()))
        got = DISPLACEMENT.distance(DISPLACEMENT.statistics(st, {}, R).tolist())
        assert abs(got - exact) <= 2 * eps, trial
        assert abs(got - exact) < 5 * eps / math.sqrt(D.numel()), (trial, got - exact, eps)


def test_int4_state_is_the_codes_and_its_bytes_are_under_a_tenth_of_the_moments():
    w = torch.nn.Parameter(torch.zeros(64, 200))
    opt = LowRankAdamW([{"params": [w], "rank": 16, "reference_dtype": "int4"}])
    w.grad = torch.randn(64, 200)
    opt.step()
    st = opt.state[w]
    assert "d_init" not in st and {k: st[k].dtype for k in rc.INT4_KEYS} == {
        "d_codes": torch.uint8, "d_scale": torch.float32, "d_top": torch.float32, "d_norm_sq": torch.float32}
    moments = 2 * st["exp_avg"].numel() * 4
    mem = memory_report(opt)
    assert mem["reference"] == rc.reference_bytes(200, 16, "int4") == 200 * (8 + 12)
    assert mem["reference"] <= mem["other"]
    for r in (128, 512, 1024):  # the planner's count, at the sizes of the issue
        assert rc.reference_bytes(4096, r, "int4") <= 0.10 * 2 * 4096 * r * 4


def test_int4_decides_as_the_exact_reference_on_a_recorded_training_run():
    """A byte-level LLaMA (2 layers, 128 wide) trained with AdamW on the embedded corpus; its 14 projected matrices'
    gradients, 120 steps, replayed through Lotus with the exact fp32 reference and with int4 (r = 16, η = 4, three γ):
    at every check of the exact run the int4 decision from the same R and D agrees at >= 95 % of checks, each switch of int4's own run lands within one check of the exact run's, and the replay made both kinds
    of decision many times."""
    bench = load_script("scripts/bench_reference.py", "bench_reference")
    tokens = bench.corpus_tokens()[:200_000]
    stream = bench.gradient_stream(128, 344, 2, 120, seq=32, tokens=tokens)
    first = next(stream)
    replay = bench.Replay({n: tuple(g.shape) for n, g in first.items()}, 16, (0.02, 0.05, 0.1), 4, forms=("int4",))
    replay.feed(first)
    for grads in stream:
        replay.feed(grads)
    figures = replay.figures()
    switches = checks = 0
    for gamma in (0.02, 0.05, 0.1):
        f = figures[gamma, "int4"]
        assert f["agree"] >= 0.95 and f["max_offset"] <= 1.0, (gamma, f)
        assert f["mean_err"] < 2e-3, (gamma, f)
        assert figures[gamma, "naive int4"]["mean_err"] > 2 * f["mean_err"]  # what the estimator buys
        switches += f["switches"]
        checks += f["checks"]
    assert switches > 50 and checks - switches > 50, (switches, checks)
