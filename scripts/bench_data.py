#!/usr/bin/env python
"""Does the data pipeline keep up with the trainer? Throughput of the training stream alone, measured side by side
in one run, against the tokens per second a GPU consumes (derived from FLOPs, not measured).

Data: the embedded corpus (data.source=embedded, C4-format shards), tokenizer tokenizer/embedded.model, seq_len 256,
micro-batch 8, the default shuffle buffer; every figure is the median of --repeats fresh streams, timed after a
warm-up that fills the shuffle buffer. The configurations are measured round by round (each once per round), so
that changes in the load of a shared machine hit all of them alike.

1. pipeline alone: tokens/s when the consumer takes batches as fast as it can, without and with prefetch
   (data.prefetch: a background thread makes the next batches, PrefetchStream).
2. overlap: the consumer "computes" a fixed time per batch; the time it waits in next() shows how much data time
   prefetch hides ("wait hidden": 1 - wait / the same consumer's wait without prefetch). Two consumers: ``sleep``
   (time.sleep frees the CPU and the GIL, as a GPU step that only waits would) and ``torch ops`` (small CPU tensor
   ops, each releasing and retaking the GIL like a kernel launch: it shares the cores and the GIL with the worker
   thread, whose Python parts -- JSON, shuffle, packing -- hold it).
3. data.split=global vs node at world sizes 1, 2, 4, 8 (rank 0, no prefetch): under global every rank tokenises the
   whole global batch and keeps its slice, so the tokens/s each rank receives divide by the world size; under node
   each rank reads only its own documents.
4. needed: tokens/s per GPU = MFU x peak FLOP/s / flops_per_token(model, seq_len) for llama_60m and llama_350m
   (default: 40 % MFU of an H200's 989 TFLOP/s dense bf16), and the ratio measured pipeline / needed.

    python scripts/bench_data.py             # about two minutes on 2 CPU cores
    python scripts/bench_data.py --quick     # under 20 s: fewer batches and repeats (noisier figures)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sentencepiece  # noqa: E402
import torch  # noqa: E402

from lotus_dist.data import build_train_stream, load_tokenizer  # noqa: E402
from lotus_dist.model.llama import flops_per_token, llama_config  # noqa: E402
from lotus_dist.train.config import load_config  # noqa: E402

TOKENIZER = "tokenizer/embedded.model"
MODELS = ("llama_60m", "llama_350m")
WORLDS = (1, 2, 4, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few batches and 2 repeats: a smoke test in under 20 s")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=None,
                   help="micro-batches timed per measurement (default 400, --quick 50); divided by the world "
                        "size for split=global in section 3, so that each measurement tokenises about as much")
    p.add_argument("--repeats", type=int, default=None, help="measurements per figure, median shown (default 5, "
                   "--quick 2)")
    p.add_argument("--depths", default="2,8", help="prefetch depths to measure (data.prefetch; the default is 2)")
    p.add_argument("--compute-ms", type=float, default=None,
                   help="consumer time per batch in section 2 (default: 1.25 x the measured data time per batch, "
                        "so that prefetch can hide all of it)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak (H200 dense bf16: 989)")
    p.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for the needed rate")
    p.add_argument("--cache-dir", default=None, help="data.cache_dir for the embedded corpus (default "
                   "~/.cache/lotus_dist)")
    args = p.parse_args(argv)
    args.batches = args.batches or (50 if args.quick else 400)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.depths = [int(d) for d in args.depths.split(",")]
    return args


def make_stream(args, tok, *, split="global", world=1, prefetch=0):
    overrides = ["data.source=embedded", f"data.tokenizer={TOKENIZER}", f"data.split={split}",
                 f"data.prefetch={prefetch}"]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    data = load_config(None, overrides).data
    return build_train_stream(data, tok, seq_len=args.seq_len, micro_batch_size=args.micro_batch, rank=0,
                              world_size=world, seed=0)


class TorchOps:
    """A consumer step made of small CPU tensor ops (each releases and retakes the GIL, as kernel launches do)."""

    def __init__(self):
        self.x = torch.ones(64, 64)

    def ops(self, n: int) -> None:
        for _ in range(n):
            self.x.mul_(1.0)

    def calibrate(self, target_s: float) -> int:
        """The number of ops that take ``target_s`` alone."""
        start = time.perf_counter()
        self.ops(2000)
        return max(1, round(target_s / ((time.perf_counter() - start) / 2000)))


def measure_once(args, tok, *, batches, compute=None, **stream_kw) -> dict:
    """One fresh stream: tokens/s this rank receives, and per micro-batch the ms waited in next() and the ms per step
    (wait + compute). ``compute``: what the consumer does after each batch."""
    stream = make_stream(args, tok, **stream_kw)
    for _ in range(3):  # warm-up: fills the shuffle buffer, starts the worker
        next(stream)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        next(stream)
        waited += time.perf_counter() - t
        if compute is not None:
            compute()
    elapsed = time.perf_counter() - start
    if hasattr(stream, "close"):
        stream.close()
    return {"tokens_s": batches * args.micro_batch * args.seq_len / elapsed, "wait_ms": waited / batches * 1e3,
            "step_ms": elapsed / batches * 1e3}


def measure(args, tok, configs: dict) -> dict:
    """Medians of --repeats measurements of each configuration, taken round by round (every configuration once per
    round), so that changes in the machine's load hit all of them alike."""
    runs = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, kw in configs.items():
            runs[name].append(measure_once(args, tok, **kw))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def needed_tokens_s(args) -> dict[str, tuple[float, float]]:
    """model -> (training FLOPs per token, tokens/s one accelerator consumes at args.mfu of its peak)."""
    out = {}
    for name in MODELS:
        fpt = flops_per_token(llama_config(name), args.seq_len)
        out[name] = fpt, args.mfu * args.peak_tflops * 1e12 / fpt
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    tok = load_tokenizer(TOKENIZER)
    started = time.perf_counter()
    tokens_per_batch = args.micro_batch * args.seq_len
    print("# data pipeline benchmark")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
          f"{torch.__version__}, sentencepiece {sentencepiece.__version__}; load average at start "
          f"{os.getloadavg()[0]:.2f} (other processes share these cores)")
    print(f"data: embedded corpus, tokenizer {TOKENIZER} (vocab {tok.vocab_size}), seq_len {args.seq_len}, "
          f"micro-batch {args.micro_batch} ({tokens_per_batch} tokens); median of {args.repeats} fresh streams x "
          f"{args.batches} micro-batches{' (--quick)' if args.quick else ''}")

    # Sections 1 and 3 are measured together, interleaved (section 1's "no prefetch" is section 3's global at 1).
    pool = {("prefetch", d): {"batches": args.batches, "prefetch": d} for d in [0, *args.depths]}
    for world in WORLDS[1:]:  # global: each micro-batch tokenises world x as much, so fewer of them
        pool[("global", world)] = {"batches": max(8, args.batches // world), "split": "global", "world": world}
    for world in WORLDS:
        pool[("node", world)] = {"batches": args.batches, "split": "node", "world": world}
    alone = measure(args, tok, pool)
    alone[("global", 1)] = alone[("prefetch", 0)]

    print("\n## 1. pipeline alone (consumer takes batches as fast as it can; data.split=global, world 1)")
    print(f"{'':<20} {'tokens/s':>10} {'ms/batch':>9}")
    for depth in [0, *args.depths]:
        r = alone[("prefetch", depth)]
        label = f"prefetch depth {depth}" if depth else "no prefetch"
        print(f"{label:<20} {r['tokens_s']:>10,.0f} {r['step_ms']:>9.2f}")

    data_ms = alone[("prefetch", 0)]["step_ms"]
    compute_ms = args.compute_ms if args.compute_ms is not None else 1.25 * data_ms
    torch_ops = TorchOps()
    n_ops = torch_ops.calibrate(compute_ms / 1e3)
    consumers = {"sleep": lambda: time.sleep(compute_ms / 1e3), "torch ops": lambda: torch_ops.ops(n_ops)}
    overlap = measure(args, tok, {(kind, depth): {"batches": args.batches, "compute": compute, "prefetch": depth}
                                  for kind, compute in consumers.items() for depth in [0, *args.depths]})
    print(f"\n## 2. overlap: the consumer computes {compute_ms:.2f} ms per batch"
          f"{'' if args.compute_ms is not None else ' (1.25 x the data time above)'}; wait = time in next()")
    print(f"{'consumer':<10} {'':<17} {'wait ms/batch':>13} {'step ms/batch':>13} {'tokens/s':>10} "
          f"{'wait hidden':>11}")
    for (kind, depth), r in overlap.items():
        label = f"prefetch depth {depth}" if depth else "no prefetch"
        serial_wait = overlap[(kind, 0)]["wait_ms"]
        hidden = f"{max(0.0, 1 - r['wait_ms'] / serial_wait):.0%}" if depth else "-"
        print(f"{kind:<10} {label:<17} {r['wait_ms']:>13.2f} {r['step_ms']:>13.2f} {r['tokens_s']:>10,.0f} "
              f"{hidden:>11}")

    print("\n## 3. tokens/s each rank receives, by world size (rank 0, no prefetch)")
    print(f"{'world':>5} {'split=global':>13} {'split=node':>11}")
    per_rank = {world: {split: alone[(split, world)]["tokens_s"] for split in ("global", "node")} for world in WORLDS}
    for world in WORLDS:
        print(f"{world:>5} {per_rank[world]['global']:>13,.0f} {per_rank[world]['node']:>11,.0f}")

    needed = needed_tokens_s(args)
    print(f"\n## 4. needed per GPU (derived, not measured: {args.mfu:.0%} MFU x {args.peak_tflops:g} TFLOP/s / "
          f"flops_per_token at seq_len {args.seq_len}, vocab 32000)")
    print(f"{'model':<11} {'GFLOP/token':>11} {'tokens/s/GPU':>13}")
    for name, (fpt, rate) in needed.items():
        print(f"{name:<11} {fpt / 1e9:>11.3f} {rate:>13,.0f}")
    print("\nratio pipeline / needed (per rank; >= 1 keeps up, as measured on this machine's CPU)")
    print(f"{'world':>5} {'split':<7} " + " ".join(f"{name:>11}" for name in MODELS))
    for world in WORLDS:
        for split in ("global", "node"):
            ratios = " ".join(f"{per_rank[world][split] / needed[name][1]:>11.2f}" for name in MODELS)
            print(f"{world:>5} {split:<7} {ratios}")
    print(f"\n({time.perf_counter() - started:.1f} s; load average at the end {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
