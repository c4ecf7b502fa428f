"""``Comm`` implementations over a process group: what LowRankAdamW needs to run on FSDP2 shards.

docs/algorithms.md section 11. One ``MatrixComm`` per projected matrix, over the FSDP shard group (the inner mesh dim;
under HSDP every replica group holds the same gradient shards and works on its own):

- normal case (sharded along the long side): R, moments and back-projection are local; ``sum_long`` sums the
  rsvd sketches (n x k) and the k x k Gram; the Gaussian sketch is drawn whole from the shared seed and each rank
  takes its rows (uneven shards included);
- fallback (a left projector on a ``Shard(0)`` matrix: the projected side is sharded): ``R = Σ_i A_iᵀ G_i`` is
  reduce-scattered by columns every step, so each rank keeps a 1/W column slice of the r x n state (moments,
  ``d_init``, path-efficiency buffers) and runs Adam on it; the update N is all-gathered for the back-projection
  (the bytes of one all-reduce, 1/W of the memory). rsvd orthonormalises the row-sharded sketch by CholeskyQR2
  (two k x k all-reduces) before all-gathering the new basis;
- the exact ``svd`` solver gathers G on the plan's owner rank, which solves and broadcasts the projector;
- a refresh step solves every switching matrix together (``solver_rounds.run_batched``): each solver stage's sums are
  one flat all-reduce for all of them, the owner solves are one gather per owner, every owner solving its own
  matrices at the same time, then one broadcast per owner of its new bases (``execute``);
- ``projectors="shard"``: each rank stores a 1/W row slice of the projector, all-gathered before use.

Every call goes through ``torch.distributed``'s module functions (``dist.all_reduce`` ...), so a test can count
them by patching the module, and is counted in ``lotus_dist.counters.COUNTERS`` (collectives and the bytes this rank
sends) for the step's metrics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lotus_dist.counters import COUNTERS, nbytes, to_host
from lotus_dist.optim.solver_rounds import Request, linalg_steps, orth_columns_steps, svd_projectors
from lotus_dist.optim.subspace import Comm

# optim.projectors once decided (``auto`` is resolved by sharding_plan.choose_projectors): whole on every rank, or row slices
PROJECTOR_LAYOUTS = ("replicate", "shard")


GROUP_DIMS: dict[int, tuple[str, ...]] = {}  # id(process group) -> the COUNTERS.bytes_by_dim keys it counts in


def counted(kind: str, whole_bytes: int, group) -> None:
    """Count one collective of ``kind`` on a whole tensor of ``whole_bytes`` over ``group`` (and in its mesh dim,
    where the group is one, ``GROUP_DIMS``)."""
    COUNTERS.collective(kind, whole_bytes, dist.get_world_size(group), GROUP_DIMS.get(id(group), ()))


def chunk_sizes(n: int, world: int) -> list[int]:
    """Sizes of ``torch.chunk(n, world)`` padded with empty chunks: DTensor's and FSDP2's uneven Shard rule."""
    size = -(-n // world) if n else 0
    return [max(0, min(size, n - i * size)) for i in range(world)]


def reduce_scatter_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Sum ``t`` over the ranks and keep this rank's rows (``sizes[i]`` rows for rank i, in order); the list form
    of reduce-scatter with chunks padded to the largest, which gloo and NCCL both take on every torch version."""
    rows = max(sizes)
    chunks = []
    for chunk in t.split(sizes):
        padded = t.new_zeros((rows, *t.shape[1:]))
        padded[: chunk.shape[0]] = chunk
        chunks.append(padded)
    out = t.new_empty((rows, *t.shape[1:]))
    counted("reduce_scatter", nbytes(out) * len(sizes), group)
    dist.reduce_scatter(out, chunks, group=group)
    return out[: sizes[dist.get_rank(group)]]


def all_gather_rows(t: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenate every rank's rows (``sizes[i]`` rows on rank i, ``chunk_sizes`` layout); gloo needs equal sizes,
    so each rank sends its rows padded to the largest. The ranks' blocks land in one buffer, and since only the tail
    ranks are short (chunk layout) the result is a view of its first rows: one full-size tensor, no concatenation."""
    rows = max(sizes)
    if t.shape[0] == rows and t.is_contiguous():
        send = t
    else:
        send = t.new_zeros((rows, *t.shape[1:]))
        send[: t.shape[0]] = t
    out = t.new_empty((rows * len(sizes), *t.shape[1:]))
    counted("all_gather", nbytes(out), group)
    dist.all_gather(list(out.chunk(len(sizes))), send, group=group)
    return out[: sum(sizes)]


class StatsComm(Comm):
    """The batched switch statistics: one all-reduce of the step's [L, s] fp32 rows over the shard group."""

    def __init__(self, group):
        self.group = group

    def reduce_stats(self, t: torch.Tensor) -> torch.Tensor:
        counted("all_reduce", nbytes(t), self.group)
        dist.all_reduce(t, group=self.group)
        return t


class MatrixComm(Comm):
    """Communication of one projected matrix whose gradient is ``Shard(shard_dim)`` over ``group``.

    ``shape`` is the global (m, n); ``side`` the projector side; ``fallback``: the sharded dim is the projected
    one (left projector, rows sharded); ``owner``: global rank that runs the exact svd; ``projectors``:
    "replicate" or "shard".
    """

    def __init__(self, group, shape: tuple[int, int], side: str, rank: int, shard_dim: int, fallback: bool,
                 owner: int, projectors: str = "replicate"):
        self.group = group
        self.world = dist.get_world_size(group)
        self.me = dist.get_rank(group)
        self.shape, self.side, self.r, self.shard_dim, self.fallback = tuple(shape), side, rank, shard_dim, fallback
        self.owner = owner
        if projectors not in PROJECTOR_LAYOUTS:  # "auto" is decided before (fsdp_optimizer.resolve_projectors)
            raise ValueError(f"MatrixComm: projectors must be one of {PROJECTOR_LAYOUTS}, got {projectors!r}")
        self.projectors = projectors
        self.sizes = chunk_sizes(self.shape[shard_dim], self.world)  # this matrix's shard sizes
        self.offset = sum(self.sizes[: self.me])
        self.full_projector = (self.shape[0], rank) if side == "left" else (rank, self.shape[1])
        self.proj_sizes = chunk_sizes(self.full_projector[0], self.world)  # projectors="shard": row slices
        self.proj_offset = sum(self.proj_sizes[: self.me])
        # fallback: this rank's column slice of the r x n low-rank state (DTensor's Shard(1) rule)
        self.long_sizes = chunk_sizes(self.shape[1], self.world)
        if fallback != (side == "left" and shard_dim == 0):
            raise ValueError(f"inconsistent plan: side {side}, Shard({shard_dim}), fallback {fallback}")

    # ------------------------------------------------------------------------------------------ reductions

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        counted("all_reduce", nbytes(t), self.group)
        dist.all_reduce(t, group=self.group)
        return t

    def reduce_projected(self, R: torch.Tensor) -> torch.Tensor:
        if not self.fallback:
            return R
        # The fallback's per-step Σ_i A_iᵀ G_i (r x n), reduce-scattered: this rank's r x n_j column slice.
        return reduce_scatter_rows(R.T.contiguous(), self.long_sizes, self.group).T.contiguous()

    def state_piece(self, shape, side):
        return (shape[0], self.long_sizes[self.me]) if self.fallback else tuple(shape)

    # --------------------------------------------------------------------------------------------- solvers

    def sketch(self, gen, rows, cols, device):
        if self.fallback:  # the long side (columns) is whole on every rank
            return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
        # The global sketch, drawn whole from the shared seed (identical on every rank), this rank's rows of it.
        full = torch.randn(self.shape[self.shard_dim], cols, generator=gen, device=device, dtype=torch.float32)
        return full[self.offset : self.offset + rows]

    def short_size(self, d: int) -> int:
        return self.shape[0] if self.fallback else d

    def batch_shape(self, shape):
        piece = list(shape)
        piece[self.shard_dim] = max(self.sizes)
        return tuple(piece)

    # ----------------------------------------------------------------------- batched solver hooks (run_batched)

    @property
    def batch_key(self):
        return id(self.group)  # every matrix of one optimizer shares the shard group: their requests batch

    def sum_long(self, t):
        if self.fallback:
            return t
        return (yield Request("sum", self, (t,)))

    def sum_short(self, t):
        if not self.fallback:
            return t
        return (yield Request("sum", self, (t,)))

    def orth_steps(self, Y):
        if not self.fallback:
            return (yield from orth_columns_steps(Y))  # local Householder, batched with the other matrices'
        # CholeskyQR2 of the row-sharded Y in float64 (on every device: it squares κ(Y)): Q = Y L⁻ᵀ with
        # L Lᵀ = Σ_i Y_iᵀ Y_i (one k x k sum), twice: one pass loses orthogonality as κ(Y)²·eps, the second restores
        # it. R = (L₂ᵀ L₁ᵀ) has a positive diagonal, the convention of the single-process Householder orth, so both
        # give the same Q. Should the Gram not be positive definite (κ(Y) ≳ 1e8), gather Y and use the Householder.
        # The sums, Cholesky factorisations and definiteness checks are batched over the matrices.
        Q = Y.double()
        for _ in range(2):
            L, info = yield from linalg_steps("cholesky", (yield Request("sum", self, (Q.T @ Q,))))
            if (yield Request("host", self, (info,))):
                full = yield Request("gather_rows", self, (Y.contiguous(), self.sizes))
                return (yield from orth_columns_steps(full))[self.offset : self.offset + Y.shape[0]]
            Q = torch.linalg.solve_triangular(L, Q.T, upper=False).T
        return Q.to(Y.dtype)

    def gather_short_steps(self, S):
        if not self.fallback:
            return S
        return (yield Request("gather_rows", self, (S.contiguous(), self.sizes)))

    def svd_steps(self, G, side, r):
        return (yield Request("owner_svd", self, (G, side, r)))

    @property
    def shards_projected_side(self) -> bool:
        return self.fallback

    def projected_steps(self, R):
        if not self.fallback:
            return R
        return (yield Request("reduce_scatter_rows", self, (R.T.contiguous(), self.long_sizes))).T.contiguous()

    def gather_long_steps(self, N):
        if not self.fallback:
            return N
        return (yield Request("gather_rows", self, (N.T.contiguous(), self.long_sizes))).T

    def execute(self, kind: str, requests: list[Request]) -> list:
        return {"sum": _sum_all, "host": _host_all, "gather_rows": _gather_rows_all,
                "reduce_scatter_rows": _reduce_scatter_rows_all, "owner_svd": _owner_svd_all}[kind](self.group,
                                                                                                   requests)

    # ------------------------------------------------------------------------------------------ projectors

    def projector_storage(self, shape):
        if self.projectors == "shard":
            return (self.proj_sizes[self.me], shape[1])
        return tuple(shape)

    def use_projector(self, stored: torch.Tensor) -> torch.Tensor:
        if self.projectors == "shard":
            return all_gather_rows(stored, self.proj_sizes, self.group)
        return stored

    def store_projector(self, stored: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        if self.projectors == "shard":
            stored.copy_(full[self.proj_offset : self.proj_offset + stored.shape[0]])
            return full.to(stored.dtype)
        return stored.copy_(full)

    def local_projector(self, P: torch.Tensor, side: str) -> torch.Tensor:
        # fallback: A's rows that multiply this rank's rows of G
        return P[self.offset : self.offset + self.sizes[self.me]] if self.fallback else P


def _sum_all(group, requests: list[Request]) -> list[torch.Tensor]:
    """Sum every request's tensor over ``group``: one flat all-reduce per dtype for all of them."""
    out: list = [None] * len(requests)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, req in enumerate(requests):
        by_dtype.setdefault(req.args[0].dtype, []).append(i)
    for indices in by_dtype.values():
        flat = torch.cat([requests[i].args[0].reshape(-1) for i in indices])
        counted("all_reduce", nbytes(flat), group)
        dist.all_reduce(flat, group=group)
        for i, piece in zip(indices, flat.split([requests[i].args[0].numel() for i in indices])):
            out[i] = piece.view_as(requests[i].args[0])
    return out


def _host_all(group, requests: list[Request]) -> list:
    """Read every request's scalar on the host: one sync for all of them."""
    return to_host(torch.stack([req.args[0].reshape(()).to(torch.float64) for req in requests]))


def _gather_rows_all(group, requests: list[Request]) -> list[torch.Tensor]:
    """``all_gather_rows`` of every request (tensor, row sizes per rank) in one all-gather: each rank sends its
    pieces padded to their largest, one after the other."""
    padded = []
    for req in requests:
        t, sizes = req.args
        buf = t.new_zeros((max(sizes), *t.shape[1:]))
        buf[: t.shape[0]] = t
        padded.append(buf)
    send = torch.cat([b.reshape(-1) for b in padded])
    world = dist.get_world_size(group)
    recv = send.new_empty(send.numel() * world)
    counted("all_gather", nbytes(recv), group)
    dist.all_gather(list(recv.chunk(world)), send, group=group)
    blocks = [block.split([b.numel() for b in padded]) for block in recv.chunk(world)]
    return [torch.cat([blocks[r][i].view_as(padded[i])[: req.args[1][r]] for r in range(world)])
            for i, req in enumerate(requests)]


def _reduce_scatter_rows_all(group, requests: list[Request]) -> list[torch.Tensor]:
    """``reduce_scatter_rows`` of every request (tensor, row sizes per rank) in one reduce-scatter: the block for
    rank j holds every request's rows for j, each padded to that request's largest."""
    me, world = dist.get_rank(group), dist.get_world_size(group)
    blocks = []
    for j in range(world):
        parts = []
        for req in requests:
            t, sizes = req.args
            piece = t.new_zeros((max(sizes), *t.shape[1:]))
            start = sum(sizes[:j])
            piece[: sizes[j]] = t[start : start + sizes[j]]
            parts.append(piece.reshape(-1))
        blocks.append(torch.cat(parts))
    out = torch.empty_like(blocks[0])
    counted("reduce_scatter", nbytes(out) * world, group)
    dist.reduce_scatter(out, blocks, group=group)
    results = []
    for req, piece in zip(requests, out.split([max(r.args[1]) * r.args[0][0].numel() for r in requests])):
        t, sizes = req.args
        results.append(piece.view(max(sizes), *t.shape[1:])[: sizes[me]])
    return results


def _owner_svd_all(group, requests: list[Request]) -> list[torch.Tensor]:
    """The exact svd of every request's matrix on its owner, all owners at once: one gather per owner of the
    (padded) shards of all its matrices, every owner solves its own, one broadcast per owner of its new bases."""
    me, world = dist.get_rank(group), dist.get_world_size(group)
    pieces = []  # this rank's padded shard of each matrix, shard rows first
    for req in requests:
        comm, (G, _, _) = req.comm, req.args
        Gt = G.movedim(comm.shard_dim, 0).contiguous()
        buf = Gt.new_zeros((max(comm.sizes), *Gt.shape[1:]))
        buf[: Gt.shape[0]] = Gt
        pieces.append(buf)
    owners = sorted({req.comm.owner for req in requests})
    mine = {}  # index -> the whole matrix, on its owner
    for owner in owners:
        idx = [i for i, req in enumerate(requests) if req.comm.owner == owner]
        send = torch.cat([pieces[i].reshape(-1) for i in idx])
        parts = [torch.empty_like(send) for _ in range(world)] if owner == me else None
        counted("gather", nbytes(send) * world, group)
        dist.gather(send, parts, dst=dist.get_global_rank(group, owner), group=group)
        if owner == me:
            split = [part.split([pieces[i].numel() for i in idx]) for part in parts]
            for j, i in enumerate(idx):
                comm = requests[i].comm
                rows = [split[r][j].view_as(pieces[i])[: comm.sizes[r]] for r in range(world)]
                mine[i] = torch.cat(rows).movedim(0, comm.shard_dim)
    # every owner solves only its own matrices (the same-shaped ones in one batched svd), all owners at the same time
    solved = dict(zip(mine, svd_projectors(list(mine.values()), [requests[i].args[1] for i in mine],
                                           [requests[i].args[2] for i in mine])))
    for i, P in solved.items():
        G = requests[i].args[0]
        # a failure becomes a NaN basis, broadcast like any other: every rank then takes the solver fallback together
        solved[i] = G.new_full(requests[i].comm.full_projector, float("nan")) if isinstance(P, Exception) \
            else P.to(G.dtype).contiguous()
    out: list = [None] * len(requests)
    for owner in owners:
        idx = [i for i, req in enumerate(requests) if req.comm.owner == owner]
        sizes = [requests[i].comm.full_projector[0] * requests[i].comm.full_projector[1] for i in idx]
        dtype = requests[idx[0]].args[0].dtype
        if owner == me:
            flat = torch.cat([solved[i].reshape(-1) for i in idx])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=requests[idx[0]].args[0].device)
        counted("broadcast", nbytes(flat), group)
        dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
        for i, piece in zip(idx, flat.split(sizes)):
            out[i] = piece.view(requests[i].comm.full_projector)
    return out


__all__ = ["GROUP_DIMS", "counted", "MatrixComm", "StatsComm", "all_gather_rows", "chunk_sizes", "reduce_scatter_rows"]
