"""Capacity planner: per-rank memory and communication of adamw, galore, lotus and APOLLO (-Mini) for a world size,
without GPUs.

The model is built on the ``meta`` device and sharded with the real plan and the real FSDP2 over a *fake*
process group (rank 0 of ``dist.world_size``), so local shard shapes, uneven padding and the Shard(1) fallbacks
are exactly those of the real run. Rank 0 holds the largest shards (FSDP pads the tail ranks), so its numbers
are the per-rank maximum.

Cost model (bytes per rank on the wire, ring collectives over W ranks): all-gather and reduce-scatter of a
tensor of S bytes move (W-1)/W·S, an all-reduce 2(W-1)/W·S; a gather to an owner moves (W-1)/W·S into the
owner, a broadcast of S bytes reaches every rank. Activations are not counted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lotus_dist.model.llama import Llama, count_parameters, llama_config, shape_overrides
from lotus_dist.optim.methods import method_rank, resolve_parts
from lotus_dist.optim.reference_codes import reference_bytes
from lotus_dist.optim.state_codes import STATE_DTYPES, moment_bytes
from lotus_dist.optim.switching import STATS_WIDTH

from . import step_time
from .fsdp import apply_fsdp, mixed_precision
from .sharding_plan import (PROJECTOR_DTYPE_BYTES, PROJECTOR_ROW_BYTES, DistConfigError, Plan, choose_projectors,
                            default_projected, method_geometry, plan_for_model, projector_peak_bytes)
from .step_time import fsdp_bytes

METHODS = ("adamw", "galore", "lotus", "apollo", "apollo_mini")
LIMITER_SUMS = {"apollo_channel": 1, "apollo_tensor": 3}  # all-reduced scalars a step: ‖U‖² (and ‖N‖², ‖R‖²)
STATE_BYTES = 4  # projectors are fp32, the moments optim.state_dtype's (docs/algorithms.md section 4)


@contextmanager
def fake_process_group(world_size: int):
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise DistConfigError("dry_run plans on a fake process group: run it before (or instead of) init_distributed")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_config(cfg):
    return llama_config(cfg.model.name, **shape_overrides(cfg.model))


def _dtype_bytes(dtype: torch.dtype | None, default: int = 4) -> int:
    return default if dtype is None else torch.finfo(dtype).bits // 8


_ring = step_time.ring


def _parts(cfg, method: str) -> dict:
    """``method``'s parts with the config's keys applied (``resolve_parts``); {} for adamw."""
    return resolve_parts(dataclasses.replace(cfg.optim, name=method)) or {}


def _sharded(cfg, mcfg, mesh, world: int, replicate: int, method: str) -> tuple[nn.Module, Plan]:
    with torch.device("meta"):
        model = Llama(mcfg)
    projected = set() if method == "adamw" else default_projected(model)
    proj_type, solver = method_geometry(dataclasses.replace(cfg.optim, name=method))
    rank = method_rank(dataclasses.replace(cfg.optim, name=method))
    plan = plan_for_model(model, world, rank, proj_type, solver, replicate=replicate, projected=projected)
    apply_fsdp(model, mesh, plan, log_fn=lambda s: None)
    return model, plan


def _projector_bytes(cfg, method: str) -> dict[str, int]:
    """Bytes per stored projector element and per stored row (int8's scales) of ``method``
    (optim.projector_dtype): ``projector_peak_bytes``' keywords."""
    name = _parts(cfg, method).get("projector_dtype", "fp32")
    return {"stored_bytes": PROJECTOR_DTYPE_BYTES[name], "row_bytes": PROJECTOR_ROW_BYTES.get(name, 0)}


def _projectors(cfg, plan: Plan, method: str, per_layer: bool) -> str:
    """optim.projectors for this method's plan, decided by the rule dist.mode=fsdp uses (sharding_plan.choose_projectors)."""
    return choose_projectors(cfg.optim.projectors, plan, per_layer=per_layer, solver=_parts(cfg, method).get("solver"))


def _method_numbers(cfg, model: nn.Module, plan: Plan, method: str, gather_bytes: int, reduce_bytes: int,
                    projectors: str) -> dict:
    """Per-rank bytes of memory and communication for one method on one sharded meta model; ``projectors``:
    replicate or shard (resolved)."""
    w, rep = plan.shard_size, plan.replicate
    parts = _parts(cfg, method)
    q, k_over = parts.get("power_iters"), parts.get("oversample")
    shard_projectors = projectors == "shard"
    owner_refresh = method == "galore" or cfg.optim.refresh == "owner"
    limiter_sums = LIMITER_SUMS.get(parts.get("residual"), 0)

    stored = cfg.optim.state_dtype or "fp32"  # every group's moments (optim/state_codes.py)
    params = grads = moments = switch_state = 0
    by_dtype = dict.fromkeys(STATE_DTYPES, 0)  # the moments under each optim.state_dtype, for the table

    def add_moments(shape: tuple, numel: int, blocks: int) -> int:
        for name in STATE_DTYPES:
            by_dtype[name] += moment_bytes(name, shape, numel, blocks, STATE_BYTES)
        return moment_bytes(stored, shape, numel, blocks, STATE_BYTES)

    step_extra = switch = refresh = 0.0
    owner_in = [0.0] * w
    for name, p in model.named_parameters():
        local = p.to_local()
        params += local.numel() * STATE_BYTES  # sharded fp32 master weights (FSDP casts only the gathered copy)
        grads += local.numel() * STATE_BYTES  # FSDP2 casts reduced grads back to the master dtype
        mp = plan.matrices.get(name)
        if mp is None:
            # FSDP2 shards dim 0: int8 blocks are this rank's rows
            moments += add_moments(tuple(p.shape), local.numel(), local.shape[0] if local.dim() else 1)
            continue
        m, n = mp.shape
        r = mp.rank
        short, long_ = min(m, n), max(m, n)
        # The long side this rank's low-rank state covers: its shard of the weight's, or for a fallback (rows
        # sharded, states r×n) a column slice, since R = Σ_i A_iᵀ G_i is reduce-scattered by columns and the update
        # all-gathered (together the bytes of one r×n all-reduce). Rank 0's slice is the largest.
        long_local = math.ceil(n / w) if mp.fallback else local.shape[mp.state_dim]
        # int8: one block per long-side index (the sharded one); the format follows the global state shape
        moments += add_moments((mp.shape[mp.state_dim], r), long_local * r, long_local)
        if limiter_sums:  # APOLLO: GaLore's state at its rank plus the limiter's last norm (fira_norm)
            moments += STATE_BYTES
            step_extra += 2 * _ring(w) * limiter_sums * STATE_BYTES
        if mp.fallback:
            step_extra += 2 * _ring(w) * r * n * STATE_BYTES
        proj = mp.projector_shape[0] * mp.projector_shape[1]
        if method == "lotus":
            switch += 2 * _ring(w) * STATS_WIDTH * STATE_BYTES  # the policy's row of fp32 sums
            # Algorithm 1 compares each low-rank gradient with the one at the last switch (d_init), kept like a
            # moment (sharded the same way), in optim.reference_dtype's form.
            switch_state += reference_bytes(long_local, r, parts["reference_dtype"])
        k = min(r + k_over, short)
        if parts.get("solver") == "gaussian":
            pass  # drawn on every rank from the shared seed: no communication
        elif owner_refresh:
            owner_in[mp.owner] += _ring(w) * m * n * STATE_BYTES  # full G into the owner
            refresh += proj * STATE_BYTES if not shard_projectors else math.ceil(proj / w) * STATE_BYTES
        elif mp.fallback:
            # Sketch on the row-sharded short side: q all-reduces of Gᵀ Q (n×k), one of Qᵀ G (k×n), k×k Grams.
            refresh += 2 * _ring(w) * ((q + 1) * long_ * k + (q + 1) * k * k) * STATE_BYTES
        else:
            # docs/algorithms.md section 11: (q + 1) all-reduces of short×k sketches, one k×k Gram.
            refresh += 2 * _ring(w) * ((q + 1) * short * k + k * k) * STATE_BYTES
    if owner_refresh:
        refresh += max(owner_in)
    # plan.projector_peak_bytes: stored (rank 0's row slices when sharded) and the one gathered at a time
    stored_format = _projector_bytes(cfg, method)
    peak = projector_peak_bytes(plan, projectors, **stored_format)
    projector_bytes, transient = peak["stored"], peak["in_use"]
    whole = projector_peak_bytes(plan, "replicate", **stored_format)["stored"]
    gathers = _ring(w) * whole if shard_projectors else 0.0  # every projector all-gathered once per step

    numel_full = sum(p.numel() for p in model.parameters())
    root_numel = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("layers."))
    block_numel = numel_full - root_numel
    comm = fsdp_bytes(numel_full, block_numel, w, rep, gather_bytes, reduce_bytes)
    opt = moments + projector_bytes + switch_state
    return dict(
        params=params, grads=grads, moments=moments, projectors=projector_bytes, switch_state=switch_state,
        masters=0, optimizer=opt, **{f"moments_{name}": b for name, b in by_dtype.items()},
        projector_transient=transient, total=params + grads + opt + transient, all_gather=comm["all_gather"],
        reduce_scatter=comm["reduce_scatter"] + comm["all_reduce"],  # HSDP: the replicas' all-reduce too
        lowrank_step=step_extra, projector_gather=gathers, switch_check=switch, refresh=refresh,
        fallbacks=len(plan.fallbacks), projected=len(plan.matrices), projector_choice=projectors,
        numel_full=numel_full, block_numel=block_numel, root_numel=root_numel,
        optimizer_step_bytes=step_extra + gathers,
    )


def _per_layer_grads(model: nn.Module, plan: Plan, accum: int) -> int:
    """Gradient bytes per rank at the peak of a lotus step with optim.per_layer=true (optim/in_backward.py).

    One micro-batch: only one unit's gradient shards exist at a time (the largest unit). Accumulating: the plain
    parameters keep their full gradient shards and each projected matrix an R (like a moment) across micro-batches,
    plus one unit's gradient shards while that unit's hooks run. Switch/check steps accumulate G for the matrices
    concerned, so those steps peak higher (at most the whole-model gradient).
    """
    units: dict[str, int] = {}  # gradient bytes of each unit
    projected: dict[str, int] = {}  # of its projected matrices only
    kept = 0  # what accumulation keeps across micro-batches
    for name, p in model.named_parameters():
        local = p.to_local()
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        nbytes = local.numel() * STATE_BYTES
        units[unit] = units.get(unit, 0) + nbytes
        mp = plan.matrices.get(name)
        if mp is None:
            kept += nbytes
        else:
            projected[unit] = projected.get(unit, 0) + nbytes
            kept += (mp.rank * math.ceil(mp.shape[1] / plan.shard_size) if mp.fallback
                     else local.shape[mp.state_dim] * mp.rank) * STATE_BYTES
    if accum == 1:
        return max(units.values())
    return kept + max(projected.values(), default=0)


def _per_layer_numbers(lotus: dict, model: nn.Module, plan: Plan, accum: int, stored_format: dict) -> dict:
    """``lotus``: the whole-model numbers with the per-layer projector choice. Per-layer steps hold one unit's
    gathered projectors at a time (the largest block's)."""
    grads = _per_layer_grads(model, plan, accum)
    transient = projector_peak_bytes(plan, lotus["projector_choice"], per_layer=True, **stored_format)["in_use"]
    return {**lotus, "grads": grads, "projector_transient": transient,
            "total": lotus["params"] + grads + lotus["optimizer"] + transient}


def _ddp_numbers(cfg, mcfg, world: int) -> dict:
    """lotus under dist.mode=ddp/deepspeed (matrix-granular ZeRO-2, owner.py): the model whole on every rank (bf16
    where a CUDA run computes in bf16, with fp32 masters on the owners), every buffer of the step
    (owner_buckets.step_buffer_bytes: the fp32 buckets, receive buffers and own gradients, the gradients waiting
    for their bucket, the all-gather's buffers), its own parameters' optimizer state; per step one
    reduce-scatter of the gradients (fp32) and one all-gather of the weights, in the owner layout (padding
    included). Rank = the one holding the most."""
    from lotus_dist.optim import build_optimizer
    from lotus_dist.optim.reports import MOMENT_KEYS, PROJECTOR_KEYS

    from .owner_optimizer import owner_costs
    from .owner_buckets import build_layout, step_buffer_bytes

    with torch.device("meta"):
        model = Llama(mcfg)
    optim_cfg = dataclasses.replace(cfg.optim, name="lotus")
    opt = build_optimizer(model, optim_cfg)
    costs = owner_costs(opt)
    layout = build_layout(list(model.parameters())[::-1], world, cfg.dist.bucket_mb * 2**20,
                          state_bytes={k: mem for k, (mem, _) in costs.items()})
    opt.init_state()
    per_rank = [dict(moments=0, projectors=0, switch_state=0, masters=0) for _ in range(world)]
    for p, owner in zip(layout.params, layout.owners):
        r = per_rank[owner]
        for key, v in opt.state[p].items():
            if isinstance(v, torch.Tensor):
                kind = "moments" if key in MOMENT_KEYS else "projectors" if key in PROJECTOR_KEYS else "switch_state"
                r[kind] += v.numel() * v.element_size()
    # bf16 weights where a CUDA run computes in bf16: the model in bf16 on every rank, an fp32 master of each owned
    # parameter on its owner (optimizer-side state), gradients summed in fp32
    weight_bytes = _dtype_bytes(mixed_precision(cfg.train.dtype, "cuda")[0])
    if weight_bytes != STATE_BYTES:
        for p, owner in zip(layout.params, layout.owners):
            per_rank[owner]["masters"] += p.numel() * STATE_BYTES
    accum = max(1, math.ceil(cfg.train.batch_size / (cfg.train.micro_batch_size * world)))
    buffers = step_buffer_bytes(layout, accum, weight_bytes, STATE_BYTES)
    rank = max(range(world), key=lambda i: sum(per_rank[i].values()) + buffers[i]["peak"])
    worst = per_rank[rank]
    by_dtype = _owner_moments_by_dtype(opt, layout, rank)
    params = sum(p.numel() for p in model.parameters()) * weight_bytes
    padded = world * layout.stream
    optimizer = worst["moments"] + worst["projectors"] + worst["switch_state"] + worst["masters"]
    grads = buffers[rank]["peak"]
    return dict(params=params, grads=grads, moments=worst["moments"], projectors=worst["projectors"],
                switch_state=worst["switch_state"], masters=worst["masters"], optimizer=optimizer, projector_transient=0,
                **{f"moments_{name}": b for name, b in by_dtype.items()},
                total=params + grads + optimizer, all_gather=_ring(world) * padded * weight_bytes,
                reduce_scatter=_ring(world) * padded * STATE_BYTES,
                lowrank_step=0, projector_gather=0, switch_check=0, refresh=0, once_per_step=True,
                state_per_rank=[r["moments"] + r["projectors"] + r["switch_state"] + r["masters"] for r in per_rank],
                grads_per_rank=[b["own_grads"] for b in buffers], buffers_per_rank=buffers,
                largest_bucket=max((b.numel for b in layout.buckets), default=0) * STATE_BYTES,
                buckets=len(layout.buckets))


def _owner_moments_by_dtype(opt, layout, rank: int) -> dict[str, int]:
    """The moments ``rank`` owns (whole tensors) under each optim.state_dtype, in the layout planned for the
    configured one: a block is one long-side index of a low-rank moment, one row of a plain parameter's."""
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    out = dict.fromkeys(STATE_DTYPES, 0)
    for p, owner in zip(layout.params, layout.owners):
        if owner != rank:
            continue
        group = groups[id(p)]
        if group.get("rank") is None:
            shape, blocks = tuple(p.shape), p.shape[0] if p.dim() else 1
        else:
            side, r = opt._geometry(p, group)
            shape = (r, p.shape[1]) if side == "left" else (p.shape[0], r)
            blocks = shape[1] if side == "left" else shape[0]
        for name in STATE_DTYPES:
            out[name] += moment_bytes(name, shape, math.prod(shape), blocks, STATE_BYTES)
    return out


def resume_bytes(numbers: dict, largest_param: int) -> int:
    """What a resume holds at most before its first step: the weights and optimizer state it fills in place
    (dcp_util.load_sharded) and one stored item on its way in (at most the largest parameter, fp32 in the
    checkpoint). No gradients or activations: it stays below the step's TOTAL unless that parameter is large."""
    return numbers["params"] + numbers["optimizer"] + largest_param


def _fmt(b: float) -> str:
    if b == 0:
        return "0"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


ROWS = [
    ("params (fp32 shard)", "params"),
    ("grads (fp32 shard)", "grads"),
    ("moments", "moments"),
    *((f"  moments at state_dtype={name}", f"moments_{name}") for name in STATE_DTYPES),
    ("projectors", "projectors"),
    ("switch reference (d_init)", "switch_state"),
    ("fp32 masters (bf16 weights)", "masters"),
    ("optimizer state", "optimizer"),
    ("projector in use (peak)", "projector_transient"),
    ("TOTAL per rank", "total"),
    ("resume start-up (peak)", "resume"),
    ("FSDP all-gather / micro", "all_gather"),
    ("FSDP reduce-scatter / micro", "reduce_scatter"),
    ("low-rank extra / step", "lowrank_step"),
    ("projector all-gathers / step", "projector_gather"),
    ("switch stats / check step", "switch_check"),
    ("one full refresh", "refresh"),
]


def _mesh(world: int, replicate: int):
    from torch.distributed.device_mesh import init_device_mesh

    shape = (world,) if replicate == 1 else (replicate, world // replicate)
    names = ("shard",) if replicate == 1 else ("replicate", "shard")
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _numbers(cfg, mcfg, world: int, replicate: int, method: str, accum: int, gather_bytes: int,
             reduce_bytes: int) -> tuple[dict, nn.Module, Plan]:
    """``method``'s per-rank numbers on a ``replicate`` x shard mesh (inside ``fake_process_group``); for
    ``lotus+per_layer`` those of optim.per_layer=true."""
    per_layer = method == "lotus+per_layer"
    base = "lotus" if per_layer else method
    model, plan = _sharded(cfg, mcfg, _mesh(world, replicate), world, replicate, base)
    nums = _method_numbers(cfg, model, plan, base, gather_bytes, reduce_bytes,
                           _projectors(cfg, plan, base, per_layer))
    return (_per_layer_numbers(nums, model, plan, accum, _projector_bytes(cfg, base)) if per_layer else nums), \
        model, plan


def _step_times(cfg, mcfg, world: int, accum: int, results: dict, gather_bytes: int, reduce_bytes: int,
                cluster: step_time.Cluster, out) -> dict:
    """The step-time section (step_time.py) for the configured method, per candidate layout; inside the fake
    process group, since other meshes are planned for real too."""
    method = cfg.optim.name if cfg.optim.name in METHODS else "lotus"
    if cfg.optim.per_layer and method != "adamw":
        method = "lotus+per_layer"
    cache: dict = {}

    def mesh_numbers(rep: int, nbytes: int = reduce_bytes) -> dict:
        if (rep, nbytes) == (cfg.dist.replicate, reduce_bytes):
            return results[method]
        if (rep, nbytes) not in cache:
            cache[rep, nbytes] = _numbers(cfg, mcfg, world, rep, method, accum, gather_bytes, nbytes)[0]
        return cache[rep, nbytes]

    t = cfg.train
    args = (mcfg, t.seq_len, t.batch_size, world, cluster)
    rows = step_time.plan_layouts(*args, reduce_bytes, gather_bytes, mesh_numbers,
                                  reduce_last=not cfg.optim.per_layer)
    rep = cfg.dist.replicate
    configured = step_time.Layout(rep, world // rep, t.micro_batch_size, accum, t.activation_checkpointing,
                                  cfg.dist.reduce_last_micro_batch and accum > 1, reduce_bytes)
    configured = (step_time.evaluate(configured, mcfg, t.seq_len, t.batch_size, cluster, gather_bytes,
                                     mesh_numbers(rep)) if t.batch_size % (t.micro_batch_size * world) == 0 else None)
    bf16 = None
    if rows and reduce_bytes != 2:
        best = dataclasses.replace(rows[0]["layout"], reduce_bytes=2)
        bf16 = step_time.evaluate(best, mcfg, t.seq_len, t.batch_size, cluster, gather_bytes,
                                  mesh_numbers(best.replicate, 2))
    step_time.report(rows, configured, cluster, out, bf16)
    return {"layouts": rows, "configured": configured, "bf16": bf16, "method": method}


def dry_run(cfg, out: Callable[[str], None] = print, cluster: step_time.Cluster | None = None) -> dict:
    """Plan ``cfg`` for ``cfg.dist.world_size`` ranks and print the memory/communication table and the predicted
    step time of each candidate layout on ``cluster`` (step_time.Cluster's defaults); return the numbers."""
    t0 = time.perf_counter()
    world = cfg.dist.world_size or int(os.environ.get("WORLD_SIZE", 1))
    replicate = cfg.dist.replicate
    if world < 1 or replicate < 1 or world % replicate:
        raise DistConfigError(f"dist.world_size {world} must be a positive multiple of dist.replicate {replicate}")
    mcfg = _model_config(cfg)
    # The planner describes the target cluster run, so dtypes are those of a CUDA run of this config.
    param_dtype, reduce_dtype = mixed_precision(cfg.train.dtype, "cuda", cfg.dist.reduce_dtype)
    gather_bytes = _dtype_bytes(param_dtype)
    reduce_bytes = _dtype_bytes(reduce_dtype, default=gather_bytes)
    micro_global = cfg.train.micro_batch_size * world
    accum = max(1, math.ceil(cfg.train.batch_size / micro_global))

    results, plans = {}, {}
    lines: list[str] = []  # the step-time section, printed after the table
    with fake_process_group(world):
        for method in (*METHODS, "lotus+per_layer"):
            results[method], model, plans[method] = _numbers(cfg, mcfg, world, replicate, method, accum,
                                                             gather_bytes, reduce_bytes)
        n_params = count_parameters(model)
        timing = _step_times(cfg, mcfg, world, accum, results, gather_bytes, reduce_bytes,
                             cluster or step_time.Cluster(), lines.append)
    if world > 1:
        results["lotus (ddp)"] = _ddp_numbers(cfg, mcfg, world)
    with torch.device("meta"):
        largest = max(p.numel() for p in Llama(mcfg).parameters()) * STATE_BYTES
    for r in results.values():
        r["resume"] = resume_bytes(r, largest)

    lotus_plan = plans["lotus"]
    out(
        f"dry run: {cfg.model.name} ({n_params / 1e6:.1f}M params, vocab {mcfg.vocab_size}), world {world} "
        f"= replicate {replicate} x shard {world // replicate}, rank r={method_rank(cfg.optim)}, "
        f"gather {param_dtype or torch.float32} / reduce {reduce_dtype or param_dtype or torch.float32}, "
        f"projectors={cfg.optim.projectors}"
        + (f" -> {results['lotus']['projector_choice']} (sharding_plan.choose_projectors)" if cfg.optim.projectors == "auto"
           else "")
        + f", lotus refresh={cfg.optim.refresh}"
    )
    out(
        f"batch: global {cfg.train.batch_size} seqs of {cfg.train.seq_len}, micro {cfg.train.micro_batch_size}/rank"
        f" -> {accum} micro-batch(es) per step"
        + ("" if cfg.train.batch_size % micro_global == 0 else " (batch_size is not a multiple of micro x world)")
    )
    for line in lotus_plan.summary():
        out(line)
    width = 28
    out("")
    columns = (*METHODS, "lotus+per_layer", *(["lotus (ddp)"] if world > 1 else []))
    out(f"{'per rank (rank 0 = largest)':<{width}}" + "".join(f"{m:>16}" for m in columns))
    for label, key in ROWS:
        out(f"{label:<{width}}" + "".join(f"{_fmt(results[m][key]):>16}" for m in columns))
    per_step = {m: (1 if r.get("once_per_step") else accum) * (r["all_gather"] + r["reduce_scatter"])
                + r["lowrank_step"] + r["projector_gather"] for m, r in results.items() if m in columns}
    out(f"{'comm per optimizer step':<{width}}" + "".join(f"{_fmt(per_step[m]):>16}" for m in columns))
    out("")
    out(
        "refresh: galore = owner gathers G + broadcasts the projector (exact SVD); lotus = "
        + ("owner gather (optim.refresh=owner)" if cfg.optim.refresh == "owner" else
           f"distributed rsvd, (q+1)={_parts(cfg, 'lotus')['power_iters'] + 1} sketch all-reduces + a k x k Gram")
        + f"; switch stats are all-reduced every {_parts(cfg, 'lotus')['verify_gap']} steps (lotus)"
    )
    if world > 1:
        out("lotus (ddp): dist.mode=ddp/deepspeed, the model whole on every rank; grads = every buffer of the step at "
            "its peak (fp32 buckets of dist.bucket_mb, own gradients, receive buffers); per step one reduce-scatter + "
            "one all-gather in the owner layout")
    out("resume start-up: params + optimizer state filled in place by the checkpoint load, plus one stored item in "
        "flight (at most the largest parameter, fp32); compare it with TOTAL, not with a fresh start's smaller peak")
    out("lotus+per_layer: grads = one block's gradient shards at a time"
        + (" (one micro-batch per step)" if accum == 1 else
           " + plain-parameter gradients and projected R accumulated across micro-batches (steady steps)"))
    for line in lines:
        out(line)
    out(f"planned in {time.perf_counter() - t0:.1f}s")
    for m in columns:
        results[m]["comm_per_step"] = per_step[m]
    results["n_params"] = n_params
    results["world"] = world
    results["step_time"] = timing
    return results


__all__ = ["dry_run", "fake_process_group", "METHODS"]
