"""optim.fused (optim/fused_step.py): the projected matrices of one shape stepped as a stack equal the per-matrix
step (bit for bit; within 1e-6 relative where Fira's / APOLLO's limiter sums a stack's norms in another order), with
the same per-parameter state, and the kernels of a step grow with the number of groups, not of matrices."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from thread_ranks import Exchange, ShardComm, run_ranks

from lotus_dist.optim import LowRankAdamW, fused_step
from lotus_dist.optim.methods import METHODS

# R of each is >= state_codes.MIN_ELEMENTS at rank 16, so bf16 / int8 moments really are stored so
SHAPES = [(32, 256)] * 4 + [(256, 32)] * 2 + [(48, 256)]
LIMITED = {"fira", "apollo", "apollo_mini", "grassjump"}  # the limiter's norms: ≤ 1e-6, not bit for bit
CASES = [(m, "fp32", torch.float32) for m in ("galore", "lotus", "fira", "apollo", "apollo_mini", "golore",
                                              "grassjump", "lotus_rho", "osd")]
CASES += [("lotus", "int8", torch.float32), ("lotus", "bf16", torch.bfloat16), ("fira", "int8", torch.bfloat16),
          ("apollo", "bf16", torch.float32), ("galore", "int8", torch.bfloat16)]
ROUTED = {"lotus_rho", "osd"}  # path efficiency and online PCA step per matrix


def _parts(method, **extra):
    parts = {k: v for k, v in METHODS[method].items() if k != "fused"}
    return {**parts, "update_gap": 4, "verify_gap": 3, "gamma": 0.5, "window": 3, "t_min": 3, **extra}


def _grads(t, dtype):
    g = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _run(method, fmt, dtype, fused, steps, opt_from=None):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]
    opt = LowRankAdamW([{"params": ps, "rank": 16, **_parts(method, state_dtype=fmt, fused=fused)}],
                       weight_decay=0.1)
    for t in range(steps):
        for p, g in zip(ps, _grads(t, dtype)):
            p.grad = g
        opt.step()
    return ps, opt


def _close(a, b, exact):
    for x, y in zip(a, b):
        x, y = x.detach().float(), y.detach().float()
        if exact:
            assert torch.equal(x, y)
        else:
            assert float((x - y).abs().max() / x.abs().max()) <= 1e-6


@pytest.mark.parametrize("method,fmt,dtype", CASES)
def test_fused_step_equals_the_per_matrix_step_and_keeps_its_state(method, fmt, dtype, monkeypatch):
    stacked = []
    real = fused_step.FusedSteps._step_stack
    monkeypatch.setattr(fused_step.FusedSteps, "_step_stack",
                        lambda self, jobs, ok: (stacked.append(len(jobs)), real(self, jobs, ok))[1])
    steps = 9  # first bases, steady steps, checks (lotus: 3, 6) and switches (fixed: 4, 8)
    ref, ref_opt = _run(method, fmt, dtype, False, steps)
    assert not stacked
    got, opt = _run(method, fmt, dtype, True, steps)
    assert (not stacked) if method in ROUTED else max(stacked) == 4
    _close(ref, got, exact=method not in LIMITED)
    for p, q in zip(ref, got):  # the same per-parameter state: keys, shapes, dtypes, counters
        a, b = ref_opt.state[p], opt.state[q]
        assert a.keys() == b.keys()
        for k in a:
            if torch.is_tensor(a[k]):
                assert (a[k].shape, a[k].dtype) == (b[k].shape, b[k].dtype), k
                _close([a[k]], [b[k]], exact=method not in LIMITED or k == "projector")
            else:
                assert a[k] == b[k], k


def test_a_per_matrix_checkpoint_resumes_fused_and_equals_the_per_matrix_run():
    """The state layout is the per-matrix one: a fused optimizer loads its state_dict and continues it exactly."""
    ref, ref_opt = _run("lotus", "int8", torch.float32, False, 9)
    ps, opt = _run("lotus", "int8", torch.float32, False, 5)
    saved = opt.state_dict()
    fused = LowRankAdamW([{"params": ps, "rank": 16, **_parts("lotus", state_dtype="int8", fused=True)}],
                         weight_decay=0.1)
    fused.load_state_dict(saved)
    fused.param_groups[0]["fused"] = True  # the run's setting applied after the load (train/resume_changes.py)
    for t in range(5, 9):
        for p, g in zip(ps, _grads(t, torch.float32)):
            p.grad = g
        fused.step()
    _close(ref, ps, exact=True)


class _RowShards(ShardComm):
    """One batch key per rank, as the FSDP MatrixComm's shard group, so the fused step batches the limiter's sums."""

    def __init__(self, ex, rank, long_len):
        super().__init__(ex, rank, long_len)
        self.batch_key = (id(ex), rank)


def _sharded_run(method, fused, steps=8, world=2):
    torch.manual_seed(0)
    init = [torch.randn(s) for s in SHAPES]
    dims = [1 if m < n else 0 for m, n in SHAPES]  # the long side: never the projected one
    ex, out = Exchange(world), {}

    def rank_main(rank):
        ps = [torch.nn.Parameter(torch.tensor_split(w, world, dim=d)[rank].clone()) for w, d in zip(init, dims)]
        opt = LowRankAdamW([{"params": ps, "rank": 16, **_parts(method, fused=fused)}], weight_decay=0.1)
        opt.stats_comm = _RowShards(ex, rank, 0)
        for p, s, d in zip(ps, SHAPES, dims):
            opt.set_comm(p, _RowShards(ex, rank, s[d]))
        for t in range(steps):
            for p, g, d in zip(ps, _grads(t, torch.float32), dims):
                p.grad = torch.tensor_split(g, world, dim=d)[rank].clone()
            opt.step()
        out[rank] = ps

    run_ranks(ex, rank_main)
    return [torch.cat([out[r][i].detach() for r in range(world)], dim=d) for i, d in enumerate(dims)]


@pytest.mark.parametrize("method", ["lotus", "fira", "apollo_mini"])
def test_fused_step_on_long_side_shards_equals_the_per_matrix_sharded_step(method):
    _close(_sharded_run(method, False), _sharded_run(method, True), exact=method not in LIMITED)


class _Kernels(TorchDispatchMode):
    """aten ops that compute (views, dtype promotion and profiler markers launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view and func.__name__.split(".")[0] != "promote_types":
            self.count += 1
        return func(*args, **(kwargs or {}))


PER_GROUP = 64  # kernels per group of the fused step, whatever the method and state format


@pytest.mark.parametrize("method,fmt", [("galore", "fp32"), ("lotus", "int8"), ("fira", "fp32"), ("apollo", "bf16")])
def test_kernels_per_step_are_bounded_by_the_groups_not_the_matrices(method, fmt):
    layers = 6
    shapes = SHAPES * layers  # 42 matrices of 3 shapes (side and dtype alike per shape): 3 groups
    counts = {}
    for fused in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        opt = LowRankAdamW([{"params": ps, "rank": 16, **_parts(method, state_dtype=fmt, fused=fused,
                                                                  update_gap=50, verify_gap=50)}])
        for p in ps:
            p.grad = torch.randn(p.shape)
        opt.step()  # first bases
        opt.step()  # fira / apollo: the limiter is set
        counter = _Kernels()
        with counter:
            opt.step()  # a steady step
        counts[fused] = counter.count
    groups = len(set(SHAPES))
    assert counts[True] <= PER_GROUP * groups < counts[False], counts
