"""Command line of ``pretrain.py``: ``--config FILE [section.key=value ...] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys

from lotus_dist.errors import UserError

EPILOG = """examples:
  python pretrain.py                                         # the embedded tiny default (CPU, minutes)
  python pretrain.py --config configs/llama_60m.yaml optim.name=galore train.steps=100
  torchrun --nproc_per_node=2 pretrain.py --config configs/tiny.yaml
  torchrun --nproc_per_node=8 pretrain.py --config configs/llama_60m.yaml dist.mode=ddp
  deepspeed --num_gpus=8 pretrain.py --config configs/llama_60m.yaml dist.mode=deepspeed
  python pretrain.py --config configs/llama_7b.yaml --dry-run dist.world_size=64
  python pretrain.py --config configs/llama_7b.yaml --dry-run dist.world_size=64 --inter-gbps 25 --mfu 0.35
"""

# --dry-run's step-time model: flag -> (step_time.Cluster field, type, help)
CLUSTER_FLAGS = {
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node (a shard group this size stays inside a node)"),
    "--intra-gbps": ("intra_gbps", float, "GB/s per GPU inside a node (NVLink)"),
    "--inter-gbps": ("inter_gbps", float, "GB/s per GPU between nodes (the NIC: 400 Gb/s = 50 GB/s)"),
    "--mfu": ("mfu", float, "model FLOPs utilisation of the compute, in (0, 1]"),
    "--peak-tflops": ("peak_tflops", float, "bf16 dense peak TFLOP/s per GPU"),
    "--gpu-gib": ("gpu_gib", float, "GPU memory in GiB"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="pretrain.py", description="Pre-train LLaMA with Lotus and the GaLore family of low-rank optimizers.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml", help="YAML recipe (default: configs/tiny.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="capacity planner: build on the meta device and print per-rank memory and communication")
    from lotus_dist.distributed.step_time import Cluster

    for flag, (field, kind, what) in CLUSTER_FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(),
                            help=f"--dry-run: {what} (default {getattr(Cluster(), field)})")
    # The deepspeed launcher appends --local_rank=N (the rank is read from LOCAL_RANK in the environment instead).
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)  # overrides before and after the --dry-run flags


def cluster_of(args):
    """The --dry-run cluster flags as a step_time.Cluster (defaults for those not given); one-line errors."""
    from lotus_dist.distributed.step_time import Cluster

    given = {field: getattr(args, field) for field, _, _ in CLUSTER_FLAGS.values() if getattr(args, field) is not None}
    if given and not args.dry_run:
        raise UserError(f"{', '.join(f for f, v in CLUSTER_FLAGS.items() if v[0] in given)} describe the cluster "
                        f"of --dry-run's step-time model: add --dry-run")
    for flag, (field, _, _) in CLUSTER_FLAGS.items():
        value = given.get(field)
        if value is not None and (value <= 0 or (field == "mfu" and value > 1)):
            raise UserError(f"{flag} {value}: must be " + ("in (0, 1]" if field == "mfu" else "positive"))
    return Cluster(**given)


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = None
    try:
        from lotus_dist.train.config import load_config

        cluster = cluster_of(args)
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from lotus_dist.distributed.capacity import dry_run

            dry_run(cfg, cluster=cluster)
            return 0
        from lotus_dist.distributed.modes import build_parallelism
        from lotus_dist.train.run_dir import RunDirectory
        from lotus_dist.train.trainer import Trainer

        mode = build_parallelism(cfg)
        with RunDirectory.open(cfg.run.dir, mode) as run:  # created and locked before anything is built
            result = Trainer(cfg, mode, run).fit()
        if mode.rank == 0:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            print(f"done: {shown}", flush=True)
        return 0
    except UserError as e:
        # Every rank reaches this with the same cause (inputs are checked before any collective that could hang).
        # One write of the whole line: under torchrun every rank reports on the same stream, and print() writes
        # the text and the newline separately (unbuffered stderr), which lets two ranks' lines interleave.
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it (train/signals.py)
        sys.stderr.write("error: interrupted: exiting at once, without saving (the last checkpoint is intact)\n")
        sys.stderr.flush()
        return 130
    finally:
        if mode is not None:
            mode.close()


if __name__ == "__main__":
    sys.exit(main())
