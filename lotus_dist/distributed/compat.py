"""Shims for the older torch releases this package supports (``torch>=2.6`` in pyproject.toml).

* torch 2.6's FSDP2 runs on CUDA but not on CPU (the gloo path of this package: tests, CPU-only machines); CPU
  support came in torch 2.7. ``_cpu_stream_events`` and ``_cpu_copy_out_keeps_versions`` backport what 2.7
  changed, for CPU only.
* gloo has no list-form ``dist.reduce_scatter`` before torch 2.8: ``_gloo_list_reduce_scatter`` provides it.
* gloo's ``reduce_scatter_tensor`` treats ``ReduceOp.AVG`` as SUM in torch 2.6, 2.7 and some later releases
  (pytorch/pytorch#162338), and 2.6/2.7 gloo refuses an AVG all-reduce (HSDP), so FSDP2 on gloo would sum the
  ranks' gradients instead of averaging them. ``sum_reductions_on_gloo`` (called by ``apply_fsdp``) checks once
  what this gloo does and, where AVG is wrong, has FSDP2 reduce with SUM and divide by the world size itself:
  through the public ``FSDPModule.set_force_sum_reduction_for_comms`` (torch >= 2.8) or, on 2.6/2.7, through
  ``_gloo_sum_reductions_without_public_switch``.

Each shim is guarded by a feature check (a version check for the gloo reduce-scatter, which lives in C++), so on
a torch that has the feature nothing is patched (``APPLIED`` lists what was), and CUDA streams, tensors and NCCL
groups are never touched. The package ``lotus_dist.distributed`` imports this module first, so the shims are in
place before any of its modules runs a collective.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist


def _hsdp_needs_an_event() -> bool:
    """torch 2.6/2.7's HSDP post-backward asserts that the all-reduce recorded an event (later torch accepts
    None on CPU)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        return "assert all_reduce_event is not None" in inspect.getsource(FSDPParamGroup.post_backward)
    except (ImportError, AttributeError, OSError, TypeError):  # pragma: no cover
        return False


def _cpu_stream_events() -> bool:
    """FSDP2 calls ``stream.record_event()`` / ``stream.wait_event()`` on its streams, which on a CPU device are
    ``torch.cpu.Stream``. torch 2.6's lacks both (AttributeError: 'Stream' object has no attribute
    'record_event' at the first all-gather); torch 2.7 added them as no-ops (pytorch/pytorch#145935), but its
    ``record_event`` returns None, on which 2.7's HSDP backward asserts (2.6's too, once it has the method). Here
    ``record_event`` returns a (no-op) ``torch.cpu.Event``; ``wait_event`` is a no-op."""
    stream = getattr(torch.cpu, "Stream", None)
    if stream is None:  # pragma: no cover
        return False
    if hasattr(stream, "record_event"):
        try:
            returns_none = stream().record_event() is None
        except Exception:  # pragma: no cover - a record_event this shim does not know: leave it
            return False
        if not (returns_none and _hsdp_needs_an_event()):
            return False

    def record_event(self, event=None):
        event = torch.cpu.Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event) -> None:
        pass

    stream.record_event = record_event
    if not hasattr(stream, "wait_event"):
        stream.wait_event = wait_event
    return True


def _cpu_copy_out_keeps_versions() -> bool:
    """FSDP2's all-gather copy-out writes into the buffers the unsharded parameters view. On CUDA torch 2.6 does
    that with a kernel that leaves autograd's version counter alone; on CPU ``split_with_sizes_copy`` goes
    through ``copy_``, which bumps it, so the re-gather before backward (``reshard_after_forward=True``) makes
    autograd refuse the weights it saved in forward ("one of the variables needed for gradient computation has
    been modified by an inplace operation ... output 0 of AsStridedBackward0"). torch 2.7 wraps the copy-out in
    ``torch.autograd._unsafe_preserve_version_counter``; this does the same around 2.6's copy-out, on CPU only."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group_module
    except ImportError:  # pragma: no cover - another FSDP2 layout: nothing to patch
        return False
    original = getattr(group_module, "foreach_all_gather_copy_out", None)
    if original is None or getattr(original, "_lotus_keeps_versions", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):  # pragma: no cover - no source shipped: decide by the version instead
        source = "" if torch.__version__ < "2.7" else "_unsafe_preserve_version_counter"
    if "_unsafe_preserve_version_counter" in source:  # torch >= 2.7 preserves the counter itself
        return False
    set_version = torch._C._autograd._unsafe_set_version_counter  # (tensor, version) in torch 2.6

    def foreach_all_gather_copy_out(all_gather_result, fsdp_params, group):
        if all_gather_result[0].device.type != "cpu":
            return original(all_gather_result, fsdp_params, group)
        # The buffers may be created inside the call (first all-gather): those start at version 0.
        before = {id(t): (t, t._version) for p in fsdp_params for t in getattr(p, "all_gather_outputs", ())}
        result = original(all_gather_result, fsdp_params, group)
        for p in fsdp_params:
            for t in p.all_gather_outputs:
                version = before[id(t)][1] if id(t) in before else 0
                if not t.is_inference() and t._version != version:
                    set_version(t, version)
        return result

    foreach_all_gather_copy_out._lotus_keeps_versions = True
    group_module.foreach_all_gather_copy_out = foreach_all_gather_copy_out
    return True


def _is_gloo(group) -> bool:
    try:
        return group is not None and dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):  # pragma: no cover - not a process group of the default world
        return False


_DIVIDE_FACTORS: dict = {}  # torch < 2.8: reduce-scatter group -> gradient divide factor (set_gradient_divide_factor)


def _gloo_sum_reductions_without_public_switch() -> bool:
    """torch 2.6/2.7 FSDP2 reduces fp32/bf16 gradients with ``ReduceOp.AVG`` (reduce-scatter, and the HSDP
    all-reduce), which their gloo sums (reduce-scatter) or refuses (all-reduce: "Cannot use ReduceOp.AVG with
    Gloo"). FSDP2's own fp16 path -- SUM, then a division -- is right on gloo: this returns its factors for gloo
    groups, and for groups given a factor by ``set_gradient_divide_factor``. torch >= 2.8 has public switches
    for both instead, so this applies only where they are missing."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives
    except ImportError:  # pragma: no cover
        return False
    original = getattr(collectives, "_get_gradient_divide_factors", None)
    if (hasattr(FSDPModule, "set_force_sum_reduction_for_comms") or original is None
            or getattr(original, "_lotus_gloo_sum", False)):
        return False

    def _get_gradient_divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, *args, **kwargs):
        factor = _DIVIDE_FACTORS.get(reduce_scatter_group)
        if factor is None:
            factors = original(reduce_scatter_group, all_reduce_group, reduce_dtype, *args, **kwargs)
            if factors[0] is not None or not _is_gloo(reduce_scatter_group):
                return factors
            factor = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
        # A pre-divide factor that is not None selects SUM; 1.0 skips that division itself (``_div_if_needed``).
        return 1.0, float(factor)

    _get_gradient_divide_factors._lotus_gloo_sum = True
    collectives._get_gradient_divide_factors = _get_gradient_divide_factors
    return True


_GLOO_AVG_OK: bool | None = None  # what this torch's gloo does with an AVG reduce-scatter, once asked


def _gloo_avg_reduce_scatter_works(group) -> bool:
    """Collective on ``group`` (gloo), asked once per process: does an AVG reduce-scatter average? (Called
    through ``distributed_c10d``, out of sight of code that counts the ``dist.*`` calls of a training step.)"""
    global _GLOO_AVG_OK
    if _GLOO_AVG_OK is None:
        from torch.distributed import distributed_c10d as c10d

        out = torch.zeros(1)
        try:
            c10d.reduce_scatter_tensor(out, torch.ones(group.size()), op=dist.ReduceOp.AVG, group=group)
            _GLOO_AVG_OK = out.item() == 1.0
        except RuntimeError:
            _GLOO_AVG_OK = False
    return _GLOO_AVG_OK


def sum_reductions_on_gloo(modules, mesh) -> bool:
    """Collective (every rank of ``mesh`` calls it, as it calls ``fully_shard``). On a gloo mesh whose AVG
    reduce-scatter sums, have the FSDP2 ``modules`` (those ``fully_shard`` returned) reduce gradients with SUM and
    divide by the data-parallel size themselves. torch 2.6/2.7 are handled by the shim above without asking;
    elsewhere (NCCL, or a gloo that averages) nothing changes. Returns whether it switched modules."""
    group = mesh.get_group(mesh.ndim - 1)
    if not _is_gloo(group) or not modules or not hasattr(modules[0], "set_force_sum_reduction_for_comms"):
        return False
    if _gloo_avg_reduce_scatter_works(group):
        return False
    for module in modules:
        module.set_force_sum_reduction_for_comms(True)
    return True


def set_gradient_divide_factor(module, factor: float) -> None:
    """``FSDPModule.set_gradient_divide_factor`` (torch >= 2.8), also on torch 2.6/2.7, where the factor is
    kept per reduce-scatter group and so applies to every FSDP module on ``module``'s mesh."""
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(factor)
        return
    if "fsdp2 gradient divide factors" not in APPLIED:  # pragma: no cover - an FSDP2 this module does not know
        raise NotImplementedError("this torch's FSDP2 has no gradient divide factor")
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]  # 2.6/2.7: one or None
    for param_group in groups:
        if param_group is not None:
            _DIVIDE_FACTORS[param_group._reduce_scatter_process_group] = float(factor)


class _Pending:
    """The ``Work`` of an emulated ``reduce_scatter``: waits for the collective, then fills ``output``."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self, timeout=None):
        if self._work is not None:
            self._work.wait() if timeout is None else self._work.wait(timeout)
            self._work = None
            self._finish()
        return True

    def is_completed(self) -> bool:
        return self._work is None


def _gloo_list_reduce_scatter() -> bool:
    """``dist.reduce_scatter`` (the list form) on gloo raises "ProcessGroupGloo does not support reduce_scatter"
    before torch 2.8 (pytorch/pytorch#149869 added it). On a gloo group there this runs it as the tensor form
    (``reduce_scatter_tensor``, which 2.6's gloo has) when the chunks are equal -- they are at every call site of
    this package -- and as an all-reduce of all chunks otherwise; other groups, and torch >= 2.8, go to torch's own.
    The inner collective is called through ``torch.distributed.distributed_c10d``, so code that counts calls of
    ``dist.reduce_scatter`` (tests) sees one call, as on newer torch."""
    if torch.__version__ >= "2.8" or getattr(dist.reduce_scatter, "_lotus_gloo", False):
        return False
    from torch.distributed import distributed_c10d as c10d

    original = dist.reduce_scatter

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not _is_gloo(group if group is not None else c10d._get_default_group()):
            return original(output, input_list, op=op, group=group, async_op=async_op)
        rank = dist.get_rank(group)
        flat = torch.cat([t.reshape(-1) for t in input_list])
        if all(t.numel() == output.numel() for t in input_list):
            result = output.new_empty(output.numel())
            work = c10d.reduce_scatter_tensor(result, flat, op=op, group=group, async_op=async_op)
        else:
            start = sum(t.numel() for t in input_list[:rank])
            work = c10d.all_reduce(flat, op=op, group=group, async_op=async_op)
            result = flat[start : start + output.numel()]

        def finish():
            output.copy_(result.view(output.shape))

        if async_op:
            return _Pending(work, finish)
        finish()
        return None

    reduce_scatter._lotus_gloo = True
    dist.reduce_scatter = reduce_scatter
    c10d.reduce_scatter = reduce_scatter
    return True


APPLIED = [name for name, shim in (("torch.cpu.Stream.record_event", _cpu_stream_events),
                                    ("fsdp2 cpu copy-out version counter", _cpu_copy_out_keeps_versions),
                                    ("fsdp2 gradient divide factors", _gloo_sum_reductions_without_public_switch),
                                    ("gloo list reduce_scatter", _gloo_list_reduce_scatter))
           if shim()]

__all__ = ["APPLIED", "set_gradient_divide_factor", "sum_reductions_on_gloo"]
