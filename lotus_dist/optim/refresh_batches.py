"""How a refresh is cut into batches (``LowRankAdamW._refresh``): from global shapes only, never the local shard.

Each batch's solvers run in lockstep with one collective per stage for the whole batch, so every rank must cut its
batches at the same matrices: a rule that read the local shard (ranks whose shards are a row shorter) would cut
elsewhere on some ranks and their batched all-reduces would differ in size, which NCCL answers with a hang.
"""

from __future__ import annotations


def workspace_bytes(shape: tuple[int, int], solver: str, r: int, oversample: int) -> int:
    """Solver workspace of one matrix's refresh on a rank, from ``shape`` = ``Comm.batch_shape``: the largest rank's
    piece of the global matrix (the whole matrix in one process or on its ddp owner), the same on every rank. The
    exact svd sends that piece (fp32) to the matrix's owner; the sketch solvers hold (m + n) x (r + oversample)
    sketches (8 bytes: fp64 factors)."""
    m, n = shape
    if solver in ("svd", "online_pca"):
        return m * n * 4
    return (m + n) * (r + oversample) * 8


def cut_batches(needs: list[int], cap: int) -> list[list[int]]:
    """Indices of consecutive matrices in batches of at most ``cap`` bytes (a larger matrix is a batch alone)."""
    batches: list[list[int]] = []
    size = 0
    for i, need in enumerate(needs):
        if not batches or size + need > cap:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += need
    return batches


__all__ = ["cut_batches", "workspace_bytes"]
