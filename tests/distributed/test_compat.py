"""The torch-version shims of lotus_dist.distributed.compat: applied only where torch lacks the feature."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lotus_dist.distributed import compat


def test_shims_apply_only_to_older_torch():
    if torch.__version__ >= "2.8":
        assert compat.APPLIED == []
    else:  # 2.6 / 2.7: no list reduce_scatter on gloo, no public switch for FSDP2's reduce op
        assert {"gloo list reduce_scatter", "fsdp2 gradient divide factors"} <= set(compat.APPLIED)
    assert hasattr(torch.cpu.Stream, "record_event")  # FSDP2 on CPU needs it (added by the shim on 2.6)


def test_list_reduce_scatter_on_gloo(tmp_path):
    """The list form the collectives of this package use, sync and async, on one gloo rank."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        out = torch.empty(3)
        dist.reduce_scatter(out, [torch.arange(3.0)])
        assert out.tolist() == [0.0, 1.0, 2.0]
        out = torch.empty(2, 2)
        work = dist.reduce_scatter(out, [torch.ones(2, 2)], async_op=True)
        work.wait()
        assert out.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    finally:
        dist.destroy_process_group()
