#!/usr/bin/env python
"""Basis refresh at LLaMA-7B shapes on gloo ranks: every matrix solved together (batched, the optimizer's way)
against one matrix after another (each with its own collectives, the way it was before), side by side.

    python scripts/bench_refresh.py                  # rsvd, 2 ranks, 2 layers (14 matrices), r = 256, ~2 min on 2 cores
    python scripts/bench_refresh.py --nproc 4 --layers 1 --rank 1024

The matrices are a layer's seven projections at 7B shapes (4096 x 4096 attention, 11008 x 4096 / 4096 x 11008
MLP), each rank holding its FSDP row shard of a random gradient; rsvd is the distributed sketch solver (lotus), svd
the exact solve on each matrix's owner (galore). Prints medians over --reps of the wall time of one full refresh,
the collectives each form issued (counted by lotus_dist.counters), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]  # q, k, v, o; gate, up; down


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from lotus_dist.counters import COUNTERS
    from lotus_dist.distributed.matrix_comm import MatrixComm, chunk_sizes
    from lotus_dist.distributed.sharding_plan import lpt_assign, projector_side, solver_cost
    from lotus_dist.optim.basis_solvers import projector_steps
    from lotus_dist.optim.solver_rounds import run_batched

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = SHAPES * args.layers
    costs = {str(i): solver_cost(m, n, args.rank, "svd") for i, (m, n) in enumerate(shapes)}
    owners = lpt_assign(costs, world)
    mats = []
    for i, (m, n) in enumerate(shapes):
        side = projector_side(m, n)
        dim = 0 if side == "right" else 1  # FSDP shards the long side (the states' side)
        sizes = chunk_sizes((m, n)[dim], world)
        g = torch.Generator().manual_seed(i)
        local = torch.randn(*(sizes[rank] if d == dim else (m, n)[d] for d in range(2)), generator=g)
        comm = MatrixComm(dist.group.WORLD, (m, n), side, args.rank, dim, False, owners[str(i)])
        mats.append((local, side, comm))

    def refresh(solver: str, batched: bool):
        steps = [projector_steps(solver, G, side, args.rank, gen=torch.Generator().manual_seed(i), comm=comm)
                 for i, (G, side, comm) in enumerate(mats)]
        return run_batched(steps) if batched else [run_batched([s])[0] for s in steps]

    rows = []
    for solver in args.solvers.split(","):
        times = {True: [], False: []}
        counts = {}
        for rep in range(args.reps):
            for batched in (True, False) if rep % 2 == 0 else (False, True):  # interleaved: load hits both
                dist.barrier()
                COUNTERS.reset()
                t0 = time.perf_counter()
                refresh(solver, batched)
                dist.barrier()
                times[batched].append(time.perf_counter() - t0)
                counts[batched] = COUNTERS.collectives
        rows.append((solver, statistics.median(times[True]), statistics.median(times[False]), counts[True],
                     counts[False]))
    if rank == 0:
        print(f"## refresh of {len(shapes)} matrices at 7B shapes, r={args.rank}, {world} gloo ranks (1 thread each), "
              f"median of {args.reps}")
        print(f"{'solver':>7} {'batched s':>10} {'per-matrix s':>13} {'ratio':>6} {'collectives batched':>20} "
              f"{'per-matrix':>11}")
        for solver, tb, tp, cb, cp in rows:
            print(f"{solver:>7} {tb:10.2f} {tp:13.2f} {tb / tp:6.2f} {cb:>20} {cp:>11}")
        print("ratio = batched / per-matrix wall time (below 1: faster). rsvd: one all-reduce per solver stage for "
              "all matrices; svd: one gather and one broadcast per owner, the owners solving at the same time.")
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--solvers", default="rsvd", help="rsvd,svd adds the exact solve on owners (minutes on a CPU)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           __file__, "--worker", f"--layers={args.layers}", f"--rank={args.rank}", f"--reps={args.reps}",
           f"--solvers={args.solvers}"]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
