"""Correctness on CUDA, against independent references on the CPU. Marked ``gpu``: they skip without CUDA.

``scripts/gpu_check.py`` runs them on a GPU machine; its ``--dry-run`` runs them on the CPU instead
(``LOTUS_CHECK_DEVICE=cpu``: the device under test is then CPU fp32 against CPU fp64), so they cannot rot between
GPU sessions. The random sketches of rsvd are drawn on the CPU and moved for both runs (``cpu_sketches``): a CUDA
generator gives other numbers than a CPU one for the same seed, and these tests check the device's arithmetic, not
its random stream.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import LowRankAdamW, switch_report
from lotus_dist.optim import basis_solvers as bs
from lotus_dist.optim import solver_rounds as sr
from lotus_dist.optim import subspace as ss
from lotus_dist.optim.methods import METHODS

pytestmark = pytest.mark.gpu


@pytest.fixture
def device() -> torch.device:
    forced = os.environ.get("LOTUS_CHECK_DEVICE")
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (scripts/gpu_check.py --dry-run runs these on the CPU)")
    return torch.device("cuda")


@contextlib.contextmanager
def cpu_sketches():
    """rsvd's Gaussian sketch drawn by a CPU generator seeded like the device's one, then moved."""
    original = ss.Comm.sketch

    def sketch(self, gen, rows, cols, device):
        cpu = torch.Generator().manual_seed(gen.initial_seed())
        return torch.randn(rows, cols, generator=cpu, dtype=torch.float32).to(device)

    ss.Comm.sketch = sketch
    try:
        yield
    finally:
        ss.Comm.sketch = original


# ---- the optimizer: device fp32 against CPU fp64 ------------------------------------------------------------------

SHAPES = [(96, 160), (160, 96), (128, 128)]  # left and right projections, a square one
RANK, STEPS = 8, 40


def gradient(t: int, shape: tuple[int, int], index: int) -> torch.Tensor:
    """Step t's gradient (fp64, CPU): a rank-12 part with a geometric spectrum whose right factor drifts with t
    (the subspace moves, so bases switch), plus a 1 % noise floor. Distinct singular values: bases are well posed."""
    m, n = shape
    g = torch.Generator().manual_seed(1000 + index)
    left = torch.linalg.qr(torch.randn(m, 12, generator=g, dtype=torch.float64)).Q
    right, drift = torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randn(n, 12, generator=g,
                                                                                       dtype=torch.float64)
    spectrum = 0.7 ** torch.arange(12, dtype=torch.float64)
    noise = torch.randn(m, n, generator=torch.Generator().manual_seed(10_000 * index + t), dtype=torch.float64)
    right_t = torch.linalg.qr(right + 0.08 * t * drift).Q
    return (left * spectrum) @ right_t.T + 0.01 * noise / (m * n) ** 0.5 * 12 ** 0.5


def run_optimizer(method: str, device: torch.device, dtype: torch.dtype, **options) -> tuple[list, dict]:
    """STEPS steps of ``method`` on the SHAPES matrices and one vector (plain AdamW), from the same start."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(*s, generator=g, dtype=torch.float64) * 0.02 for s in SHAPES] + [torch.ones(64,
                                                                                                   dtype=torch.float64)]
    params = [torch.nn.Parameter(w.to(device, dtype)) for w in start]
    parts = {**METHODS[method], "seed": 7, **options}
    opt = LowRankAdamW([{"params": params[:-1], "rank": RANK, **parts}, {"params": params[-1:]}], lr=1e-2,
                       weight_decay=0.01)
    vec = torch.linspace(-1, 1, 64, dtype=torch.float64)
    with cpu_sketches():
        for t in range(STEPS):
            for i, p in enumerate(params[:-1]):
                p.grad = gradient(t, SHAPES[i], i).to(device, dtype)
            params[-1].grad = (vec * (t + 1) / STEPS).to(device, dtype)
            opt.step()
    return [p.detach().to("cpu", torch.float64) for p in params], switch_report(opt)


@pytest.mark.parametrize("method, options", [
    ("lotus", {"verify_gap": 5, "gamma": 0.05}),  # rsvd bases, displacement switching
    ("lotus", {"switch": "fixed", "update_gap": 10}),  # rsvd bases switched on a clock: several bases
    ("galore", {"update_gap": 1000}),  # svd: one basis (its signs are the solver's, so only within one basis)
])
def test_lowrank_adamw_on_device_equals_cpu_fp64(device, method, options):
    got, got_switches = run_optimizer(method, device, torch.float32, **options)
    ref, ref_switches = run_optimizer(method, torch.device("cpu"), torch.float64, **options)
    assert got_switches == ref_switches
    if options.get("switch") == "fixed":
        assert min(ref_switches.values()) >= 3  # the check covers refreshes, not only steady steps
    for i, (a, b) in enumerate(zip(got, ref)):
        rel = float((a - b).norm() / b.norm())
        assert rel < 1e-4, f"parameter {i}: relative difference {rel:.2e} to the CPU fp64 run"


# ---- bases: svd and rsvd on the device -----------------------------------------------------------------------------

@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_bases_on_device(device, grad_dtype, side):
    """svd and rsvd bases of a gradient (fp32 or bf16 on the device) span the CPU fp64 svd subspace of the same
    values, and capture the same energy."""
    m, n, r = (256, 640, 32) if side == "left" else (640, 256, 32)
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(m, 48, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, 48, generator=g, dtype=torch.float64)).Q
    G = (U * 0.85 ** torch.arange(48, dtype=torch.float64)) @ V.T
    G_dev = G.to(device, grad_dtype)
    G64 = G_dev.to("cpu", torch.float64)  # the values the device holds (bf16-rounded where bf16)
    reference = sr.svd_projector(G64, side, r)
    with cpu_sketches():
        gen = torch.Generator(device=device).manual_seed(11)
        Gs = ss.oriented(G_dev, side)
        bases = {"svd": sr.svd_projector(G_dev, side, r),
                 "rsvd": ss.to_projector(bs.rsvd_columns(Gs, r, 8, 2, gen), side)}

    def energy(P):
        return float(ss.project(G64, P.to("cpu", torch.float64), side).norm() ** 2 / G64.norm() ** 2)

    for name, P in bases.items():
        assert P.device.type == device.type and P.dtype == torch.float32
        cols, ref_cols = (ss.columns(P, side).to("cpu", torch.float64), ss.columns(reference, side))
        cos = torch.linalg.svdvals(cols.T @ ref_cols).clamp(max=1.0)
        largest_sine = float((1 - cos.min() ** 2).clamp(min=0).sqrt())
        assert largest_sine < 2e-3, f"{name}: subspace differs from CPU fp64 svd (largest sine {largest_sine:.1e})"
        assert abs(energy(P) - energy(reference)) < 1e-5, name


# ---- bf16 autocast training ---------------------------------------------------------------------------------------

def markov_batches(vocab: int, batch: int, seq: int, steps: int) -> list[torch.Tensor]:
    """Token blocks from a fixed random Markov chain (each token has 4 likely successors): a learnable stream."""
    g = torch.Generator().manual_seed(5)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for j in range(1, seq + 1):
            pick = torch.randint(0, 4, (batch,), generator=g)
            tokens[:, j] = successors[tokens[:, j - 1], pick]
        out.append(tokens)
    return out


def train_losses(device: torch.device, bf16: bool, batches: list[torch.Tensor]) -> list[float]:
    torch.manual_seed(0)
    model = Llama(llama_config("tiny", vocab_size=512)).to(device)
    projected = [p for n, p in model.named_parameters() if p.dim() == 2 and "proj" in n]
    plain = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "proj" in n)]
    opt = LowRankAdamW([{"params": projected, "rank": 32, **METHODS["lotus"], "seed": 0, "verify_gap": 10,
                         "scale": 0.25}, {"params": plain}], lr=3e-3)
    losses = []
    for tokens in batches:
        tokens = tokens.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_bf16_autocast_loss_within_2_percent_of_fp32(device):
    batches = markov_batches(512, 8, 64, 50)
    fp32 = train_losses(device, False, batches)
    bf16 = train_losses(device, True, batches)
    assert fp32[-1] < 0.8 * fp32[0]  # it learned: the comparison is about a trained model
    tail32, tail16 = sum(fp32[-5:]) / 5, sum(bf16[-5:]) / 5
    assert abs(tail16 - tail32) / tail32 < 0.02, f"bf16 {tail16:.4f} vs fp32 {tail32:.4f} (mean of the last 5)"
