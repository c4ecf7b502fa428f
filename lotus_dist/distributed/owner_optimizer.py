"""Matrix-granular ZeRO-2 for ``dist.mode=ddp`` and DeepSpeed: gradients reduced to their owners, optimizer state
and update on the owner, weights returned to every rank.

Every parameter -- a whole projected matrix or a whole unprojected tensor -- has exactly one owner rank, chosen
inside owner-aligned gradient buckets (``owner_buckets.py``): one reduce-scatter per bucket, launched from backward
hooks, leaves each owner with the summed gradients of its own parameters and every other rank with nothing of
them; the owner keeps the moments and projector of its parameters and computes their update; one all-gather per
bucket returns the new weights. Per step that is one gradient all-reduce's bytes (plus the layout's padding),
against 1.5x for an all-reduce followed by weight broadcasts.

Why whole matrices: a projection method needs the whole gradient matrix (its SVD, its projector side), so
DeepSpeed's flat 1-D ZeRO partitions cannot be used, while a matrix-granular split keeps every single-process
code path of ``LowRankAdamW`` unchanged: the owner's optimizer is the single-process optimizer restricted to its
parameters, with the *global* matrix indices so the random bases (seeded from seed, index, switch count) are the
ones a single process draws.

Switch decisions need no consensus step: the owner holds the full all-reduced gradient and all of the matrix's
state, so its decision is the one a single process takes; the other ranks never decide anything for that matrix.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lotus_dist.counters import nbytes, to_host
from lotus_dist.distributed.matrix_comm import counted
from lotus_dist.distributed.owner_buckets import (OwnerReducer, build_layout, gather_weights,
                                                  padding_ratio, step_buffer_bytes)
from lotus_dist.distributed.sharding_plan import solver_cost
from lotus_dist.errors import UserError
from lotus_dist.optim.tensors import closure_loss

BUCKET_MB = 25.0  # MiB of one gradient bucket, all ranks' segments together (dist.bucket_mb), whatever the world size


def _hparams(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def state_bytes(optimizer: Optimizer) -> dict[int, int]:
    """Bytes of optimizer state each parameter will hold (id(param) -> bytes), measured, not estimated: the same
    optimizer class is built over ``meta`` copies of the parameters and initialised (``init_state``)."""
    metas, groups = {}, []
    for g in optimizer.param_groups:
        ps = []
        for p in g["params"]:
            m = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            metas[id(m)] = id(p)
            ps.append(m)
        groups.append({**_hparams(g), "params": ps})
    probe = type(optimizer)(groups, **optimizer.defaults)
    probe.init_state()
    out = {}
    for m, st in probe.state.items():
        out[metas[id(m)]] = sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return out


def owner_costs(optimizer: Optimizer) -> dict[int, tuple[int, float]]:
    """id(param) -> (state bytes, basis-solver flops) of each parameter."""
    sizes = state_bytes(optimizer)
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            solve = 0.0
            if g.get("rank") is not None and p.dim() == 2:
                m, n = p.shape
                solve = solver_cost(m, n, min(g["rank"], m, n), g.get("solver", "random"), g.get("oversample", 8),
                                    g.get("power_iters", 2))
            out[id(p)] = (sizes.get(id(p), 0), solve)
    return out


class OwnerOptimizer(Optimizer):
    """The optimizer of ``full`` (a ``LowRankAdamW`` / ``ProjFactor`` over all parameters) with its state sharded
    matrix by matrix over the ranks of ``group``.

    ``param_groups`` are the full groups (every parameter, so the trainer's lr schedule, ``zero_grad`` and DCP's
    FQN mapping see the whole model); ``local`` is the owner's optimizer over its own parameters. ``state`` holds
    this rank's entries (the same dicts as ``local.state``, which ``memory_report`` counts) and, for projected
    matrices owned elsewhere, a mirror ``{"n_bases": int}`` so that ``switch_report`` counts every matrix.
    ``layout`` is the gradient layout (``owner_buckets.build_layout`` over ``order``, the parameters in the order
    backward produces their gradients), which sets the owners. ``step()`` is collective: every rank calls it (the
    owners update, then every rank receives the weights).
    """

    def __init__(self, full: Optimizer, *, group=None, bucket_mb: float = BUCKET_MB, order=None,
                 weights_dtype: torch.dtype | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("OwnerOptimizer needs an initialised process group")
        if not bucket_mb > 0:
            raise UserError(f"dist.bucket_mb must be positive, got {bucket_mb}")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        super().__init__([dict(g) for g in full.param_groups], full.defaults)
        self.param_names = dict(getattr(full, "param_names", {}))
        all_params = [p for g in self.param_groups for p in g["params"]]
        if len(all_params) < self.world_size:
            raise UserError(f"the owner backend needs at least one parameter per rank: {len(all_params)} parameters "
                            f"for {self.world_size} ranks (use dist.mode=fsdp)")
        order = list(order) if order is not None else all_params[::-1]
        self._costs = owner_costs(full)
        self.layout = build_layout(order, self.world_size, bucket_mb * 2**20,
                                   state_bytes={k: mem for k, (mem, _) in self._costs.items()})
        self.owners = {id(p): o for p, o in zip(self.layout.params, self.layout.owners)}
        self.padding = padding_ratio(self.layout)
        self.gather_bytes = 0  # the most bytes the weights' all-gather buffers held at once (measured)

        # bf16 weights (weights_dtype): the owner keeps an fp32 master of each of its parameters, which its optimizer
        # steps; every rank holds the model in bf16. Otherwise the optimizer steps the parameters themselves.
        self.masters: dict[int, nn.Parameter] = {}
        # fp32 master bytes of each parameter on its owner (every rank knows every rank's: the start-up check)
        self._master_bytes = {id(p): p.numel() * p.element_size() for p in all_params
                              if weights_dtype is not None and weights_dtype != p.dtype}
        self._param_of: dict[int, torch.Tensor] = {}  # id(tensor the local optimizer steps) -> model parameter
        groups, self._group_of = [], []
        for gi, g in enumerate(self.param_groups):
            mine = []
            for p in g["params"]:
                if self.owners[id(p)] != self.rank:
                    continue
                target = p
                if weights_dtype is not None and weights_dtype != p.dtype:
                    target = self.masters[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
                self._param_of[id(target)] = p
                mine.append(target)
            if mine:  # no empty groups: torch and DCP handle those poorly
                groups.append({**_hparams(g), "params": mine})
                self._group_of.append(gi)
        if weights_dtype is not None:
            with torch.no_grad():
                for p in all_params:
                    p.data = p.data.to(weights_dtype)
        self.local = type(full)(groups, **full.defaults)
        self.local.refresh_batch_bytes = full.refresh_batch_bytes  # optim.refresh_batch_mb
        # Global matrix indices, as in the single-process optimizer: the seeds of the random bases depend on them.
        self.local._indices = {id(t): full._index_of(self._param_of[id(t)]) for g in groups for t in g["params"]}
        self.local.param_names = {id(t): self.param_names[id(self._param_of[id(t)])] for g in groups
                                  for t in g["params"] if id(self._param_of[id(t)]) in self.param_names}
        # Allocate now (same zeros a first step allocates): every rank then has a non-empty ``state``, so DCP's
        # state-initialising step (torch.distributed.checkpoint.state_dict._init_optim_state) is skipped on all
        # ranks alike -- it would otherwise call this collective step() on some ranks only.
        self.local.init_state()
        self._keep_masters_in_state()
        self._projected = [p for g in self.param_groups if g.get("rank") is not None for p in g["params"]]
        self._link_state()

    # ------------------------------------------------------------------------------------------------ state

    def _link_state(self) -> None:
        mirrors = {p: {"n_bases": self.state.get(p, {}).get("n_bases", 0)} for p in self._projected
                   if self.owners[id(p)] != self.rank}
        self.state.clear()
        for t, st in self.local.state.items():
            self.state[self._param_of[id(t)]] = st
        self.state.update(mirrors)

    def owned(self, p: torch.Tensor) -> bool:
        return self.owners[id(p)] == self.rank

    def grad_target(self, p: torch.Tensor) -> torch.Tensor:
        """Where the owner's averaged gradient of ``p`` goes: its fp32 master under bf16 weights, else ``p``."""
        return self.masters.get(id(p), p)

    def gradients(self) -> list[torch.Tensor]:
        """This rank's gradients after backward (its own parameters'), for the trainer's norm and clipping."""
        return [t.grad for t in self._param_of_targets() if t.grad is not None]

    def reduce_in_backward(self) -> OwnerReducer:
        """Install the backward hooks that reduce each gradient to its owner (dist.mode=ddp/deepspeed): gradients
        are summed in fp32 whatever the weights' dtype, and go to the owner's master under bf16 weights."""
        self.reducer = OwnerReducer(self.layout, group=self.group, reduce_dtype=torch.float32, target=self.grad_target)
        return self.reducer

    @contextlib.contextmanager
    def reducing(self, last: bool):
        """One micro-batch's backward under the reducer: accumulated in its buckets, reduced to the owners (and
        awaited on leaving) on the step's ``last`` micro-batch."""
        self.reducer.begin(last)
        yield
        if last:
            self.reducer.finish()

    def _param_of_targets(self) -> list[torch.Tensor]:
        return [t for g in self.local.param_groups for t in g["params"]]

    def _keep_masters_in_state(self) -> None:
        """A master is state of its parameter (``master_weight``): memory_report counts it, checkpoints hold it,
        and a resume continues from it rather than from the bf16 copy."""
        for master in self.masters.values():
            self.local.state[master]["master_weight"] = master

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self.local.zero_grad(set_to_none=set_to_none)  # the masters' gradients

    def _sync_hparams(self) -> None:
        for li, gi in enumerate(self._group_of):
            self.local.param_groups[li].update(_hparams(self.param_groups[gi]))

    def state_dict(self) -> dict:
        """Torch's layout over *all* parameters: this rank's entries with their tensors, an empty dict for every
        parameter owned elsewhere. DCP saves nothing for an empty dict, so the per-rank dicts merge into one
        checkpoint without key collisions, and the empty entry satisfies DCP's strict load check."""
        local = self.local.state_dict()
        local_params = [self._param_of[id(t)] for g in self.local.param_groups for t in g["params"]]
        pos = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state = {i: {} for i in pos.values()}
        for li, st in local["state"].items():
            state[pos[id(local_params[li])]] = st
        groups = [{**_hparams(g), "params": [pos[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Torch's positional matching of saved groups to ours (keys may be indices or DCP's FQNs); only the
        entries of this rank's parameters are kept. Collective (re-syncs the switch-count mirrors)."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict has different parameter groups than the optimizer")
        key_of = {id(p): k for g, s in zip(self.param_groups, saved_groups) for p, k in zip(g["params"], s["params"])}
        for g, s in zip(self.param_groups, saved_groups):
            g.update(_hparams(s))
        local_state, local_groups, li = {}, [], 0
        for lg, gi in zip(self.local.param_groups, self._group_of):
            ids = []
            for t in lg["params"]:
                p = self._param_of[id(t)]
                st = dict(state_dict["state"].get(key_of[id(p)]) or {})
                master = st.pop("master_weight", None)
                if id(p) in self.masters:  # from the saved master, else from the (just loaded) weights
                    with torch.no_grad():
                        self.masters[id(p)].copy_(master.to_local() if hasattr(master, "to_local") else master
                                                  if master is not None else p)
                if st:
                    local_state[li] = st
                ids.append(li)
                li += 1
            local_groups.append({**_hparams(self.param_groups[gi]), "params": ids})
        self.local.load_state_dict({"state": local_state, "param_groups": local_groups})
        self._keep_masters_in_state()
        self._link_state()
        self._sync_switch_counts()

    # ------------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        self._sync_hparams()  # the trainer sets lr on the full groups
        self.local.step()
        # every rank receives the owners' new weights (from the fp32 masters, cast, under bf16 weights)
        self.gather_bytes = max(self.gather_bytes, gather_weights(self.layout, self.group,
                                                                  source_of=lambda p: self.masters.get(id(p), p)))
        self._counts_stale = True  # the n_bases mirrors are refreshed when a report asks (sync_switch_counts)
        return loss

    def sync_switch_counts(self) -> None:
        """A collective: bring the ``n_bases`` mirrors up to date for ``gathered_switch_report`` (only when a report
        asks, not every step: it costs an all-reduce and a host sync)."""
        if getattr(self, "_counts_stale", True):
            self._sync_switch_counts()
            self._counts_stale = False

    def after_load(self) -> None:
        """Call after a load that filled the state without ``load_state_dict`` (DCP's in-place load): re-syncs the
        other ranks' switch-count mirrors. A collective (one all-reduce): every rank of the group must call it."""
        self._sync_switch_counts()

    def _sync_switch_counts(self) -> None:
        """Refresh the ``n_bases`` mirrors (switch_report); one all-reduce of a small int vector. Reporting only:
        no decision reads it."""
        if not self._projected:
            return
        device = self._projected[0].device
        host = torch.tensor([int(self.state[p].get("n_bases", 0)) if self.owned(p) else 0 for p in self._projected],
                            dtype=torch.int64)
        # from pinned memory the copy is asynchronous: torch.tensor(..., device=cuda) would block the host
        counts = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
        counted("all_reduce", nbytes(counts), self.group)
        dist.all_reduce(counts, group=self.group)
        for p, n in zip(self._projected, to_host(counts)):
            if not self.owned(p):
                self.state[p]["n_bases"] = n

    # --------------------------------------------------------------------------------------- introspection

    @property
    def refresh_seconds(self) -> float:
        return self.local.refresh_seconds

    def predicted_bytes(self, accum: int) -> dict:
        """Per-rank bytes of the most loaded rank, from shapes (the same on every rank): the weights, the step's
        buffers (``owner_buckets.step_buffer_bytes`` over ``accum`` micro-batches) and its optimizer state and
        masters. Activations are not counted."""
        layout = self.layout
        weight_bytes = layout.params[0].element_size()
        buffers = step_buffer_bytes(layout, accum, weight_bytes)
        state = [0] * self.world_size
        for p, owner in zip(layout.params, layout.owners):
            state[owner] += self._costs[id(p)][0] + self._master_bytes.get(id(p), 0)
        weights = sum(layout.numels) * weight_bytes
        total = max(weights + b["peak"] + s for b, s in zip(buffers, state))
        return {"weights": weights, "buffers": max(b["peak"] for b in buffers), "state": max(state), "total": total}

    def owner_loads(self) -> list[tuple[int, float]]:
        """(state bytes, solver flops) owned per rank: the LPT objective, for logs and tests."""
        loads = [[0, 0.0] for _ in range(self.world_size)]
        for p_id, (mem, solve) in self._costs.items():
            loads[self.owners[p_id]][0] += mem
            loads[self.owners[p_id]][1] += solve
        return [tuple(x) for x in loads]


def build_owner_optimizer(model: nn.Module, optim_cfg, *, group=None, bucket_mb: float = BUCKET_MB,
                          weights_dtype: torch.dtype | None = None) -> OwnerOptimizer:
    """``build_optimizer(model, optim_cfg)`` sharded by owner, with the gradient layout in backward order (the
    reverse of the parameters' order: lm_head first, the embedding last). ``weights_dtype`` (bf16): the model is
    cast to it on every rank, the owners keep fp32 masters."""
    from lotus_dist.optim import build_optimizer

    full = build_optimizer(model, optim_cfg)
    return OwnerOptimizer(full, group=group, bucket_mb=bucket_mb, order=list(model.parameters())[::-1],
                          weights_dtype=weights_dtype)


__all__ = ["OwnerOptimizer", "build_owner_optimizer", "owner_costs", "state_bytes", "BUCKET_MB"]
