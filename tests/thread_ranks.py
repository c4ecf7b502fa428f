"""Ranks as threads for single-process tests of the sharded optimizer: an all-reduce through a barrier, a Comm of a
long-side-sharded matrix, and the harness that runs one function per rank and surfaces a thread's failure."""

import threading

import torch

from lotus_dist.optim.subspace import Comm


class Exchange:
    def __init__(self, world):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def allreduce(self, rank, t):
        self.slots[rank] = t
        self.barrier.wait()
        total = self.slots[0]
        for other in self.slots[1:]:
            total = total + other  # same order on every rank: identical results
        self.barrier.wait()
        return total


class ShardComm(Comm):
    """One 'rank' (a thread) of a long-side-sharded matrix: sums go through the exchange."""

    def __init__(self, ex, rank, long_len):
        self.ex, self.rank, self.long_len = ex, rank, long_len

    def reduce(self, t):
        return self.ex.allreduce(self.rank, t)

    def reduce_stats(self, t):
        return self.ex.allreduce(self.rank, t)

    def sketch(self, gen, rows, cols, device):
        full = torch.randn(self.long_len, cols, generator=gen, device=device)
        return torch.tensor_split(full, self.ex.world)[self.rank]


def run_ranks(ex: Exchange, rank_main) -> None:
    """``rank_main(rank)`` on one thread per rank of ``ex``; a failing rank aborts the barrier, the test sees it."""
    errors = []

    def guarded(rank):
        try:
            rank_main(rank)
        except Exception as e:  # surface thread failures in the test
            errors.append(e)
            ex.barrier.abort()

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(ex.world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
