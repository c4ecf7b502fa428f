"""The distribution hooks: two 'ranks' (threads) each hold a long-side shard of every projected matrix, talk only
through Comm (reduce / reduce_stats / sketch), and must follow the unsharded optimizer's trajectory."""

import pytest
import torch

from lotus_dist.optim import LowRankAdamW
from thread_ranks import Exchange, ShardComm, run_ranks

SHAPES = [(48, 20), (20, 48)]  # right projector: rows sharded; left projector: columns sharded
LONG_DIM = [0, 1]


def _grads(t):
    g = torch.Generator().manual_seed(500 + t)
    base = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(SHAPES)]
    return [b + 0.5 * torch.randn(b.shape, generator=g) for b in base]


GROUPS = {
    "lotus": dict(solver="rsvd", switch="displacement", gamma=0.5, verify_gap=3),
    "lotus_rho+fira": dict(solver="rsvd", switch="path_efficiency", gamma=0.99, window=3, t_min=3, residual="fira"),
    "grasswalk_rotate": dict(solver="grasswalk", switch="fixed", update_gap=4, moments="rotate"),
    "apollo": dict(solver="gaussian", switch="fixed", update_gap=4, residual="apollo_channel", scale=1.0),
    "apollo_mini": dict(solver="gaussian", switch="fixed", update_gap=4, residual="apollo_tensor", scale=128.0),
}


@pytest.mark.parametrize("kind", list(GROUPS))
def test_long_side_sharded_run_matches_unsharded(kind):
    steps, world = 14, 2
    torch.manual_seed(0)
    init = [0.1 * torch.randn(s) for s in SHAPES]

    full = [torch.nn.Parameter(w.clone()) for w in init]
    ref = LowRankAdamW([{"params": full, "rank": 4, **GROUPS[kind]}], weight_decay=0.01)
    for t in range(steps):
        for p, g in zip(full, _grads(t)):
            p.grad = g
        ref.step()

    ex = Exchange(world)
    out = {}

    def rank_main(rank):
        shards = [
            torch.nn.Parameter(torch.tensor_split(w, world, dim=d)[rank].clone()) for w, d in zip(init, LONG_DIM)
        ]
        opt = LowRankAdamW([{"params": shards, "rank": 4, **GROUPS[kind]}], weight_decay=0.01)
        opt.stats_comm = ShardComm(ex, rank, 0)
        for p, s, d in zip(shards, SHAPES, LONG_DIM):
            opt.set_comm(p, ShardComm(ex, rank, s[d]))
        for t in range(steps):
            for p, g, d in zip(shards, _grads(t), LONG_DIM):
                p.grad = torch.tensor_split(g, world, dim=d)[rank].clone()
            opt.step()
        out[rank] = (shards, opt)

    run_ranks(ex, rank_main)
    for i, d in enumerate(LONG_DIM):
        joined = torch.cat([out[r][0][i].detach() for r in range(world)], dim=d)
        assert torch.allclose(joined, full[i].detach(), atol=1e-5), (kind, i)
        n_bases = [out[r][1].state[out[r][0][i]]["n_bases"] for r in range(world)]
        assert n_bases == [ref.state[full[i]]["n_bases"]] * world  # same switch decisions on every rank
        assert torch.equal(out[0][1].state[out[0][0][i]]["projector"], out[1][1].state[out[1][0][i]]["projector"])
    assert ref.state[full[0]]["n_bases"] > 1
