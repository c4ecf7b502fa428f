"""Step-time model of the capacity planner: predicted seconds per optimizer step and MFU for candidate layouts.

A layout is a mesh (flat FSDP over all ranks, or HSDP with the shard group = the GPUs of one node and
``dist.replicate`` = nodes), a micro-batch size (with or without activation checkpointing) and whether gradients
are reduced on every micro-batch or on the last only (``dist.reduce_last_micro_batch``). The model, stated so the
numbers can be checked by hand (docs/distributed.md, "Choosing a multi-node layout"):

- compute: ``flops_per_token`` (lotus_dist/model/llama.py: 6 N + attention) x tokens at ``mfu`` x ``peak``;
  activation checkpointing recomputes the forward: x 4/3.
- communication, per rank, ring collectives (planner module docstring): all-gather / reduce-scatter of S bytes
  over W ranks move (W-1)/W S, an all-reduce 2 (W-1)/W S, each at the bandwidth of the slowest link its group
  crosses: ``intra`` (GB/s per GPU, NVLink) inside a node, ``inter`` (GB/s per GPU, the NIC) across nodes. Ranks
  fill nodes in order, so a shard group of at most ``gpus_per_node`` ranks stays inside a node.
- overlap: FSDP2 prefetches each unit's all-gather during the previous unit's compute and reduces each unit's
  gradients during the next unit's backward, so a micro-batch takes max(compute, busiest link) plus what cannot
  overlap: the first unit's all-gather and the last unit's reduce-scatter and all-reduce (one call's share each).
  Collectives on the same link add up; intra- and inter-node links run at the same time. The optimizer step's own
  traffic (sharded projectors' all-gathers, fallback matrices' reductions) follows backward and is not hidden;
  the optimizer's compute, refresh steps and data loading are not modelled.
- memory: the planner's per-rank state for that mesh, plus the gathered root unit (kept through forward and
  backward), two gathered blocks with their unsharded gradients (the one computing and the one prefetched), the
  activations below, and under flat FSDP with reduce-on-last the whole model's unsharded gradients. A layout fits
  when that is at most ``FIT_FRACTION`` of the GPU's memory (allocator slack, CUDA context, NCCL buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lotus_dist.model.llama import LlamaConfig, flops_per_token

FIT_FRACTION = 0.9
GB = 1e9  # bandwidths are in GB/s (10^9 bytes), as vendors state them
GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    """The target machine (``--dry-run`` flags); defaults: 8 x H100 SXM nodes, 400 Gb/s InfiniBand per GPU."""

    gpus_per_node: int = 8
    intra_gbps: float = 450.0  # GB/s per GPU inside a node (NVLink 4, one direction)
    inter_gbps: float = 50.0  # GB/s per GPU across nodes (400 Gb/s NIC per GPU)
    mfu: float = 0.4  # model FLOPs utilisation the compute reaches (no recomputation counted)
    peak_tflops: float = 989.0  # bf16 dense tensor-core peak per GPU
    gpu_gib: float = 80.0


@dataclass(frozen=True)
class Layout:
    replicate: int
    shard: int
    micro: int  # sequences per rank per forward
    accum: int  # micro-batches per optimizer step
    checkpointing: bool
    reduce_last: bool
    reduce_bytes: int  # 4: dist.reduce_dtype=fp32, 2: bf16

    @property
    def name(self) -> str:
        mesh = f"FSDP {self.shard}" if self.replicate == 1 else f"HSDP {self.replicate}x{self.shard}"
        return (f"{mesh}, micro {self.micro} x {self.accum}" + (", AC" if self.checkpointing else "")
                + (", reduce last" if self.reduce_last else ""))


def ring(world: int) -> float:
    return (world - 1) / world if world > 1 else 0.0


def fsdp_bytes(numel_full: int, block_numel: int, shard: int, replicate: int, gather_bytes: int,
               reduce_bytes: int) -> dict[str, float]:
    """Per-rank bytes of one micro-batch's FSDP collectives: every unit all-gathered in forward and the blocks
    again in backward (the root stays gathered), all gradients reduce-scattered over the shard group, and under
    HSDP the gradient shard all-reduced across the replicas."""
    return {
        "all_gather": ring(shard) * (numel_full + block_numel) * gather_bytes,
        "reduce_scatter": ring(shard) * numel_full * reduce_bytes,
        "all_reduce": 2 * ring(replicate) * -(-numel_full // shard) * reduce_bytes if replicate > 1 else 0.0,
    }


def activation_bytes(mcfg: LlamaConfig, micro: int, seq: int, checkpointing: bool, act_bytes: int = 2) -> int:
    """Activations saved for backward on one rank, bf16 compute with fp32 norms and loss (estimate, +-30 %).

    Per token and block: the two RMSNorms' fp32 copies and outputs, q k v, rotated q k, SDPA's output and its
    o_proj input (26 h bytes in bf16 terms), SwiGLU's gate, up, silu and product (8 f); the logits in bf16 plus
    their fp32 upcast and gradient (10 V). Checkpointing keeps each block's input and one block's activations.
    """
    h, f, v, n = mcfg.dim, mcfg.ffn_dim, mcfg.vocab_size, mcfg.n_layers
    tokens = micro * seq
    block = tokens * (26 * h + 8 * f) * act_bytes // 2
    saved = tokens * h * act_bytes * n + block if checkpointing else block * n
    return saved + tokens * v * 10


def working_bytes(mcfg: LlamaConfig, layout: Layout, seq: int, numel_full: int, block_numel: int,
                  root_numel: int, gather_bytes: int) -> int:
    """What a micro-batch holds beyond the sharded state: gathered units, unsharded gradients, activations."""
    block = block_numel // mcfg.n_layers
    grad_bytes = max(gather_bytes, layout.reduce_bytes)  # FSDP2 casts to the reduce dtype before reducing
    held = root_numel * (gather_bytes + grad_bytes) + 2 * block * (gather_bytes + grad_bytes)
    if layout.reduce_last and layout.accum > 1:
        # flat: every unit's unsharded gradient waits for the last micro-batch; HSDP: a partial shard per unit
        held += numel_full * grad_bytes if layout.replicate == 1 else -(-numel_full // layout.shard) * grad_bytes
    return held + activation_bytes(mcfg, layout.micro, seq, layout.checkpointing, gather_bytes)


def predict(layout: Layout, mcfg: LlamaConfig, seq: int, cluster: Cluster, comm: dict, optimizer_bytes: float,
            batch_size: int) -> dict:
    """Seconds per optimizer step for ``layout``. ``comm``: ``fsdp_bytes`` of one micro-batch for this mesh;
    ``optimizer_bytes``: the optimizer step's own per-rank bytes over the shard group (not overlapped)."""
    world = layout.replicate * layout.shard
    peak = cluster.peak_tflops * 1e12
    compute = flops_per_token(mcfg, seq) * layout.micro * seq / (cluster.mfu * peak)
    if layout.checkpointing:
        compute *= 4 / 3
    shard_link = "inter" if layout.shard > cluster.gpus_per_node else "intra"
    rep_link = "inter" if world > cluster.gpus_per_node else "intra"
    gbps = {"intra": cluster.intra_gbps, "inter": cluster.inter_gbps}
    units = mcfg.n_layers + 1
    calls = {"all_gather": 2 * mcfg.n_layers + 1, "reduce_scatter": units, "all_reduce": units}
    total = 0.0
    for micro in range(layout.accum):
        last = micro == layout.accum - 1
        kinds = ["all_gather"]
        if last or not layout.reduce_last or layout.replicate > 1:
            kinds.append("reduce_scatter")  # HSDP's reduce-on-last still reduce-scatters inside the node
        if last or not layout.reduce_last:
            kinds.append("all_reduce")
        busy = {"intra": 0.0, "inter": 0.0}  # seconds each link is busy (collectives on one link queue)
        exposed = 0.0
        for kind in kinds:
            link = rep_link if kind == "all_reduce" else shard_link
            seconds = comm[kind] / (gbps[link] * GB)
            busy[link] += seconds
            exposed += seconds / calls[kind]
        total += max(compute, *busy.values()) + exposed
    total += optimizer_bytes / (gbps[shard_link] * GB)
    flops = flops_per_token(mcfg, seq) * batch_size * seq
    return {"compute_s": compute * layout.accum, "step_s": total, "mfu": flops / (world * peak * total)}


def candidates(world: int, batch_size: int, cluster: Cluster) -> list[tuple[int, int, int, int]]:
    """(replicate, shard, micro, accum) to try: flat FSDP, HSDP with a node per shard group, every micro-batch size
    that divides the per-rank batch."""
    meshes = [(1, world)]
    g = cluster.gpus_per_node
    if world > g and world % g == 0:
        meshes.append((world // g, g))
    out = []
    for rep, shard in meshes:
        for micro in range(1, batch_size // world + 1):
            if batch_size % (micro * world) == 0:
                out.append((rep, shard, micro, batch_size // (micro * world)))
    return out


def evaluate(layout: Layout, mcfg: LlamaConfig, seq: int, batch_size: int, cluster: Cluster, gather_bytes: int,
             nums: dict) -> dict:
    """Memory, fit and predicted time of one layout; ``nums``: the planner's per-rank numbers for its mesh
    (``total`` state bytes, ``optimizer_step_bytes``, ``numel_full``, ``block_numel``, ``root_numel``)."""
    comm = fsdp_bytes(nums["numel_full"], nums["block_numel"], layout.shard, layout.replicate, gather_bytes,
                      layout.reduce_bytes)
    memory = nums["total"] + working_bytes(mcfg, layout, seq, nums["numel_full"], nums["block_numel"],
                                           nums["root_numel"], gather_bytes)
    return {"layout": layout, "memory": memory, "fits": memory <= FIT_FRACTION * cluster.gpu_gib * GIB,
            **predict(layout, mcfg, seq, cluster, comm, nums["optimizer_step_bytes"], batch_size)}


def plan_layouts(mcfg: LlamaConfig, seq: int, batch_size: int, world: int, cluster: Cluster, reduce_bytes: int,
                 gather_bytes: int, mesh_numbers: Callable[[int], dict], reduce_last: bool = True) -> list[dict]:
    """Every candidate layout that fits, with its memory and predicted time, fastest first.
    ``mesh_numbers(replicate)``: the planner's per-rank numbers for that mesh (see ``evaluate``);
    ``reduce_last=False`` leaves out reduce-on-last (optim.per_layer)."""
    rows = []
    for rep, shard, micro, accum in candidates(world, batch_size, cluster):
        for last in ((False, True) if accum > 1 and reduce_last else (False,)):
            for checkpointing in (False, True):  # the first that fits: recompute only when needed
                layout = Layout(rep, shard, micro, accum, checkpointing, last, reduce_bytes)
                row = evaluate(layout, mcfg, seq, batch_size, cluster, gather_bytes, mesh_numbers(rep))
                if row["fits"]:
                    rows.append(row)
                    break
    # fastest first; on a tie the simpler layout (no recomputation, no deferred reduction)
    return sorted(rows, key=lambda r: (round(r["step_s"], 4), r["layout"].checkpointing, r["layout"].reduce_last))


def report(rows: list[dict], configured: dict | None, cluster: Cluster, out: Callable[[str], None],
           bf16: dict | None = None) -> None:
    """Print the candidates (``plan_layouts``), the configured layout (an ``evaluate`` row; None: not a layout
    the trainer accepts) and the recommendation; ``bf16``: the recommended layout's row with
    dist.reduce_dtype=bf16, when that is not set."""
    out("")
    out(f"step time (per optimizer step; {cluster.gpus_per_node} GPUs/node, intra {cluster.intra_gbps:g} GB/s, "
        f"inter {cluster.inter_gbps:g} GB/s per GPU, compute at MFU {cluster.mfu:g} of {cluster.peak_tflops:g} "
        f"TFLOP/s, {cluster.gpu_gib:g} GiB/GPU; model and assumptions: lotus_dist/distributed/step_time.py)")
    out(f"{'layout':<46}{'memory':>11}{'compute':>10}{'step':>10}{'MFU':>8}")
    for r in [*rows, *([{**configured, "as_configured": True}] if configured else [])]:
        name = r["layout"].name + (" (as configured)" if r.get("as_configured") else "")
        fits = "" if r["fits"] else f"  > {FIT_FRACTION:g} x {cluster.gpu_gib:g} GiB: does not fit"
        out(f"{name:<46}{r['memory'] / GIB:>7.1f} GiB{r['compute_s']:>9.3f}s{r['step_s']:>9.3f}s"
            f"{100 * r['mfu']:>7.1f}%{fits}")
    if not rows:
        out("recommendation: no candidate fits; use more GPUs or a smaller global batch per GPU")
        return
    best = rows[0]["layout"]
    keys = [f"dist.replicate={best.replicate}", f"train.micro_batch_size={best.micro}",
            f"train.activation_checkpointing={str(best.checkpointing).lower()}"]
    if best.reduce_last:
        keys.append("dist.reduce_last_micro_batch=true")
    than = f"{configured['step_s'] / rows[0]['step_s']:.1f}x faster than as configured" if configured else \
        "as configured the batch does not split (train.batch_size is not a multiple of micro x world)"
    out(f"recommendation: {best.name}: {rows[0]['step_s']:.3f} s/step, MFU {100 * rows[0]['mfu']:.1f}%, {than} ("
        + " ".join(keys) + ")")
    if bf16 is not None:
        out(f"  and dist.reduce_dtype=bf16 (half the reduction bytes, each sum rounded to bf16): "
            f"{bf16['step_s']:.3f} s/step, MFU {100 * bf16['mfu']:.1f}%" + ("" if bf16["fits"] else ", does not fit"))


__all__ = ["Cluster", "Layout", "fsdp_bytes", "activation_bytes", "working_bytes", "predict", "candidates",
           "evaluate", "plan_layouts", "report", "ring", "FIT_FRACTION"]
