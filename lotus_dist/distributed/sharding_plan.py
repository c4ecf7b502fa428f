"""Per-matrix distribution plan: shard dim, projector side, fallback, owner rank.

A pure function of parameter shapes and the world size (docs/design.md: recomputed at start-up, never stored
in checkpoints), so every rank derives the same plan without communicating, and a dry run can plan a 64-rank job
on one CPU.

Side-aware sharding (docs/algorithms.md section 11): the low-rank states of a projected matrix live on the side the
projector does *not* compress, so FSDP2 shards the weight along that side and ``R = project(G)``, the moments and
the back-projection stay local to each rank:

- right projector ``B`` (r×n), states m×r  -> ``Shard(0)`` (rows);
- left projector ``A`` (m×r), states r×n   -> ``Shard(1)`` (columns).

FSDP2 (torch 2.13, ``_fsdp_param.py``, ``FSDPParam._init_sharded_param``) pads an uneven ``Shard(0)`` but raises
``NotImplementedError("FSDP does not support uneven sharding on dim 1")`` when a ``Shard(dim > 0)`` size is not
divisible by the *shard* mesh size (the inner dim of an HSDP mesh). Such a matrix falls back to ``Shard(0)``: its
rows are sharded while its states run along the columns, so ``R = Aᵀ G = Σ_i A_iᵀ G_i`` is reduce-scattered by
columns every step (each rank keeps a 1/W column slice of the r×n states) and the update is all-gathered for the
back-projection: the bytes of one r×n all-reduce, 1/W of the memory.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from torch import nn
from torch.distributed.tensor import Shard

from lotus_dist.distributed.matrix_comm import PROJECTOR_LAYOUTS
from lotus_dist.errors import UserError
from lotus_dist.optim.methods import is_projected, resolve_parts
from lotus_dist.optim.subspace import PROJ_TYPES, side_for


class DistConfigError(UserError, ValueError):
    """A distributed setting that cannot work (world size vs replicate, backend vs hardware, ...): one line."""


@dataclass(frozen=True)
class MatrixPlan:
    """How one projected ``m × n`` matrix is sharded and where its projector sits."""

    name: str
    shape: tuple[int, int]
    side: str  # "left" (A, m×r; states r×n) or "right" (B, r×n; states m×r)
    rank: int  # effective rank: min(rank_r, short side)
    shard_dim: int  # FSDP2 placement actually used
    fallback: bool  # True: wanted Shard(1), got Shard(0) + per-step reduce-scatter of Aᵀ G / all-gather of N
    reason: str  # why a fallback happened ("" otherwise)
    owner: int  # shard-group rank that runs the exact solver when optim.refresh=owner
    cost: float  # relative solver cost used for the owner balance

    @property
    def state_dim(self) -> int:
        """The dimension the states run along (0: states m×r, 1: states r×n)."""
        return 0 if self.side == "right" else 1

    @property
    def projector_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (m, self.rank) if self.side == "left" else (self.rank, n)

    @property
    def state_shape(self) -> tuple[int, int]:
        m, n = self.shape
        return (self.rank, n) if self.side == "left" else (m, self.rank)


def projector_side(m: int, n: int, proj_type: str = "std") -> str:
    """The optimizer's side rule (``optim.subspace.side_for``, docs/algorithms.md section 2: ``std`` puts the
    projector on the short side, m ≥ n -> right B, m < n -> left A); an unknown ``proj_type`` is a DistConfigError."""
    if proj_type not in PROJ_TYPES:
        raise DistConfigError(f"unknown optim.proj_type '{proj_type}' (known: {', '.join(PROJ_TYPES)})")
    return side_for((m, n), proj_type)


def solver_cost(m: int, n: int, rank: int, solver: str, oversample: int = 8, power_iters: int = 2) -> float:
    """Flop-proportional cost of computing one basis; only ratios matter (owner balancing)."""
    if solver == "rsvd":
        k = min(rank + oversample, min(m, n))
        return float(m * n * k * (2 * power_iters + 2))
    if solver in ("random", "grasswalk", "gaussian"):
        return float(max(m, n) * rank * rank)
    # svd, online_pca (svd-initialised) and anything unknown: a full thin SVD.
    return float(m * n * min(m, n))


def lpt_assign(costs: Mapping[str, float], n_bins: int) -> dict[str, int]:
    """Longest-processing-time-first: largest job to the least-loaded bin. Makespan ≤ (4/3)·OPT.

    Deterministic: ties go to the lower bin and jobs of equal cost are taken in name order, so every rank
    computes the same owners.
    """
    heap = [(0.0, b) for b in range(n_bins)]
    owners = {}
    for name in sorted(costs, key=lambda k: (-costs[k], k)):
        load, b = heapq.heappop(heap)
        owners[name] = b
        heapq.heappush(heap, (load + costs[name], b))
    return owners


@dataclass
class Plan:
    world_size: int
    replicate: int
    matrices: dict[str, MatrixPlan]
    unprojected: dict[str, tuple[int, ...]]
    _by_param: dict[int, str] = field(default_factory=dict, repr=False)

    @property
    def shard_size(self) -> int:
        """Ranks a parameter is sharded over (the inner mesh dim under HSDP)."""
        return self.world_size // self.replicate

    @property
    def fallbacks(self) -> list[MatrixPlan]:
        return [p for p in self.matrices.values() if p.fallback]

    def placement(self, name: str) -> Shard:
        mp = self.matrices.get(name)
        return Shard(mp.shard_dim) if mp is not None else Shard(0)

    def bind(self, model: nn.Module) -> "Plan":
        """Remember which parameter object is which FQN, so ``shard_placement_fn`` can take parameters.

        Fails if the model's shapes are not the ones planned (a plan from another model or config).
        """
        self._by_param = {}
        for name, p in model.named_parameters():
            planned = self.matrices[name].shape if name in self.matrices else self.unprojected.get(name)
            if planned is None:
                raise ValueError(f"parameter '{name}' is not in the plan")
            if tuple(p.shape) != tuple(planned):
                raise ValueError(f"parameter '{name}' has shape {tuple(p.shape)}, the plan has {tuple(planned)}")
            self._by_param[id(p)] = name
        return self

    def shard_placement_fn(self, param_or_name: nn.Parameter | str) -> Shard:
        """For ``fully_shard(..., shard_placement_fn=plan.shard_placement_fn)``; takes an FQN or a bound parameter."""
        if isinstance(param_or_name, str):
            return self.placement(param_or_name)
        name = self._by_param.get(id(param_or_name))
        if name is None:
            raise KeyError("parameter not bound to the plan: call plan.bind(model) before fully_shard")
        return self.placement(name)

    def summary(self, details: str | None = None) -> list[str]:
        """Human-readable lines for the start-up log: the fallbacks in one line (how many, of which shapes, why),
        the matrices themselves in ``fallback_details`` (``details``: the file that holds them, named in the line)."""
        mats = self.matrices.values()
        n1 = sum(1 for p in mats if p.shard_dim == 1)
        lines = [
            f"plan: world {self.world_size} = replicate {self.replicate} x shard {self.shard_size}; "
            f"{len(self.matrices)} projected matrices ({len(self.matrices) - n1} Shard(0), {n1} Shard(1), "
            f"{len(self.fallbacks)} fallback), {len(self.unprojected)} other params Shard(0)"
        ]
        if self.matrices:
            loads = [0.0] * self.shard_size
            for p in mats:
                loads[p.owner] += p.cost
            mean = sum(loads) / len(loads)
            lines.append(f"plan: owner solver load max/mean = {max(loads) / mean:.3f}" if mean else "plan: no solver load")
        groups: dict[tuple, int] = {}
        for p in self.fallbacks:
            groups[(p.shape, p.reason)] = groups.get((p.shape, p.reason), 0) + 1
        if groups:
            kinds = "; ".join(f"{n} x {m}x{k}: {why}" for ((m, k), why), n in groups.items())
            where = f" (each matrix in {details})" if details else ""
            lines.append(f"plan: {len(self.fallbacks)} fallback matrices{where}: {kinds}")
        return lines

    def fallback_details(self) -> list[str]:
        """One line per fallback matrix: name, shape, why (the run directory's plan_fallbacks.txt)."""
        return [f"fallback {p.name} {p.shape[0]}x{p.shape[1]}: {p.reason}" for p in self.fallbacks]


PROJECTOR_BYTES = 4  # projectors are used in fp32 whatever the parameter dtype (docs/algorithms.md section 4)
PROJECTOR_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1}  # as stored, optim.projector_dtype
# int8: one fp32 scale per stored row besides the codes (optim/projector_codes.py)
PROJECTOR_ROW_BYTES = {"int8": 4}


def projector_peak_bytes(plan: Plan, projectors: str, per_layer: bool = False,
                         stored_bytes: int = PROJECTOR_BYTES, row_bytes: int = 0) -> dict[str, int]:
    """Per-rank projector bytes at the peak of a step, for ``optim.projectors`` = ``replicate`` or ``shard``.

    replicate: every projector whole on every rank. shard: rank 0's row slice of each (the largest,
    ``collectives.chunk_sizes``) plus what a step holds gathered at once: one projector (``LowRankAdamW._prepare``
    gathers them one at a time), or under ``optim.per_layer`` one unit's (its hooks step a block together).
    ``stored_bytes`` per stored element (``PROJECTOR_DTYPE_BYTES``) and ``row_bytes`` per stored row (int8's
    scales): a bf16 or int8 projector is used as an fp32 copy, one (one unit's) at a time, replicated too; sharded,
    its gather in the stored format is counted beside that copy.
    Returns ``stored``, ``in_use`` (the gathered or upcast transient) and their ``total``.
    """
    if projectors not in PROJECTOR_LAYOUTS:
        raise ValueError(f"optim.projectors: {projectors!r} is not resolved ({' | '.join(PROJECTOR_LAYOUTS)})")
    w = plan.shard_size
    upcast = PROJECTOR_BYTES if stored_bytes != PROJECTOR_BYTES else 0
    use = (stored_bytes if projectors == "shard" else 0) + upcast  # bytes per element of a projector in use
    stored, in_use, per_unit = 0, 0, {}
    for name, mp in plan.matrices.items():
        rows, cols = mp.projector_shape
        stored += (rows if projectors == "replicate" else -(-rows // w)) * (cols * stored_bytes + row_bytes)
        whole = rows * cols * use + (rows * row_bytes if projectors == "shard" else 0)
        unit = ".".join(name.split(".")[:2])
        per_unit[unit] = per_unit.get(unit, 0) + whole
        in_use = max(in_use, whole)
    if per_layer and per_unit:
        in_use = max(per_unit.values())
    return {"stored": stored, "in_use": in_use, "total": stored + in_use}


# Solvers that train their projector in place (online PCA's Adam step on P): a shard of P cannot be trained alone.
UNSHARDABLE_SOLVERS = frozenset({"online_pca"})


def choose_projectors(setting: str, plan: Plan, per_layer: bool = False, solver: str | None = None) -> str:
    """``optim.projectors`` resolved: ``auto`` shards when that lowers the per-rank peak (stored slices plus the
    gathered transient, ``projector_peak_bytes``) and the replicated projectors outweigh this rank's shard of the
    weights they project (fp32); it replicates otherwise. Sharding costs an all-gather of every projector each
    step, a share of FSDP's own bytes that does not shrink with the world size (3.5 % at llama_7b), while the
    memory it saves grows with the shard size: on a 2-rank tiny run it would save kilobytes for 14 collectives a
    step, at llama_7b x 64 it saves 3.4 GiB a rank. It replicates at shard size 1, where one projector (one unit's, per layer) is most of
    them, and for a ``solver`` that trains its projector in place (online_pca, ``UNSHARDABLE_SOLVERS``), for which
    an explicit ``shard`` is refused. The planner and ``dist.mode=fsdp`` both decide here."""
    shardable = solver not in UNSHARDABLE_SOLVERS
    if setting == "shard" and not shardable:
        raise DistConfigError(f"optim.solver={solver} trains its projector in place: use optim.projectors=replicate")
    if setting != "auto":
        return setting
    if not shardable or not plan.matrices:
        return "replicate"
    replicated = projector_peak_bytes(plan, "replicate", per_layer)["total"]
    sharded = projector_peak_bytes(plan, "shard", per_layer)["total"]
    rows = sum(-(-mp.shape[0] // plan.shard_size) * mp.shape[1] for mp in plan.matrices.values())
    weight_shard = rows * PROJECTOR_BYTES
    return "shard" if sharded < replicated and replicated > weight_shard else "replicate"


def build_plan(
    shapes: Mapping[str, tuple[int, ...]],
    projected: Iterable[str],
    world_size: int,
    rank_r: int,
    proj_type: str = "std",
    solver: str = "rsvd",
    *,
    replicate: int = 1,
) -> Plan:
    """Plan every parameter of ``shapes`` (FQN -> shape) for ``world_size`` ranks (``replicate`` × shard).

    ``projected`` names the 2-D matrices the optimizer projects; every other parameter is a plain ``Shard(0)``.
    Owners are shard-group ranks in ``[0, world_size // replicate)``: under HSDP every replica holds the same
    gradient shards, so each replica group refreshes on its own.
    """
    if world_size < 1 or replicate < 1 or world_size % replicate:
        raise DistConfigError(f"world size {world_size} is not a multiple of dist.replicate {replicate}")
    if rank_r < 1:
        raise DistConfigError(f"optim.rank must be positive, got {rank_r}")
    shard = world_size // replicate
    projected = set(projected)
    missing = projected - set(shapes)
    if missing:
        raise ValueError(f"projected parameters without a shape: {sorted(missing)}")

    drafts: dict[str, dict] = {}
    for name in sorted(projected):
        shape = tuple(shapes[name])
        if len(shape) != 2:
            raise ValueError(f"projected parameter '{name}' must be 2-D, got shape {shape}")
        m, n = shape
        side = projector_side(m, n, proj_type)
        want = 0 if side == "right" else 1
        r = min(rank_r, m, n)
        dim, fallback, reason = want, False, ""
        if want == 1 and n % shard:
            # FSDP2 rejects uneven Shard(dim>0); see the module docstring.
            dim, fallback = 0, True
            reason = (
                f"n={n} not divisible by shard size {shard} (FSDP2 needs even Shard(1)); "
                f"Shard(0); the {r}x{n} state is sharded by columns (per step: reduce-scatter of A^T G, "
                f"all-gather of the update)"
            )
        drafts[name] = dict(name=name, shape=(m, n), side=side, rank=r, shard_dim=dim, fallback=fallback,
                            reason=reason, cost=solver_cost(m, n, r, solver))
    owners = lpt_assign({k: d["cost"] for k, d in drafts.items()}, shard)
    matrices = {k: MatrixPlan(owner=owners[k], **d) for k, d in drafts.items()}
    unprojected = {k: tuple(v) for k, v in shapes.items() if k not in projected}
    return Plan(world_size=world_size, replicate=replicate, matrices=matrices, unprojected=unprojected)


def method_geometry(optim_cfg) -> tuple[str, str]:
    """(proj_type, solver) that plan ``optim_cfg``'s matrices: its method's parts with the config's keys applied
    (``optim.methods.resolve_parts``); Lotus's where the method has none (adamw, projfactor)."""
    parts = {**resolve_parts(dataclasses.replace(optim_cfg, name="lotus")), **(resolve_parts(optim_cfg) or {})}
    return parts["proj_type"], parts["solver"]


def default_projected(model: nn.Module) -> set[str]:
    """The matrices the optimizer projects (``optim.methods.is_projected``: the seven block projections)."""
    return {name for name, p in model.named_parameters() if is_projected(name, p)}


def plan_for_model(
    model: nn.Module,
    world_size: int,
    rank_r: int,
    proj_type: str = "std",
    solver: str = "rsvd",
    *,
    replicate: int = 1,
    projected: Iterable[str] | None = None,
) -> Plan:
    """``build_plan`` from a (possibly ``meta``) model's parameters, bound to that model."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    proj = default_projected(model) if projected is None else set(projected)
    return build_plan(shapes, proj, world_size, rank_r, proj_type, solver, replicate=replicate).bind(model)


__all__ = [
    "DistConfigError", "MatrixPlan", "Plan", "build_plan", "plan_for_model", "default_projected", "projector_side", "solver_cost",
    "lpt_assign", "choose_projectors", "method_geometry", "UNSHARDABLE_SOLVERS", "projector_peak_bytes",
]
