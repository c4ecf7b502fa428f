"""One rank of the owner-backend checks (``dist.mode=ddp`` / ``deepspeed``); run through ``dist_workers.py`` with
``{"entry": "owner_workers", ...}`` (argv: options JSON, work directory). Rank 0 writes ``<tag>.result.json``.

Each run steps through the trainer's step engine (``lotus_dist/train/step.py``: micro-batches under the mode's
``no_sync``, the loss and each rank's share of the gradient norm in one all-reduce, clipping on the device,
``step``, ``zero_grad``) on a tiny LLaMA, with the trainer's lr set on ``param_groups``, and is compared with the
single-process trajectory of ``reference_train`` (written out by hand; ``refs``, or computed on every rank).

options: tag, methods, modes (ddp, deepspeed), steps, save_at (step at which each (mode, method) run saves a DCP
checkpoint under ``<workdir>/ckpt/<mode>_<method>_w<world>``), resume (list of [checkpoint dir, mode, method,
step(, lenient)]: load into that mode at that step and continue to ``steps``; lenient: record an error instead of
raising), refs (a directory holding ``ref_<method>.pt``, the single-process runs).
"""

from __future__ import annotations

import faulthandler
import json
import math
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from lotus_dist.counters import COUNTERS
from lotus_dist.distributed.dcp_util import load_sharded, save_sharded
from lotus_dist.distributed.modes import ParallelContext
from lotus_dist.distributed.runtime import init_distributed
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.optim import build_optimizer, gathered_switch_report, memory_report, switch_report
from lotus_dist.train.config import Config, DistConfig, OptimConfig
from lotus_dist.train.consensus import clip_, grad_sq_partial
from lotus_dist.train.step import StepEngine

CFG = llama_config("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=32)
GLOBAL_BATCH, SEQ, MICRO, LR, CLIP = 12, 16, 2, 0.01, 1.0
# Small gaps and a large gamma so that every method switches subspaces several times within the run.
METHOD_OPTS = {
    "lotus": dict(gamma=0.5, verify_gap=3),
    "galore": dict(update_gap=5),
    "apollo": dict(update_gap=5),
    "apollo_mini": dict(update_gap=5, scale=1.0),  # at its 128, lr 0.01 is chaotic: 1e-14 apart grows to 0.5
    "adamw": dict(),
    # int8 moments (optim.state_dtype) at rank 32: the gate/up/down moments (172 x 32) are codes, and the embedding's
    # and lm_head's, row by row
    "lotus_int8": dict(gamma=0.5, verify_gap=3, state_dtype="int8", rank=32),
}
VARIANT_OF = {"lotus_int8": "lotus"}  # a run key -> its method


def optim_cfg(method: str) -> OptimConfig:
    return OptimConfig(**{"name": VARIANT_OF.get(method, method), "lr": LR, "rank": 8, **METHOD_OPTS.get(method, {})})


def run_cfg(method: str, world: int) -> Config:
    cfg = Config()
    cfg.optim = optim_cfg(method)
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.grad_clip = GLOBAL_BATCH, MICRO, CLIP
    cfg.train.dtype, cfg.train.seq_len = "fp32", SEQ
    cfg.dist.backend, cfg.dist.bucket_mb = "gloo", 0.05  # several buckets per owner even on a tiny model
    return cfg


def blocks(step: int) -> torch.Tensor:
    """The global batch of ``step``: GLOBAL_BATCH token blocks of SEQ + 1 (inputs and their next tokens)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)


def lr_at(step: int, total: int) -> float:
    return LR * (0.5 + 0.5 * math.cos(math.pi * step / total))  # changes every step: exercises the lr sync


def train(model, opt, mode, rank: int, world: int, start: int, end: int, total: int, on_step=None,
          held: list | None = None, micro: int = MICRO, comm: list | None = None,
          ctx: ParallelContext = ParallelContext()) -> list[float]:
    """Steps ``start+1 .. end`` through the trainer's step (``lotus_dist/train/step.py``, with the trainer's lr set
    on ``param_groups``); returns the logged (global mean) losses. ``held`` collects, after each step's backward,
    (gradients this rank holds, of them not its own, its own parameters); ``comm`` each step's counted optimizer
    bytes (lotus_dist.counters, the trainer's optim_comm_bytes). ``ctx``: what the mode's parallelize decided."""
    per = GLOBAL_BATCH // world

    def after_backward():
        if held is not None and hasattr(opt, "owned"):
            params = list(model.parameters())
            with_grad = [p for p in params if p.grad is not None]
            held.append((len(with_grad), sum(not opt.owned(p) for p in with_grad), sum(map(opt.owned, params))))

    engine = StepEngine(model, opt, mode, ctx, grad_accum=per // micro, grad_clip=CLIP, after_backward=after_backward)
    losses = []
    for step in range(start, end):
        COUNTERS.reset()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total)
        mine = blocks(step)[rank * per:(rank + 1) * per]
        losses.append(engine.step(iter(mine.split(micro))).loss)
        if comm is not None:
            comm.append(COUNTERS.snapshot()["optim_comm_bytes"])
        if on_step is not None:
            on_step(step + 1)
    return losses


def reference_train(model, opt, steps: int) -> list[float]:
    """The independent reference the runs above are checked against: one process, the whole global batch in
    micro-batches, written out by hand (not the engine), with the trainer's clipping rule."""
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        loss_sum = torch.zeros(())
        for part in blocks(step).split(MICRO):
            loss = model(part[:, :-1], part[:, 1:]) / (GLOBAL_BATCH // MICRO)
            loss.backward()
            loss_sum += loss.detach()
        losses.append(loss_sum.item())
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        clip_(grads, grad_sq_partial(grads, torch.device("cpu")).sqrt(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    inner = getattr(model, "module", model)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in inner.named_parameters()}


def rel_diff(a: dict, b: dict) -> float:
    """Largest per-parameter relative Frobenius distance."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)).item() for k in a)


def loss_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def reference(method: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = Llama(CFG)
    opt = build_optimizer(model, optim_cfg(method))
    losses = reference_train(model, opt, steps)
    return {"losses": losses, "params": full_params(model), "switches": sum(switch_report(opt).values()),
            "bytes": memory_report(opt)["total"]}


def make_mode(name: str, rt):
    if name == "ddp":
        from lotus_dist.distributed.modes import OwnerDataParallel

        return OwnerDataParallel(rt)
    if name == "deepspeed":
        from lotus_dist.distributed.deepspeed import DeepSpeedMode

        return DeepSpeedMode(rt)
    if name == "fsdp":
        from lotus_dist.distributed.modes import FullyShardedDataParallel

        return FullyShardedDataParallel(rt)
    raise ValueError(name)


def build(mode_name: str, method: str, rt):
    mode = make_mode(mode_name, rt)
    torch.manual_seed(0)
    model, ctx = mode.parallelize(Llama(CFG), run_cfg(method, rt.world_size))
    return mode, ctx, model, mode.build_optimizer(model, optim_cfg(method), ctx)


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def layout_record(opt, comm: list) -> dict:
    """What the owner layout is and what it measured: stream lengths, owners per bucket, each step's counted
    bytes, and every rank's measured buffer peaks (the reducer's in backward, the weights' all-gather's)."""
    layout = opt.layout
    return {"lengths": layout.lengths, "buckets": len(layout.buckets),
            "owners_per_bucket": [len({piece[0] for piece in b.pieces.values()}) for b in layout.buckets],
            "comm": comm, "reducer_peak": gather(opt.reducer.peak_bytes), "gather_peak": gather(opt.gather_bytes)}


def accum_bf16_check(rt, accum: int) -> dict:
    """ddp with bf16 weights over ``accum`` micro-batches: the owners' accumulated gradients against the fp32 sum
    of the bf16 micro-batch gradients (averaged over the ranks) and against their bf16 running sum (what autograd
    accumulates in a bf16 ``.grad``). Also: a device too small for the layout is refused on every rank."""
    from lotus_dist.distributed.modes import OwnerDataParallel
    from lotus_dist.errors import UserError

    rank, world = rt.rank, rt.world_size
    cfg = run_cfg("adamw", world)
    cfg.train.dtype, cfg.train.batch_size = "bf16", MICRO * accum * world
    mode = OwnerDataParallel(rt)
    torch.manual_seed(0)
    model, ctx = mode.parallelize(Llama(CFG), cfg)
    opt = mode.build_optimizer(model, optim_cfg("adamw"), ctx)
    g = torch.Generator().manual_seed(7)
    toks = torch.randint(0, CFG.vocab_size, (MICRO * accum * world, SEQ + 1), generator=g)
    mine = toks[rank * MICRO * accum:(rank + 1) * MICRO * accum]
    micro = [(mine[i * MICRO:(i + 1) * MICRO, :-1], mine[i * MICRO:(i + 1) * MICRO, 1:]) for i in range(accum)]
    fp32_sum, bf16_sum = {}, {}
    for x, y in micro:  # the reference: each micro-batch's bf16 gradient alone (the hooks are idle outside a step)
        model.zero_grad(set_to_none=True)
        (model(x, y) / accum).backward()
        for name, p in model.named_parameters():
            assert p.grad.dtype == torch.bfloat16
            fp32_sum[name] = fp32_sum.get(name, 0) + p.grad.float()
            bf16_sum[name] = p.grad.clone() if name not in bf16_sum else bf16_sum[name] + p.grad  # bf16 rounding
    model.zero_grad(set_to_none=True)
    for ref in (fp32_sum, bf16_sum):
        for name, t in ref.items():
            t = ref[name] = t.float()
            dist.all_reduce(t)
            t.div_(world)
    for i, (x, y) in enumerate(micro):
        with mode.no_sync(model, opt, ctx, last=i == accum - 1):
            (model(x, y) / accum).backward()
    fp32_err = bf16_err = 0.0
    for name, p in model.named_parameters():
        if opt.owned(p):
            got = opt.grad_target(p).grad
            assert got.dtype == torch.float32
            fp32_err = max(fp32_err, ((got - fp32_sum[name]).norm() / fp32_sum[name].norm()).item())
            bf16_err = max(bf16_err, ((bf16_sum[name] - fp32_sum[name]).norm() / fp32_sum[name].norm()).item())
    opt.zero_grad(set_to_none=True)
    opt.reducer.remove()  # not close(): that would tear the process group down
    small = OwnerDataParallel(rt)
    small.device_bytes = lambda: 2**20  # a 1 MiB device: the layout cannot fit
    refused = None
    try:
        small_model, small_ctx = small.parallelize(Llama(CFG), cfg)
        small.build_optimizer(small_model, optim_cfg("adamw"), small_ctx)
    except UserError as e:
        refused = str(e)
    return {"fp32_err": max(gather(fp32_err)), "bf16_err": max(gather(bf16_err)), "refused": gather(refused)}


def main(options: dict, workdir: Path) -> None:
    faulthandler.enable()  # a native abort (SIGABRT) still shows the Python stack in the rank's log
    torch.set_num_threads(1)
    rt = init_distributed(DistConfig(backend="gloo"))
    rank, world = rt.rank, rt.world_size
    steps = options.get("steps", 30)
    save_at = options.get("save_at")
    result: dict = {"world": world, "runs": {}, "resume": {}}
    refs = {}
    built = []  # every mode, closed at the end as the trainer closes its own (cli.py)

    def ref_of(method):  # the caller's single-process run when it passes one (saves each rank recomputing it)
        if method not in refs:
            path = Path(options.get("refs", "/nonexistent")) / f"ref_{method}.pt"
            refs[method] = torch.load(path) if path.exists() else reference(method, steps)
        return refs[method]

    runs = [(m, options.get("modes", [])) for m in options.get("methods", [])]
    runs += [(m, ["ddp"]) for m in options.get("ddp_methods", [])]  # variants run in ddp mode only
    for method, mode_names in runs:
        ref = ref_of(method)
        result.setdefault("ref", {})[method] = {"switches": ref["switches"], "bytes": ref["bytes"]}
        for mode_name in mode_names:
            mode, ctx, model, opt = build(mode_name, method, rt)
            built.append(mode)
            ckpt = workdir / "ckpt" / f"{mode_name}_{method}_w{world}"

            def on_step(step, model=model, opt=opt, ckpt=ckpt):
                if step == save_at:
                    save_sharded(str(ckpt), model, opt)

            held: list = []
            comm: list = []
            losses = train(model, opt, mode, rank, world, 0, steps, steps, on_step, held, comm=comm, ctx=ctx)
            params = full_params(model)
            run = {
                "loss_rel": loss_diff(losses, ref["losses"]),
                "param_rel": rel_diff(params, ref["params"]),
                "switches": gather(sum(gathered_switch_report(opt).values())),
                "bytes": gather(memory_report(opt)["total"]),
                "loads": opt.owner_loads(),
                "held": held,  # rank 0's (gradients held after backward, not owned, owned) per step
                "held_bytes": gather(sum(p.numel() * 4 for p in model.parameters() if opt.owned(p)))
                if hasattr(opt, "owned") else None,
                "padding": opt.padding,
                # every rank holds the same weights after the all-gather
                "replica_rel": max(gather(rel_diff(params, gather(params)[0]))),
            }
            if mode_name == "deepspeed":
                run["engine"] = type(mode.engine).__name__
            if hasattr(opt, "reducer"):
                run["layout"] = layout_record(opt, comm)
            result["runs"][f"{mode_name}_{method}"] = run
    if options.get("one_micro_batch"):  # ddp with each rank's whole batch in one micro-batch: gradients wait
        steps1 = options["one_micro_batch"]
        mode, ctx, model, opt = build("ddp", "lotus", rt)
        built.append(mode)
        comm = []
        losses = train(model, opt, mode, rank, world, 0, steps1, steps, micro=GLOBAL_BATCH // world, comm=comm,
                       ctx=ctx)
        result["runs"]["ddp_lotus_one_micro"] = {"loss_rel": loss_diff(losses, ref_of("lotus")["losses"][:steps1]),
                                                 "layout": layout_record(opt, comm)}
    if options.get("accum_bf16"):
        result["accum_bf16"] = accum_bf16_check(rt, options["accum_bf16"])
    for entry in options.get("resume", []):
        ckpt, mode_name, method, start = entry[:4]
        lenient = len(entry) > 4 and entry[4]  # record a failure instead of raising (a combination still in work)
        key = f"{Path(ckpt).name}->{mode_name}_w{world}"
        try:
            mode, ctx, model, opt = build(mode_name, method, rt)
            built.append(mode)
            with torch.no_grad():
                for p in model.parameters():  # different weights: the load must overwrite them
                    (p.to_local() if hasattr(p, "to_local") else p).add_(1.0)
            load_sharded(ckpt, model, opt)
            train(model, opt, mode, rank, world, start, steps, steps, ctx=ctx)
            ref = ref_of(method)
            result["resume"][key] = {"param_rel": rel_diff(full_params(model), ref["params"]),
                                     "switches": sum(gathered_switch_report(opt).values()), "ref_switches": ref["switches"]}
        except Exception:  # reported to the test, which decides whether this combination must work
            result["resume"][key] = {"error": traceback.format_exc()[-3000:]}
            if not lenient:
                raise
    if rank == 0:
        (workdir / f"{options.get('tag', 'run')}.result.json").write_text(json.dumps(result))
    dist.barrier()
    # The trainer's teardown (cli.py): each mode's close (DeepSpeed's: the engine and the groups DeepSpeed holds); the
    # first one destroys every process group, so that no group, nor its gloo threads, is left to interpreter shutdown
    # (ranks died there with SIGABRT, issue 18).
    for mode in reversed(built):
        mode.close()
    rt.destroy()  # no mode built
