"""Optimizer-in-backward (optim.per_layer) against the whole-model step of the same optimizer, in one process."""

import contextlib

import pytest
import torch

from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import OptimizerInBackward, build_optimizer, switch_report, units_of
from lotus_dist.optim.subspace import Comm
from lotus_dist.train.config import OptimConfig

SMALL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=48)
# Switches happen within a few steps: the per-layer path must reproduce them, not only steady steps.
FAST_SWITCHING = dict(rank=4, update_gap=3, verify_gap=2, gamma=0.5, window=2, t_min=2)


def _model(seed=0):
    torch.manual_seed(seed)
    return Llama(llama_config("tiny", **SMALL))


def _batches(steps, micro, rows=2, seq=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, SMALL["vocab_size"], (rows, seq + 1), generator=g) for _ in range(micro)]
            for _ in range(steps)]


def _whole_model_run(name, batches, **opts):
    """The reference: backward over all micro-batches (loss / k), then optimizer.step() on the full gradient."""
    model = _model()
    opt = build_optimizer(model, OptimConfig(name=name, **opts))
    for step in batches:
        for b in step:
            (model(b[:, :-1], b[:, 1:]) / len(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _per_layer_run(name, batches, max_unit_norm=0.0, before_update=None, **opts):
    model = _model()
    opt = build_optimizer(model, OptimConfig(name=name, **opts))
    k = len(batches[0])
    stepper = OptimizerInBackward(opt, units_of(model), grad_accum=k, max_unit_norm=max_unit_norm,
                                  before_update=before_update)
    reports = []
    for step in batches:
        for i, b in enumerate(step):
            stepper.begin_micro_batch(i)
            (model(b[:, :-1], b[:, 1:]) / k).backward()
        reports.append(stepper.end_step())
        assert all(p.grad is None for p in model.parameters())  # every gradient freed by its unit
    stepper.remove()
    return model, opt, reports


def _assert_same(m1, m2, atol=0.0):
    for (name, p), q in zip(m1.named_parameters(), m2.parameters()):
        if atol == 0.0:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("name", ["lotus", "galore", "lotus_rho", "fira", "adamw", "projfactor", "apollo",
                                  "apollo_mini"])
def test_per_layer_equals_the_whole_model_step(name):
    batches = _batches(steps=8, micro=1)
    opts = dict(FAST_SWITCHING) if name != "adamw" else {}
    if name == "projfactor":
        opts = dict(rank=4, update_gap=3)
    whole, whole_opt = _whole_model_run(name, batches, **opts)
    per_layer, per_layer_opt, reports = _per_layer_run(name, batches, **opts)
    _assert_same(whole, per_layer)  # same arithmetic in the same order per matrix: bitwise
    if name not in ("adamw", "projfactor"):
        assert switch_report(per_layer_opt) == switch_report(whole_opt)
        assert sum(switch_report(per_layer_opt).values()) > 0
    assert all(r["grad_norm"] > 0 and r["nonfinite_units"] == 0 for r in reports)


def test_grad_norm_is_the_global_norm():
    batches = _batches(steps=1, micro=1)
    model = _model()
    b = batches[0][0]
    model(b[:, :-1], b[:, 1:]).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
    _, _, reports = _per_layer_run("lotus", batches, **FAST_SWITCHING)
    assert reports[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["lotus", "galore"])
def test_low_rank_accumulation_equals_the_k_times_batch(name):
    """k micro-batches with R accumulated (not G) on non-switch steps == one step on the k-times batch."""
    k = 3
    batches = _batches(steps=10, micro=k)
    big = [[torch.cat(step)] for step in batches]  # the same sequences as one micro-batch
    opts = dict(rank=4, update_gap=4, verify_gap=3, gamma=0.5)
    whole, whole_opt = _whole_model_run(name, big, **opts)
    per_layer, per_layer_opt, reports = _per_layer_run(name, batches, **opts)
    _assert_same(whole, per_layer, atol=2e-6)
    assert switch_report(per_layer_opt) == switch_report(whole_opt)
    # The saving is real: most steps kept only R for the projected matrices (their norm is then not the G norm).
    projected_steps = sum(r["grad_norm"] is None for r in reports)
    assert projected_steps >= 5, reports


def test_accumulation_keeps_only_R_between_micro_batches():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="lotus", rank=4, verify_gap=100))
    stepper = OptimizerInBackward(opt, units_of(model), grad_accum=2)
    batches = _batches(steps=2, micro=2)
    checked = 0
    for step in batches:
        for i, b in enumerate(step):
            stepper.begin_micro_batch(i)
            model(b[:, :-1], b[:, 1:]).backward()
            if i == 0 and stepper._projected_ids:  # second step: every projected matrix has its basis
                checked += 1
                projected = opt.param_groups[0]["params"]
                assert all(p.grad is None for p in projected)
                for p in projected:
                    R = stepper._accumulated[id(p)]
                    assert R.numel() == 4 * max(p.shape)  # long side x r, never m x n
                assert all(p.grad is not None for p in opt.param_groups[1]["params"])
        stepper.end_step()
    assert checked == 1, "the second step should accumulate projections"


def test_per_unit_clipping_matches_clipping_each_unit_by_hand():
    batches = _batches(steps=3, micro=1)
    max_norm = 0.05
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="lotus", **FAST_SWITCHING))
    units = units_of(model)
    for step in batches:
        b = step[0]
        model(b[:, :-1], b[:, 1:]).backward()
        for unit in units:
            torch.nn.utils.clip_grad_norm_(unit, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    clipped, _, reports = _per_layer_run("lotus", batches, max_unit_norm=max_norm, **FAST_SWITCHING)
    _assert_same(model, clipped, atol=1e-6)
    assert reports[0]["grad_norm"] > max_norm * len(units) ** 0.5  # the clipping was active


def test_a_non_finite_unit_is_skipped_whole_and_the_others_update():
    batches = _batches(steps=1, micro=1)
    before = _model()
    poisoned_unit = []

    def poison(unit):
        if not poisoned_unit:  # the first unit backward completes (lm_head, in one process)
            poisoned_unit.extend(unit)
            unit[0].grad.view(-1)[0] = float("nan")

    model, opt, reports = _per_layer_run("lotus", batches, before_update=poison, **FAST_SWITCHING)
    assert reports[0]["nonfinite_units"] == 1 and reports[0]["grad_norm"] != reports[0]["grad_norm"]  # NaN
    bad = {id(p) for p in poisoned_unit}
    for p, q in zip(model.parameters(), before.parameters()):
        if id(p) in bad:  # weights and state untouched (a unit stepped on the device may hold zero state at step 0)
            st = opt.state.get(p)
            assert torch.equal(p, q) and (not st or (st["step"] == 0 and not st["exp_avg"].any()))
        else:
            assert not torch.equal(p, q)


def test_stop_updates_nothing_after_the_first_non_finite_unit():
    batches = _batches(steps=1, micro=1)
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, OptimConfig(name="lotus", **FAST_SWITCHING))
    order = []

    def poison(unit):
        order.append(unit)
        if len(order) == 2:
            unit[0].grad.view(-1)[0] = float("inf")

    stepper = OptimizerInBackward(opt, units_of(model), on_nonfinite="stop", before_update=poison)
    b = batches[0][0]
    stepper.begin_micro_batch(0)
    model(b[:, :-1], b[:, 1:]).backward()
    report = stepper.end_step()
    assert report["halted"] and report["nonfinite_units"] == 1
    changed = {id(p) for p, q in zip(model.parameters(), before) if not torch.equal(p, q)}
    assert changed == {id(p) for p in order[0]}  # only the unit before the bad one: nothing after it updated


def test_units_cover_every_parameter_once():
    model = _model()
    units = units_of(model)
    assert sorted(id(p) for u in units for p in u) == sorted(id(p) for p in model.parameters())
    assert len(units) == SMALL["n_layers"] + 3  # blocks, then embeddings, final norm and lm_head alone
    assert len(units_of(model, root_as_one_unit=True)) == SMALL["n_layers"] + 1


def test_bad_arguments_are_refused():
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="lotus", rank=4))
    with pytest.raises(ValueError, match="per-unit clipping"):
        OptimizerInBackward(opt, units_of(model), grad_accum=2, max_unit_norm=1.0)
    with pytest.raises(ValueError, match="on_nonfinite"):
        OptimizerInBackward(opt, units_of(model), on_nonfinite="ignore")


def test_per_layer_with_activation_checkpointing_equals_the_whole_model_step():
    """Recomputation in backward reads each block's weights before that block's hook updates them."""
    batches = _batches(steps=6, micro=1)
    whole, _ = _whole_model_run("lotus", batches, **FAST_SWITCHING)
    model = _model()
    model.activation_checkpointing = True
    opt = build_optimizer(model, OptimConfig(name="lotus", **FAST_SWITCHING))
    stepper = OptimizerInBackward(opt, units_of(model))
    for step in batches:
        b = step[0]
        stepper.begin_micro_batch(0)
        model(b[:, :-1], b[:, 1:]).backward()
        stepper.end_step()
    _assert_same(whole, model)


def test_a_matrix_missing_from_the_last_micro_batch_keeps_its_accumulated_R():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 24, bias=False)

    class TwoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Block(), Block()])
            self.head = torch.nn.Linear(24, 1)

        def forward(self, x, use_first=True):
            h = self.layers[1].q_proj(x)
            if use_first:
                h = h + self.layers[0].q_proj(x)
            return self.head(h).square().mean()

    def make():
        torch.manual_seed(0)
        model = TwoBlocks()
        return model, build_optimizer(model, OptimConfig(name="lotus", rank=4, verify_gap=100))

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 16, generator=g) for _ in range(6)]
    whole, whole_opt = make()
    per_layer, opt = make()
    stepper = OptimizerInBackward(opt, units_of(per_layer), grad_accum=2)
    for step in range(3):
        a, b = xs[2 * step], xs[2 * step + 1]
        (whole(a) / 2).backward()
        (whole(b, use_first=False) / 2).backward()  # layers[0] only in the first micro-batch
        whole_opt.step()
        whole_opt.zero_grad(set_to_none=True)
        stepper.begin_micro_batch(0)
        (per_layer(a) / 2).backward()
        stepper.begin_micro_batch(1)
        (per_layer(b, use_first=False) / 2).backward()
        report = stepper.end_step()
    assert report["grad_norm"] is None  # the last step accumulated R
    _assert_same(whole, per_layer, atol=1e-6)


class _CountingStats(Comm):
    """A statistics Comm that reduces over one rank but counts its calls, as a distributed one would issue them."""

    def __init__(self):
        self.calls = 0

    def reduce_stats(self, t):
        self.calls += 1
        return t


def test_one_statistics_reduction_per_step_for_every_unit():
    """Across ranks (a non-identity statistics Comm), ordinary steps reduce every unit's norm once at the end of the
    step, and the first step solves every unit's first basis together: one reduction, not one per unit; the run is
    still the whole-model run's."""
    batches = _batches(steps=5, micro=1)
    whole, _ = _whole_model_run("lotus", batches, **FAST_SWITCHING)
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="lotus", **FAST_SWITCHING))
    opt.stats_comm = counting = _CountingStats()
    units = units_of(model)
    stepper = OptimizerInBackward(opt, units)
    calls = []
    for step in batches:
        counting.calls = 0
        b = step[0]
        stepper.begin_micro_batch(0)
        model(b[:, :-1], b[:, 1:]).backward()
        report = stepper.end_step()
        calls.append(counting.calls)
        assert report["nonfinite_units"] == 0 and not report.get("torn_units")
    _assert_same(whole, model)
    assert len(units) > 3
    # step 1: the first bases together (1) + the plain units' end-of-step sum (1); checks reduce per checking unit
    assert calls[0] == 2 and min(calls) == 1, calls


class _Recorder:
    """Stands in for UnitStream: records what OptimizerInBackward asks of it, in order."""

    def __init__(self, log):
        self.log = log

    @contextlib.contextmanager
    def run(self, device):
        self.log.append(("enter", device.type))
        yield
        self.log.append(("exit",))

    def release(self, t):
        self.log.append(("release", id(t)))

    def join(self):
        self.log.append(("join",))


def test_unit_steps_run_inside_the_unit_stream_and_the_step_joins_it():
    batches = _batches(steps=2, micro=2)
    model = _model()
    opt = build_optimizer(model, OptimConfig(name="lotus", rank=4, verify_gap=100))
    log = []
    stepper = OptimizerInBackward(opt, units_of(model), grad_accum=2)
    stepper.stream = _Recorder(log)
    step_unit, project = opt.step_unit, opt.project_gradient
    opt.step_unit = lambda params, **kw: (log.append(("step_unit", [id(p.grad) for p in params])),
                                          step_unit(params, **kw))[1]
    opt.project_gradient = lambda p: (log.append(("project", id(p.grad))), project(p))[1]
    for step in batches:
        for i, b in enumerate(step):
            stepper.begin_micro_batch(i)
            (model(b[:, :-1], b[:, 1:]) / 2).backward()
        stepper.end_step()
        log.append(("end",))
    inside, released = False, set()
    for event in log:
        if event[0] in ("step_unit", "project"):
            assert inside, event  # optimizer work only on the unit stream
            grads = event[1] if event[0] == "step_unit" else [event[1]]
            released.update(grads)
        elif event[0] == "enter":
            assert not inside and event[1] == "cpu"
            inside = True
        elif event[0] == "exit":
            inside = False
        elif event[0] == "release":
            released.discard(event[1])  # every gradient the stream read is released before it is dropped
    assert not released
    assert sum(e[0] == "project" for e in log) > 0  # the first micro-batch's R, on the stream too
    ends = [i for i, e in enumerate(log) if e == ("end",)]
    joins = [i for i, e in enumerate(log) if e == ("join",)]
    assert len(joins) == len(ends) and all(j == e - 1 for j, e in zip(joins, ends))  # joined last in each step


class _FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_stream(self, other):
        self.log.append((self.name, "wait_stream", other.name))


def test_unit_stream_on_cuda_waits_records_and_joins_in_order(monkeypatch):
    """No GPU here: torch.cuda's stream API replaced by fakes that log the calls UnitStream makes."""
    from lotus_dist.optim.unit_stream import UnitStream

    log = []
    current = {"s": _FakeStream(log, "reduce_scatter")}
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream(log, "optimizer"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["s"])

    @contextlib.contextmanager
    def use(stream):
        before, current["s"] = current["s"], stream
        log.append(("enter", stream.name))
        yield
        current["s"] = before
        log.append(("exit", stream.name))

    monkeypatch.setattr(torch.cuda, "stream", use)

    class Grad:  # a CUDA tensor made on the reduce-scatter stream
        device = torch.device("cuda", 0)

        def record_stream(self, stream):
            log.append(("grad", "record_stream", stream.name))

    cuda = torch.device("cuda", 0)
    us = UnitStream()
    with us.run(cuda):
        log.append(("kernels", torch.cuda.current_stream().name))
    us.release(Grad())
    with us.run(cuda):
        pass
    current["s"] = _FakeStream(log, "default")  # the end of the step runs on the default stream
    us.join()
    us.join()  # nothing new to join: no call
    assert log == [
        ("optimizer", "wait_stream", "reduce_scatter"), ("enter", "optimizer"), ("kernels", "optimizer"),
        ("exit", "optimizer"), ("grad", "record_stream", "optimizer"),
        ("optimizer", "wait_stream", "reduce_scatter"), ("enter", "optimizer"), ("exit", "optimizer"),
        ("default", "wait_stream", "optimizer"),
    ]


def test_unit_stream_does_nothing_off_cuda(monkeypatch):
    from lotus_dist.optim.unit_stream import UnitStream

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda used on CPU")

    for name in ("Stream", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    us = UnitStream()
    t = torch.ones(3)
    with us.run(t.device):
        t.add_(1)
    us.release(t)
    us.join()
    assert torch.equal(t, torch.full((3,), 2.0))


def test_the_step_verdict_is_global_and_rolls_counters_back_on_every_rank():
    """Two ranks' partial values, summed as the step's all-reduce sums them: a unit masked on one rank only is
    non-finite for the step and torn, on both; its counters go back on both; a unit masked on both is not torn."""
    from lotus_dist.optim.in_backward import StepReport
    from lotus_dist.optim.unit_step import UnitStep

    def rank(finite_units):  # two units; the first one's shard finite or not on this rank
        states = [{"step": 5, "tau": 2}, {"step": 5}]
        steps = []
        for st, finite in zip(states, finite_units):
            st["step"] += 1  # the update advanced the counters, as _step_unit_on_device does before masking
            f = torch.tensor(finite)
            steps.append(UnitStep(torch.tensor(1.0 if finite else float("nan")), f, f,
                                  [(st, 5, st.get("tau"))], local=True))
        return StepReport(steps, 0.0, 0, False, exact=True, stop=False), states

    for finite_on_rank0 in (True, False):
        reports = [rank([finite_on_rank0, True]), rank([False, True])]
        summed = torch.stack([torch.stack(r.partials()) for r, _ in reports]).sum(0).tolist()
        for report, states in reports:
            out = report.resolve(summed)
            assert out["nonfinite_units"] == 1 and out["torn_units"] == (1 if finite_on_rank0 else 0)
            assert states[0]["step"] == 5 and states[1]["step"] == 6  # alike on both ranks
