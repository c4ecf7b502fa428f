"""The drop-in optimizers (``GaLoreAdamW``, ``LotusAdamW``): galore-torch 1.0's numbers, torch Optimizer behaviour,
a plain training loop, resume, a Hugging Face Trainer, and an import that pulls in no trainer."""

import io
import math
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn

from hf_adamw_reference import hf_adam_direction
from lotus_dist.optim import METHODS, GaLoreAdamW, LotusAdamW, LowRankAdamW, switch_report


class GaLoreTorchReference:
    """galore-torch 1.0's ``GaLoreAdamW`` (galore_torch/adamw.py with galore_projector.py), written here from its
    update rule and independent of lotus_dist, for groups of 2-D projected matrices and plain tensors.

    Per parameter: in a group with ``rank`` the projector is (re)computed when the step count (before the
    increment) is a multiple of ``update_proj_gap``, from ``torch.linalg.svd(G.float(), full_matrices=False)`` cast
    back to G's dtype; ``std``: right (Vh[:r], R = G Pᵀ) when rows >= cols, else left (U[:, :r], R = Pᵀ G);
    ``reverse_std`` the other one. Moments are created once and kept across switches. Then Hugging Face's AdamW:
    denom = sqrt(V) + eps, step size lr·sqrt(1−β2^t)/(1−β1^t), N = M/denom (projected back and times ``scale``),
    p −= step_size·N, then p −= lr·wd·p.
    """

    def __init__(self, groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        self.groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state = {}

    @staticmethod
    def side(shape, proj_type):
        tall = shape[0] >= shape[1]
        return {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right"}.get(proj_type, proj_type)

    @staticmethod
    def orthogonal(G, rank, side):
        matrix = G if G.dtype == torch.float32 else G.float()
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return (Vh[:rank, :] if side == "right" else U[:, :rank]).to(G.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state.setdefault(id(p), {"step": 0, "svds": 0})
                if "rank" in group:
                    side = self.side(tuple(grad.shape), group["proj_type"])
                    if "P" not in st or st["step"] % group["update_proj_gap"] == 0:
                        st["P"] = self.orthogonal(grad, group["rank"], side)
                        st["svds"] += 1
                    grad = grad @ st["P"].t() if side == "right" else st["P"].t() @ grad
                n, step_size = hf_adam_direction(st, grad, group)
                if "rank" in group:
                    n = (n @ st["P"] if side == "right" else st["P"] @ n) * group["scale"]
                p.add_(n, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


# ------------------------------------------------------------------------------------------------- fixtures

# name -> shape; which are projected is decided by the groups below
SHAPES = {
    "up.weight": (24, 40),  # rows < cols: std projects on the left
    "up.bias": (24,),
    "down.weight": (40, 24),  # rows >= cols: std projects on the right
    "down.bias": (40,),
    "norm.weight": (24,),  # LayerNorm-like 1-D weight
    "mix.weight": (48, 32),  # reverse_std: left projection of a tall matrix
    "head.weight": (16, 40),  # a plain 2-D matrix
}


def _tensors(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (0.1 * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for k, s in SHAPES.items()}


def _groups(t, gap=20):
    """galore-torch's group format, as its users write it."""
    return [
        {"params": [t["up.bias"], t["down.bias"], t["norm.weight"], t["head.weight"]]},
        {"params": [t["up.weight"], t["down.weight"]], "rank": 8, "update_proj_gap": gap, "scale": 0.25,
         "proj_type": "std"},
        {"params": [t["mix.weight"]], "rank": 6, "update_proj_gap": gap, "scale": 0.5, "proj_type": "reverse_std"},
    ]


def _gradient(name, shape, t, dtype):
    """A deterministic gradient: a fixed low-rank direction that drifts slowly plus fresh noise each step, so the
    subspace found at each switch differs from the previous one."""
    key = zlib.crc32(name.encode()) % 10007
    base = torch.Generator().manual_seed(key)
    step = torch.Generator().manual_seed(1000 * key + t)
    if len(shape) == 1:
        return (torch.randn(shape, generator=base, dtype=torch.float64)
                + 0.5 * torch.randn(shape, generator=step, dtype=torch.float64)).to(dtype)
    m, n = shape
    U = torch.randn(m, 4, generator=base, dtype=torch.float64)
    V = torch.randn(n, 4, generator=base, dtype=torch.float64)
    drift = torch.randn(m, 4, generator=base, dtype=torch.float64)
    U = U + math.sin(0.05 * t) * drift
    return (U @ V.T / math.sqrt(n) + 0.3 * torch.randn(m, n, generator=step, dtype=torch.float64)).to(dtype)


def _run_against_reference(dtype, steps, gap, **hyper):
    ours, ref = _tensors(dtype), _tensors(dtype)
    params = {k: nn.Parameter(v) for k, v in ours.items()}
    opt = GaLoreAdamW(_groups(params, gap), **hyper)
    reference = GaLoreTorchReference(_groups(ref, gap), **hyper)
    start = {k: v.detach().clone() for k, v in params.items()}
    for t in range(steps):
        for k, shape in SHAPES.items():
            G = _gradient(k, shape, t, dtype)
            params[k].grad = G.clone()
            ref[k].grad = G.clone()
        opt.step()
        reference.step()
    diffs = {k: float((params[k].detach() - ref[k]).abs().max()) for k in SHAPES}
    moved = {k: float((params[k].detach() - start[k]).abs().max()) for k in SHAPES}
    return opt, reference, params, ref, diffs, moved


# ---------------------------------------------------------------------------------------------- galore-torch


def test_galore_adamw_matches_galore_torch_for_every_parameter():
    """fp64 parameters so that the comparison measures the algorithm, not fp32 rounding: the SVDs are fp32 in both
    (galore-torch decomposes ``G.float()``) on identical gradients, so the only differences left are fp64
    rounding-order ones (the projected update is one GEMM with alpha here, matmul + scale + add there). 1e-6 is
    ~1e-4 of how far the weights move."""
    steps, gap = 200, 20
    opt, reference, params, ref, diffs, moved = _run_against_reference(
        torch.float64, steps, gap, lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05)
    print("max |ours - galore-torch| per parameter:", {k: f"{d:.1e}" for k, d in diffs.items()})
    assert max(diffs.values()) <= 1e-6, diffs
    assert min(moved.values()) > 1e-2, moved  # every parameter moved far more than the tolerance
    switches = switch_report(opt)
    assert len(switches) == 3 and all(s >= 8 for s in switches.values()), switches  # 9 switches each
    for k in ("up.weight", "down.weight", "mix.weight"):
        st, rs = opt.state[params[k]], reference.state[id(ref[k])]
        assert st["n_bases"] == rs["svds"] == math.ceil(steps / gap)
        assert torch.allclose(st["projector"], rs["P"], atol=1e-12, rtol=0)
        assert torch.allclose(st["exp_avg"], rs["exp_avg"], atol=1e-9, rtol=0)
    # the side rule: up (24x40) left, down (40x24) right, mix (48x32, reverse_std) left
    assert opt.state[params["up.weight"]]["exp_avg"].shape == (8, 40)
    assert opt.state[params["down.weight"]]["exp_avg"].shape == (40, 8)
    assert opt.state[params["mix.weight"]]["exp_avg"].shape == (6, 32)


def test_galore_adamw_matches_galore_torch_in_fp32():
    """fp32 parameters (what galore-torch users train in): the same SVDs on the same fp32 gradients; the weights
    differ only by fp32 rounding order (single-ulp steps of ~1e-8 that do not feed back: the gradients are given)."""
    _, _, _, _, diffs, moved = _run_against_reference(torch.float32, 200, 20, lr=0.01, weight_decay=0.05)
    print("fp32: max |ours - galore-torch| per parameter:", {k: f"{d:.1e}" for k, d in diffs.items()})
    assert max(diffs.values()) <= 1e-6, diffs
    assert min(moved.values()) > 1e-2


def test_galore_adamw_without_bias_correction_matches():
    _, _, _, _, diffs, _ = _run_against_reference(torch.float64, 30, 10, lr=0.003, weight_decay=0.01,
                                                  correct_bias=False)
    assert max(diffs.values()) <= 1e-9, diffs


def test_lowrank_adamw_plain_form_is_torch_adamw_not_galore_torch():
    """Why the drop-in has its own plain update: LowRankAdamW's ``galore`` method (torch.optim.AdamW's form for
    plain tensors: decay before the update, eps after the bias correction) drifts away from galore-torch on the
    plain parameters (~1e-3 here: lr·wd·lr·|update| per step), while its projected matrices agree in fp32. (In fp64
    they do not: LowRankAdamW solves an fp64 gradient in fp64, galore-torch in fp32, and a basis vector whose sign
    comes out the other way moves the weights by ~0.1; GaLoreAdamW solves in fp32, see the fp64 test above.)"""
    dtype = torch.float32
    ours, ref = _tensors(dtype), _tensors(dtype)
    params = {k: nn.Parameter(v) for k, v in ours.items()}
    groups = _groups(params, 20)
    for g in groups[1:]:
        gap = g.pop("update_proj_gap")
        g.update({**METHODS["galore"], "update_gap": gap, "scale": g["scale"], "proj_type": g["proj_type"]})
    opt = LowRankAdamW(groups, lr=0.01, weight_decay=0.05)
    reference = GaLoreTorchReference(_groups(ref, 20), lr=0.01, weight_decay=0.05)
    for t in range(200):
        for k, shape in SHAPES.items():
            params[k].grad = _gradient(k, shape, t, dtype)
            ref[k].grad = params[k].grad.clone()
        opt.step()
        reference.step()
    diffs = {k: float((params[k].detach() - ref[k]).abs().max()) for k in SHAPES}
    print("LowRankAdamW(galore) vs galore-torch:", {k: f"{d:.1e}" for k, d in diffs.items()})
    assert max(diffs[k] for k in ("up.weight", "down.weight", "mix.weight")) <= 1e-6
    assert min(diffs[k] for k in ("up.bias", "down.bias", "norm.weight", "head.weight")) > 1e-4


def test_galore_groups_are_validated():
    w = nn.Parameter(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="'full'"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 5, "scale": 1.0, "proj_type": "full"}])
    with pytest.raises(ValueError, match="2-D"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(8))], "rank": 2}])
    with pytest.raises(ValueError, match="update_gap"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 0}])
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=0.1)  # missing keys: the galore method's values
    group = opt.param_groups[0]
    assert (group["update_proj_gap"], group["scale"], group["proj_type"], group["correct_bias"]) == (200, 0.25, "std",
                                                                                                     True)


# ------------------------------------------------------------------------------------------- training loops


def _teacher_data(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 32, generator=g)
    teacher = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        Y = teacher(X)
    return X, Y


def _student(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16))


def _lotus_groups(model, **extra):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": others}, {"params": matrices, "rank": 4, "scale": 1.0, "proj_type": "std", **extra}]


def test_lotus_adamw_trains_and_switches_adaptively():
    X, Y = _teacher_data()
    model = _student()
    opt = LotusAdamW(_lotus_groups(model, verify_gap=10, gamma=0.02), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    matrices = opt.param_groups[1]["params"]
    losses, switch_taus = [], []
    for _ in range(150):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(X), Y)
            loss.backward()
            return loss
        before = [(opt.state[p].get("n_bases", 0), opt.state[p].get("tau", 0)) for p in matrices]
        losses.append(float(opt.step(closure).detach()))
        sched.step()
        for p, (n_bases, tau) in zip(matrices, before):
            if n_bases > 0 and opt.state[p]["n_bases"] > n_bases:
                switch_taus.append(tau + 1)
    switches = switch_report(opt)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, switches {switches} at tau {switch_taus}")
    assert losses[-1] < 0.2 * losses[0]
    assert sum(switches.values()) >= 1 and len(switch_taus) == sum(switches.values())
    # adaptive: each switch came from a displacement check (tau a multiple of verify_gap), none from a clock
    assert all(tau % 10 == 0 for tau in switch_taus)
    group = opt.param_groups[1]
    assert (group["solver"], group["switch"], group["gamma"], group["verify_gap"]) == ("rsvd", "displacement", 0.02, 10)


@pytest.mark.parametrize("cls", [GaLoreAdamW, LotusAdamW])
def test_state_dict_round_trip_resumes_identically(cls):
    X, Y = _teacher_data(n=64)
    extra = dict(update_proj_gap=5) if cls is GaLoreAdamW else dict(verify_gap=3, gamma=0.3, reference_dtype="fp32")

    def make(model):
        opt = cls(_lotus_groups(model, **extra), lr=0.01, weight_decay=0.01)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.97**s)

    def train(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(X), Y).backward()
            opt.step()
            sched.step()

    full = _student()
    opt, sched = make(full)
    train(full, opt, sched, 24)

    first = _student()
    opt, sched = make(first)
    train(first, opt, sched, 11)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _student(seed=7)
    resumed.load_state_dict(saved["model"])
    opt, sched = make(resumed)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.97**11)
    train(resumed, opt, sched, 13)
    assert sum(switch_report(opt).values()) >= 2
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_schedulers_drive_the_learning_rate():
    """transformers' cosine schedule with warm-up writes group["lr"]; every step uses the value it finds there."""
    transformers = pytest.importorskip("transformers")
    ours, ref = _tensors(torch.float64), _tensors(torch.float64)
    params = {k: nn.Parameter(v) for k, v in ours.items()}
    opt = GaLoreAdamW(_groups(params, 5), lr=0.01, weight_decay=0.05)
    sched = transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, num_training_steps=12)
    reference = GaLoreTorchReference(_groups(ref, 5), lr=0.01, weight_decay=0.05)
    start = {k: v.detach().clone() for k, v in params.items()}
    lrs = []
    for t in range(12):
        for k, shape in SHAPES.items():
            params[k].grad = _gradient(k, shape, t, torch.float64)
            ref[k].grad = params[k].grad.clone()
        lr = opt.param_groups[0]["lr"]
        assert all(g["lr"] == lr for g in opt.param_groups)
        for g in reference.groups:
            g["lr"] = lr
        lrs.append(lr)
        opt.step()
        reference.step()
        sched.step()
        if t == 0:  # lr 0 at the first warm-up step: nothing moved
            assert all(torch.equal(params[k].detach(), start[k]) for k in SHAPES)
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(0.01) and 0.0 < lrs[-1] < 0.001
    assert max(float((params[k].detach() - ref[k]).abs().max()) for k in SHAPES) <= 1e-12


def test_importing_optim_pulls_in_no_trainer_nor_distributed_layer():
    code = (
        "import sys, lotus_dist.optim\n"
        "from lotus_dist.optim import GaLoreAdamW, LotusAdamW\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in (['lotus_dist', 'train'], "
        "['lotus_dist', 'distributed']))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hugging_face_trainer_runs_with_galore_adamw(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, get_constant_schedule

    from lotus_dist.optim import route_parameters

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    projected, plain = route_parameters(model)  # attention/MLP matrices projected, the rest plain
    assert len(projected) == 14
    opt = GaLoreAdamW([{"params": [p for _, p in plain]},
                       {"params": [p for _, p in projected], "rank": 8, "update_proj_gap": 2, "scale": 0.25,
                        "proj_type": "std"}], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (8, 16), generator=g)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, get_constant_schedule(opt)))
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(s == 1 for s in switch_report(opt).values())  # bases at steps 0 and 2
