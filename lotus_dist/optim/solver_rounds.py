"""Solver rounds: a basis solver is a generator that yields its collectives and small decompositions as
``Request``s (``x = yield from comm.sum_long(t)``); ``run_batched`` advances the solvers of every matrix switching
in a step in lockstep and hands each round's requests to the Comm in one batch, so a refresh costs one collective
per solver stage, not one per matrix and stage. The small decompositions (QR, eigh, SVD, Cholesky) are requests
too (``linalg_steps``), solved for every matrix of a round in one batched call per shape (``linalg_batch``): on
CUDA each call is a host sync. Here also the two local solvers the ``Comm`` hooks default to: the exact SVD
projector (GaLore) and the orthonormalisation of a basis (docs/algorithms.md sections 2 and 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator

import torch

from .linalg_batch import LOCAL_KINDS, run_stacked, solve_dtype


@dataclass
class Request:
    """A collective a solver needs (``kind``: "sum", "gather_rows", "host", "owner_svd", ...), to be run by
    ``comm.execute`` together with the same kind of request of other matrices; ``args`` are the kind's inputs."""

    kind: str
    comm: Any  # the Comm whose ``execute`` runs it (none for a local decomposition)
    args: tuple


def run_batched(solvers: list[Generator]) -> list[Any]:
    """Run solver generators in lockstep: each round, every solver still running has yielded one Request; requests
    of one kind (and one Comm group, ``comm.batch_key``) go to one ``execute`` call, in a fixed order on every rank;
    local decompositions (``LOCAL_KINDS``) go to ``run_stacked``, one batched call per kind and shape, and a failed
    one is raised inside its solver. Returns each solver's result, or the exception it raised (a failed solve, e.g.
    ``LinAlgError``)."""
    results: list[Any] = [None] * len(solvers)
    waiting: dict[int, Request] = {}

    def advance(i: int, value) -> None:
        try:
            if isinstance(value, torch.linalg.LinAlgError):
                waiting[i] = solvers[i].throw(value)
            else:
                waiting[i] = solvers[i].send(value)
        except StopIteration as done:
            results[i] = done.value
        except torch.linalg.LinAlgError as error:  # a degenerate gradient: the caller falls back, per matrix
            results[i] = error

    for i in range(len(solvers)):
        advance(i, None)
    while waiting:
        batches: dict[tuple, list[int]] = {}
        local: dict[str, list[int]] = {}
        for i in sorted(waiting):
            req = waiting[i]
            if req.kind in LOCAL_KINDS:  # no communication: grouped by shape in run_stacked
                local.setdefault(req.kind, []).append(i)
            else:
                batches.setdefault((req.kind, getattr(req.comm, "batch_key", id(req.comm))), []).append(i)
        current, waiting = waiting, {}
        for kind, indices in sorted(local.items()):
            for i, out in zip(indices, run_stacked(kind, [current[i].args[0] for i in indices])):
                advance(i, out)
        for (kind, _), indices in sorted(batches.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            outs = current[indices[0]].comm.execute(kind, [current[i] for i in indices])
            for i, out in zip(indices, outs):
                advance(i, out)
    return results


def _drive(steps: Generator):
    """Run one solver alone; re-raise its failure."""
    (result,) = run_batched([steps])
    if isinstance(result, Exception):
        raise result
    return result


def solver_dtype(G: torch.Tensor) -> torch.dtype:
    """Solvers run in fp32 at least: bf16/fp16 gradients are promoted, fp64 ones are not demoted."""
    return torch.promote_types(G.dtype, torch.float32)


def linalg_steps(kind: str, A: torch.Tensor):
    """One small decomposition (``linalg_batch.LOCAL_KINDS``) as a solver request; its outputs as a tuple."""
    return (yield Request(kind, None, (A,)))


def _top_singular(U: torch.Tensor, Vh: torch.Tensor, side: str, r: int) -> torch.Tensor:
    return U[:, :r].contiguous() if side == "left" else Vh[:r].contiguous()


def svd_projector_steps(G: torch.Tensor, side: str, r: int):
    """GaLore: exact top-r singular vectors of G itself (not Gᵀ, so signs match GaLore's code); a solver generator."""
    U, _, Vh = yield from linalg_steps("svd", G.to(solver_dtype(G)))
    return _top_singular(U, Vh, side, r)


def svd_projector(G: torch.Tensor, side: str, r: int) -> torch.Tensor:
    """``svd_projector_steps`` for one matrix alone."""
    return _drive(svd_projector_steps(G, side, r))


def svd_projectors(Gs: list[torch.Tensor], sides: list[str], rs: list[int]) -> list:
    """``svd_projector`` of several matrices, the same-shaped ones in one batched svd; a failed matrix's entry is
    its ``LinAlgError``."""
    outs = run_stacked("svd", [G.to(solver_dtype(G)) for G in Gs])
    return [o if isinstance(o, Exception) else _top_singular(o[0], o[2], side, r)
            for o, side, r in zip(outs, sides, rs)]


def orth_columns_steps(Y: torch.Tensor):
    """Householder QR (``linalg_batch.linalg_dtype``: float64 on the CPU) with the sign convention diag(R) > 0: the
    unique Q that Cholesky-QR (the form a row-sharded Y needs, see the distributed layer) also produces, so both
    paths give the same basis; a solver generator."""
    Q, R = yield from linalg_steps("qr", Y.to(solve_dtype(Y)))
    sign = torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q.dtype)
    return (Q * sign).to(Y.dtype)


def _orth(Y: torch.Tensor) -> torch.Tensor:
    return _drive(orth_columns_steps(Y))


__all__ = ["Request", "run_batched", "linalg_steps", "solver_dtype", "svd_projector", "svd_projector_steps",
           "svd_projectors", "orth_columns_steps"]
