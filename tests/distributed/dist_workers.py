"""One rank of the gloo FSDP2 checks; launched by ``dist_spawn.run_workers`` (argv: options JSON, work directory).

Several checks per launch because a launch costs seconds. Rank 0 writes ``<tag>.result.json``; any failed
assertion kills the launch with its traceback in the rank's log.

options: tag, replicate (HSDP replicas), equiv (compare with a single-process model), save / load (checkpoint
directories), flat_load (also load into a 1-D mesh model when the main one is HSDP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lotus_dist.distributed.dcp_util import load_sharded, save_sharded
from lotus_dist.distributed.fsdp import apply_fsdp, check_placements
from lotus_dist.distributed.sharding_plan import plan_for_model
from lotus_dist.distributed.runtime import build_mesh, destroy, init_distributed
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.train.config import DistConfig

CFG = llama_config("tiny", vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172, max_seq_len=32)
GLOBAL_BATCH, SEQ, RANK_R, STEPS = 12, 16, 8, 3
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)  # eps: the project default


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    toks = torch.randint(0, CFG.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return toks[:, :-1], toks[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded_model(mesh, replicate: int, seed: int) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    model = Llama(CFG)
    plan = plan_for_model(model, dist.get_world_size(), RANK_R, replicate=replicate)
    apply_fsdp(model, mesh, plan, log_fn=lambda s: None)
    check_placements(model, plan)
    return model, plan


def full_states(model, opt) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        out[f"param.{name}"] = full(p.detach()).clone()
        st = opt.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}.{name}"] = full(st[key]).clone()
        out[f"step.{name}"] = full(st["step"]).clone().reshape(())
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def check_equivalence(model, rank: int, world: int) -> dict:
    """Loss, full gradients and AdamW steps of the sharded model vs a single-process model (same seed, batch)."""
    torch.manual_seed(0)
    ref = Llama(CFG)
    ref_opt = torch.optim.AdamW(ref.parameters(), **ADAMW)
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    per = GLOBAL_BATCH // world
    res = {"loss_diff": 0.0, "grad_diff": 0.0}
    for step in range(STEPS):
        x, y = batch(step)
        ref_loss = ref(x, y)
        ref_loss.backward()
        loss = model(x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        res["loss_diff"] = max(res["loss_diff"], abs(mean_loss.item() - ref_loss.item()))
        ref_grads = dict(ref.named_parameters())
        res["grad_diff"] = max(
            res["grad_diff"],
            max((full(p.grad) - ref_grads[n].grad).abs().max().item() for n, p in model.named_parameters()),
        )
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    ref_params = dict(ref.named_parameters())
    res["param_diff"] = max((full(p.detach()) - ref_params[n].detach()).abs().max().item()
                            for n, p in model.named_parameters())
    res["loss"] = ref_loss.item()
    return res, opt


def check_meta_init(rt, replicate: int) -> dict:
    """The trainer's start-up path: a model built on meta, sharded and materialised by the fsdp mode (each rank
    draws and keeps only its shards) has exactly the weights of one process's init_parameters for that seed."""
    from lotus_dist.distributed.modes import FullyShardedDataParallel
    from lotus_dist.model.llama import init_parameters
    from lotus_dist.train.config import Config

    cfg = Config(seed=3)
    cfg.optim.rank, cfg.dist.replicate, cfg.train.dtype = RANK_R, replicate, "fp32"
    with torch.device("meta"):
        model = Llama(CFG)
    model, _ = FullyShardedDataParallel(rt).parallelize(model, cfg)
    with torch.device("meta"):
        ref = Llama(CFG)
    ref.to_empty(device="cpu")
    init_parameters(ref, seed=3)
    ref_params = dict(ref.named_parameters())
    return {"meta_init_equal": all(torch.equal(full(p.detach()), ref_params[n]) for n, p in model.named_parameters()),
            "meta_init_dtensors": all(isinstance(p, DTensor) for p in model.parameters())}


def main() -> None:
    options, workdir = json.loads(sys.argv[1]), Path(sys.argv[2])
    if options.get("entry"):  # another worker module beside this one (e.g. owner_workers): its main(options, workdir)
        import importlib

        importlib.import_module(options["entry"]).main(options, workdir)
        return
    torch.set_num_threads(1)
    rt = init_distributed(DistConfig(backend="gloo"))
    assert rt.is_distributed and rt.backend == "gloo" and rt.device.type == "cpu"
    if options.get("suite") == "sharded_optim":  # test_fsdp_optimizer.py: the sharded low-rank optimizer
        from fsdp_optimizer_workers import main as sharded_main

        sharded_main(options, workdir, rt)
        dist.barrier()
        destroy()
        return
    replicate = options.get("replicate", 1)
    mesh = build_mesh(rt, replicate)
    result: dict = {"world": rt.world_size, "mesh": list(mesh.mesh_dim_names)}
    result.update(check_meta_init(rt, replicate))

    model, plan = sharded_model(mesh, replicate, seed=0)
    result["placements"] = {n: [repr(pl) for pl in p.placements] for n, p in model.named_parameters()}
    result["local_shapes"] = {n: list(p.to_local().shape) for n, p in model.named_parameters()}
    result["fallbacks"] = sorted(p.name for p in plan.fallbacks)

    opt = None
    if options.get("equiv"):
        eq, opt = check_equivalence(model, rt.rank, rt.world_size)
        result.update(eq)
    if options.get("save"):
        assert opt is not None, "save needs equiv (the optimizer state to save)"
        save_sharded(options["save"], model, opt, extra={"step": STEPS})
        states = full_states(model, opt)
        if rt.rank == 0:
            torch.save(states, workdir / "reference_states.pt")
    if options.get("load"):
        reference = torch.load(workdir / "reference_states.pt")
        targets = [("load", model, plan)]
        if options.get("flat_load"):
            flat_mesh = build_mesh(rt, 1)
            flat, flat_plan = sharded_model(flat_mesh, 1, seed=7)
            targets.append(("flat_load", flat, flat_plan))
        for key, target, _ in targets:
            torch.manual_seed(123)  # different init: the load must overwrite everything
            with torch.no_grad():
                for p in target.parameters():
                    p.to_local().normal_()
            target_opt = torch.optim.AdamW(target.parameters(), **ADAMW)
            extra = load_sharded(options["load"], target, target_opt, extra={"step": 0})
            result[f"{key}_extra_step"] = extra["step"]
            result[f"{key}_diff"] = max_diff(full_states(target, target_opt), reference)
            result[f"{key}_placements_ok"] = all(isinstance(p, DTensor) for p in target.parameters())

    if rt.rank == 0:
        (workdir / f"{options.get('tag', 'run')}.result.json").write_text(json.dumps(result))
    dist.barrier()
    destroy()


if __name__ == "__main__":
    main()
