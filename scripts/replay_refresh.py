"""Replay step 1's refresh batches of the recipes at many world sizes: do all ranks cut them at the same matrices?

For each recipe (configs/<model>.yaml) and method (lotus: rsvd, galore: exact svd) the model is built on ``meta``
and planned for W ranks (the FSDP plan: side, Shard dim, fallback); every rank's local gradient shard follows
FSDP2's uneven chunk rule. On step 1 every projected matrix solves its first basis, so the refresh holds them all,
in optimizer order. "before" is the rule of earlier releases (sized from the local shard), reproduced here; "after"
is ``LowRankAdamW._refresh_batches`` (optim/refresh_batches.py: from the largest rank's piece of the global matrix,
``Comm.batch_shape``). A rank whose batches differ from rank 0's would issue batched collectives of other sizes: a
hang on NCCL. The new rule's cut reads nothing of the rank, so it is computed once.

    python scripts/replay_refresh.py [--models llama_350m llama_1b llama_7b] [--worlds 8 12 16 ...] [--mb 256]
                                     [--linalg]   # and count step 1's QR/eigh/SVD calls on tiny (issue 25 item 4)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lotus_dist.distributed.matrix_comm import chunk_sizes  # noqa: E402
from lotus_dist.distributed.sharding_plan import plan_for_model  # noqa: E402
from lotus_dist.model.llama import Llama, llama_config, shape_overrides  # noqa: E402
from lotus_dist.optim import route_parameters  # noqa: E402
from lotus_dist.optim.refresh_batches import cut_batches, workspace_bytes  # noqa: E402
from lotus_dist.train.config import load_config  # noqa: E402

SOLVERS = {"lotus": "rsvd", "galore": "svd"}
WORLDS = (8, 12, 16, 24, 32, 48, 64, 96)


def old_need(local: tuple[int, int], shape: tuple[int, int], fallback: bool, solver: str, k: int) -> int:
    """The earlier rule: the local gradient shard's numel, or its side lengths plus (fallback) the global rows."""
    if solver in ("svd", "online_pca"):
        return local[0] * local[1] * 4
    return (local[0] + local[1] + (shape[0] if fallback else 0)) * k * 8


def batch_shape(mp, world: int) -> tuple[int, int]:
    """``MatrixComm.batch_shape``: the largest rank's piece (FSDP2's chunk rule puts it on rank 0)."""
    piece = list(mp.shape)
    piece[mp.shard_dim] = max(chunk_sizes(mp.shape[mp.shard_dim], world))
    return tuple(piece)


def step1_cuts(mcfg, rank_r: int, oversample: int, proj_type: str, method: str, world: int,
               cap: int) -> tuple[list, list]:
    """Every rank's step-1 refresh batches (lists of matrix indices) under the old and the new rule."""
    with torch.device("meta"):
        model = Llama(mcfg)
    solver = SOLVERS[method]
    plan = plan_for_model(model, world, rank_r, proj_type, solver)
    matrices = [plan.matrices[name] for name, _ in route_parameters(model)[0]]  # optimizer order
    new = cut_batches([workspace_bytes(batch_shape(mp, world), solver, mp.rank, oversample) for mp in matrices], cap)
    before = []
    for rank in range(world):
        old = []
        for mp in matrices:
            local = list(mp.shape)
            local[mp.shard_dim] = chunk_sizes(mp.shape[mp.shard_dim], world)[rank]
            old.append(old_need(tuple(local), mp.shape, mp.fallback, solver, mp.rank + oversample))
        before.append(cut_batches(old, cap))
    return before, [new] * world  # the new rule reads nothing of the rank


def agreement(cuts: list) -> str:
    """'yes (n)': every rank cuts the same n batches; 'NO rX@m': a batch of rank X ends at matrix m (from 1), rank 0's
    does not (the first such rank and batch)."""
    odd = [r for r, c in enumerate(cuts) if c != cuts[0]]
    if not odd:
        return f"yes ({len(cuts[0])})"
    first = next(i for i, (a, b) in enumerate(zip(cuts[0], cuts[odd[0]])) if a != b)
    return f"NO r{odd[0]}@{cuts[odd[0]][first][-1] + 1}"


def replay(model_name: str, method: str, world: int, cap: int) -> dict:
    cfg = load_config(REPO / "configs" / f"{model_name}.yaml")
    oversample = cfg.optim.oversample if cfg.optim.oversample is not None else 8
    before, after = step1_cuts(llama_config(cfg.model.name, **shape_overrides(cfg.model)), cfg.optim.rank, oversample,
                               cfg.optim.proj_type or "std", method, world, cap)
    return {"before": agreement(before), "after": agreement(after)}


def linalg_calls(method: str, model_name: str = "tiny") -> tuple[int, int, dict]:
    """(projected matrices, stages x matrices, the decompositions step 1's refresh runs) of one process on the CPU,
    counted where they reach the backend (a TorchDispatchMode): on CUDA each is a host sync."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from lotus_dist.optim import build_optimizer

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("linalg_qr", "_linalg_eigh", "_linalg_svd", "linalg_cholesky_ex"):
                self.calls[name.strip("_").replace("linalg_", "")] += 1
            return func(*args, **(kwargs or {}))

    cfg = load_config(REPO / "configs" / f"{model_name}.yaml", [f"optim.name={method}"])
    torch.manual_seed(0)
    model = Llama(llama_config(cfg.model.name, **{**shape_overrides(cfg.model), "vocab_size": 256}))
    opt = build_optimizer(model, cfg.optim)
    projected = [p for _, p in route_parameters(model)[0]]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with Count() as mode:
        opt.step()
    stages = (cfg.optim.power_iters if cfg.optim.power_iters is not None else 2) + 2 if method == "lotus" else 1
    return len(projected), stages * len(projected), dict(mode.calls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama_350m", "llama_1b", "llama_7b"])
    ap.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    ap.add_argument("--mb", type=float, default=None, help="optim.refresh_batch_mb (default: the config's)")
    ap.add_argument("--linalg", action="store_true", help="also count step 1's decompositions (tiny, one process)")
    args = ap.parse_args(argv)
    if args.linalg:
        print("| tiny, step 1 (one process) | matrices | one call per matrix and stage | decompositions run |")
        print("|---|---|---|---|")
        for method in SOLVERS:
            n, per_matrix, calls = linalg_calls(method)
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
            print(f"| {method} | {n} | {per_matrix} | {sum(calls.values())} ({kinds}) |")
        print()
    cap_mb = args.mb if args.mb is not None else load_config(None).optim.refresh_batch_mb
    cap = int(cap_mb * 2**20)
    print(f"step 1 refresh batches, optim.refresh_batch_mb={cap_mb:g}: 'yes (n)' = every rank cuts the same n batches;"
          f" 'NO rX@m' = a batch of rank X ends at matrix m (from 1) where rank 0's does not")
    print("| model | method | rule | " + " | ".join(f"W={w}" for w in args.worlds) + " |")
    print("|---|---|---|" + "---|" * len(args.worlds))
    bad_after = 0
    for model_name in args.models:
        for method in SOLVERS:
            rows = [replay(model_name, method, w, cap) for w in args.worlds]
            for rule in ("before", "after"):
                print(f"| {model_name} | {method} | {rule} | " + " | ".join(r[rule] for r in rows) + " |")
            bad_after += sum(r["after"].startswith("NO") for r in rows)
    print(f"ranks disagree after the fix in {bad_after} case(s)")
    return 1 if bad_after else 0


if __name__ == "__main__":
    sys.exit(main())
