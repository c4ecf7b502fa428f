"""Refresh batches are cut from global shapes (issue 25): every rank cuts at the same matrices, whatever its shard.

The distributed form of the hang (3 gloo ranks) is tests/distributed/test_refresh_uneven.py; here the optimizer's
``_refresh_batches`` runs on each simulated rank's gradient shards of the same global matrices, with the real
``MatrixComm`` on a fake process group (no communication is needed to cut batches).
"""

import pytest
import torch

from lotus_dist.distributed.matrix_comm import MatrixComm, chunk_sizes
from lotus_dist.distributed.capacity import fake_process_group
from lotus_dist.optim import LowRankAdamW, build_optimizer
from lotus_dist.optim.job import _Job
from lotus_dist.optim.refresh import REFRESH_BATCH_BYTES
from lotus_dist.train.config import ConfigError, OptimConfig, load_config
from script_loader import load_script

WORLD = 3
# One block of the distributed test's model (dim 64, ffn 172), twice: (shape, Shard dim, side, fallback), as planned
# for 3 ranks (down_proj's columns do not split evenly: it falls back to Shard(0) with a left projector).
MATRICES = [((64, 64), 0, "right", False)] * 4 + [((172, 64), 0, "right", False)] * 2 + [((64, 172), 0, "left", True)]
MATRICES = MATRICES * 2


class _Shard:
    """A DTensor parameter as LowRankAdamW sees it (duck-typed, see tensors._local): the global shape, and this rank's
    gradient shard behind ``to_local``."""

    def __init__(self, shape, local_grad):
        self.shape, self.grad = torch.Size(shape), _Local(local_grad)


class _Local:
    def __init__(self, t):
        self.t = t

    def to_local(self):
        return self.t


def _cuts(solver: str, cap: int, rank: int) -> list[list[int]]:
    opt = LowRankAdamW([{"params": [torch.nn.Parameter(torch.zeros(2, 2))], "rank": 8, "solver": solver}])
    opt.refresh_batch_bytes = cap
    group = opt.param_groups[0]
    jobs = []
    for i, (shape, dim, side, fallback) in enumerate(MATRICES):
        local = list(shape)
        local[dim] = chunk_sizes(shape[dim], WORLD)[rank]  # rank 2's shards are shorter
        p = _Shard(shape, torch.zeros(local))
        opt.set_comm(p, MatrixComm(None, shape, side, 8, dim, fallback, owner=i % WORLD))
        jobs.append(_Job(group, p, {}, side, 8))
    index = {id(job): i for i, job in enumerate(jobs)}
    return [[index[id(job)] for job in batch] for batch in opt._refresh_batches(jobs)]


@pytest.mark.parametrize("solver", ["rsvd", "svd"])
def test_every_rank_cuts_the_refresh_at_the_same_matrices(solver):
    with fake_process_group(WORLD):
        for mb in (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12):  # the old rule split these unevenly
            cap = int(mb * 2**20)
            cuts = [_cuts(solver, cap, rank) for rank in range(WORLD)]
            assert cuts[1] == cuts[0] and cuts[2] == cuts[0], (solver, mb, cuts)
            assert sorted(i for batch in cuts[0] for i in batch) == list(range(len(MATRICES)))
        assert len(_cuts(solver, int(0.04 * 2**20), 0)) >= 3  # the distributed test's cap splits the refresh


def test_refresh_batch_mb_is_validated_and_reaches_the_optimizer():
    assert OptimConfig().refresh_batch_mb * 2**20 == REFRESH_BATCH_BYTES
    for bad in ("0", "-1"):
        with pytest.raises(ConfigError, match="optim.refresh_batch_mb"):
            load_config(overrides=[f"optim.refresh_batch_mb={bad}"])
    cfg = load_config(overrides=["optim.refresh_batch_mb=0.5", "model.dim=32", "model.n_layers=1"])
    from lotus_dist.model.llama import Llama, llama_config

    model = Llama(llama_config("tiny", dim=32, n_layers=1, n_heads=4, ffn_dim=64, vocab_size=50))
    assert build_optimizer(model, cfg.optim).refresh_batch_bytes == 2**19
    assert build_optimizer(model, OptimConfig()).refresh_batch_bytes == REFRESH_BATCH_BYTES


def test_replay_finds_the_reported_disagreement_and_none_after():
    """scripts/replay_refresh.py on llama_350m lotus at 64 ranks: the old rule has rank 63 end a batch at matrix 90
    (the issue's replay), the new rule cuts the same batches on every rank."""
    replay = load_script("scripts/replay_refresh.py", "replay_refresh")
    got = replay.replay("llama_350m", "lotus", 64, REFRESH_BATCH_BYTES)
    assert got["before"] == "NO r63@90" and got["after"].startswith("yes"), got
