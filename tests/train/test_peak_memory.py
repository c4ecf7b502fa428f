"""PeakMemory on CPU against exact byte counts: known allocations, views, frees, autograd and backward hooks."""

import gc

import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

from lotus_dist.train.peak_memory import PeakMemory

F32 = 4  # bytes per float32 element


@pytest.fixture(autouse=True)
def no_stray_garbage():
    """Cyclic garbage of earlier tests collected inside a block would free storages and shift the figures."""
    gc.collect()


def measure(fn):
    with PeakMemory("cpu") as pm:
        fn()
    return pm.peak_bytes - pm.start_bytes, pm.end_bytes - pm.start_bytes


def test_start_counts_live_tensors_once():
    with PeakMemory("cpu") as before:
        pass
    x = torch.empty(1000)
    views = [x[1:], x.view(10, 100), x.t()]
    with PeakMemory("cpu") as after:
        pass
    assert after.start_bytes - before.start_bytes == 1000 * F32
    assert after.peak_bytes == after.start_bytes == after.end_bytes
    del views


def test_known_sequence_of_allocations_and_frees():
    keep = []

    def block():
        a = torch.empty(1000)  # 4000
        b = torch.empty(500)  # 6000
        del a  # 2000
        c = torch.empty(2000)  # 10000: the peak
        del b  # 8000
        keep.append(c)

    peak, end = measure(block)
    assert (peak, end) == (10000, 8000)


def test_views_and_in_place_ops_do_not_double_count():
    x = torch.zeros(1000)
    keep = []

    def block():
        v = x[10:]
        v.add_(1)
        x.mul_(2).clamp_(max=5)
        keep.extend([v, x.view(10, 100).t(), x.unsqueeze(0), x.as_strided((10,), (3,))])
        x.untyped_storage()  # a new Python handle on a counted storage is not a new storage

    assert measure(block) == (0, 0)


def test_in_place_resize_is_followed():
    z = torch.empty(0)
    assert measure(lambda: z.resize_(100)) == (100 * F32, 100 * F32)


def test_freed_inside_block_lowers_end():
    held = [torch.ones(1000)]

    def block():
        y = held.pop() * 2  # 4000 more at the peak
        del y

    assert measure(block) == (1000 * F32, -1000 * F32)


def test_storage_is_released_only_when_its_last_view_dies():
    keep = []

    def block():
        a = torch.empty(1000)
        v = a[500:]
        del a
        keep.append(v)

    assert measure(block) == (1000 * F32, 1000 * F32)
    with PeakMemory("cpu") as pm:
        keep.clear()
    assert pm.end_bytes - pm.start_bytes == -1000 * F32


def test_wrapper_subclass_counts_its_inner_tensors():
    w = TwoTensor(torch.ones(100), torch.ones(100))
    keep = []
    assert measure(lambda: keep.append(w + 1)) == (2 * 100 * F32, 2 * 100 * F32)


def test_linear_step_matches_hand_count():
    """loss = (x W^T).sum(), SGD step. Forward: y = x W^T (8x32) and the scalar loss; y dies after the sum.
    Backward: the root gradient (a scalar) is alive while grad W (32x64) is computed; it lands as W.grad
    (mm's transposed output is already W's layout, no copy). SGD without momentum updates in place."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 64))
    x = torch.randn(8, 64)
    opt = torch.optim.SGD([w], lr=0.1)
    keep = []

    def step():
        loss = (x @ w.t()).sum()
        loss.backward()
        opt.step()
        keep.append(loss)

    peak, end = measure(step)
    assert peak == F32 + F32 + 32 * 64 * F32
    assert end == F32 + 32 * 64 * F32  # loss and W.grad
    assert measure(lambda: opt.zero_grad(set_to_none=True)) == (0, -32 * 64 * F32)


def test_mlp_step_peak_holds_params_and_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 64)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with PeakMemory("cpu") as pm:
        model(x).square().mean().backward()
        opt.step()
    assert pm.start_bytes >= param_bytes
    assert pm.peak_bytes >= pm.start_bytes + param_bytes  # every grad is alive when the step runs
    assert pm.end_bytes - pm.start_bytes == param_bytes  # the grads stay; activations and graph are gone


def test_backward_hooks_are_seen():
    """Post-accumulate-grad hooks run inside backward (where optimizer-in-backward steps): an allocation there
    counts, and a gradient dropped there is subtracted."""
    p = nn.Parameter(torch.zeros(100))
    made = []

    def hook(param):
        made.append(torch.ones(10000))
        param.grad = None

    handle = p.register_post_accumulate_grad_hook(hook)
    keep = []

    def block():
        loss = (p * p).sum()
        loss.backward()
        keep.append(loss)

    peak, end = measure(block)
    handle.remove()
    assert len(made) == 1 and p.grad is None
    assert peak == F32 + F32 + 100 * F32 + 10000 * F32  # in the hook: loss, root gradient, p.grad, its tensor
    assert end == F32 + 10000 * F32  # loss and the hook's tensor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_known_sequence():
    """The allocator's own statistics; sizes are whole MiB, which it does not round."""
    mib = 2**20
    keep = []
    with PeakMemory("cuda") as pm:
        a = torch.empty(mib, dtype=torch.uint8, device="cuda")
        b = torch.empty(2 * mib, dtype=torch.uint8, device="cuda")  # 3 MiB: the peak
        del a, b
        keep.append(torch.empty(mib, dtype=torch.uint8, device="cuda"))
    assert (pm.peak_bytes - pm.start_bytes, pm.end_bytes - pm.start_bytes) == (3 * mib, mib)
