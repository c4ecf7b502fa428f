"""ZeRO-2 at matrix granularity: owner-aligned gradient buckets, reduced to their owners from backward hooks.

Layout (``build_layout``): the parameters, in the order backward produces their gradients, are packed into buckets;
inside a bucket each parameter gets an owner by LPT on its bytes (largest first, to the owner with the fewest bytes
so far), so the bucket's W owner segments are nearly equal. A bucket is a flat buffer of W segments of ``segment``
elements, owner j's parameters laid out whole in segment j (the tail padded). Then:

- one reduce-scatter per bucket (``OwnerReducer``, launched from a post-accumulate-grad hook as soon as the bucket's
  last gradient of the step's last micro-batch is ready, overlapping the rest of backward) leaves owner j with the
  summed gradients of its parameters, whole; every other rank frees its copy at once (ZeRO-2: a rank keeps full
  gradients only for the buckets in flight, then only its own);
- one all-gather per bucket (``gather_weights``) returns the updated weights from the owners, in the same layout.

Per ordinary step that is 2(W-1)/W x the padded bytes: one gradient all-reduce's worth, plus the padding, which the
per-bucket LPT keeps small (it grows only when a bucket holds a few parameters much larger than the rest; a bucket
is at least W x the largest parameter, so that one matrix never forces W-fold padding).

Why LPT on bytes rather than on optimizer-state bytes: the reduce-scatter sends W equal segments, so segments must
balance in gradient bytes for the bytes on the wire to be those of an all-reduce. Optimizer state then follows the
gradient split (a projected matrix's low-rank state is much smaller than its gradient, an embedding's AdamW state
twice it): per-rank state is balanced to within the largest parameter's state, not to LPT's 4/3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lotus_dist.counters import nbytes
from lotus_dist.distributed.collectives import counted


@dataclass
class Bucket:
    params: list[torch.nn.Parameter]  # in layout order: owner 0's, then owner 1's, ...
    owners: list[int]
    offsets: list[int]  # each parameter's start inside its owner's segment
    segment: int  # elements per owner segment (the largest owner's total)
    world: int
    ready: int = 0  # gradients of the step's last micro-batch seen so far
    work: object = None  # the in-flight reduce-scatter (async handle)
    flat: torch.Tensor | None = None
    out: torch.Tensor | None = None
    owned: list[int] = field(default_factory=list)  # indices into params owned by this rank

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def build_layout(params: list[torch.nn.Parameter], world: int, cap_bytes: float,
                 state_bytes: dict[int, int] | None = None) -> list[Bucket]:
    """Buckets over ``params`` (backward order), each filled to at least W x max(cap_bytes, the largest parameter's
    bytes); a last bucket too small to split evenly joins the one before it. ``state_bytes`` (id(param) -> its
    optimizer state's bytes) breaks ties between owners by the state they hold so far, so the largest parameters of
    different buckets (the embedding, lm_head) go to different ranks."""
    if not params:
        return []
    target = world * max(cap_bytes, max(p.numel() * p.element_size() for p in params))
    groups, current, size = [], [], 0
    for p in params:
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups and sum(q.numel() for q in current) < world * max(q.numel() for q in current):
            groups[-1].extend(current)  # too few bytes to fill W segments: padding would dominate
        else:
            groups.append(current)
    held = [0] * world  # optimizer-state bytes per owner so far, across buckets
    return [_assign(g, world, state_bytes or {}, held) for g in groups]


def _assign(params: list[torch.nn.Parameter], world: int, state_bytes: dict[int, int], held: list[int]) -> Bucket:
    """LPT inside one bucket: largest parameter first, to the owner with the fewest elements in this bucket, ties to
    the owner holding the least optimizer state so far, then the lower owner: deterministic, so every rank computes
    the same layout."""
    loads = [0] * world
    owner_of = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner = min(range(world), key=lambda o: (loads[o], held[o], o))
        owner_of[i] = owner
        loads[owner] += params[i].numel()
        held[owner] += state_bytes.get(id(params[i]), 0)
    ordered = sorted(range(len(params)), key=lambda i: (owner_of[i], i))
    offsets, filled = [], [0] * world
    for i in ordered:
        offsets.append(filled[owner_of[i]])
        filled[owner_of[i]] += params[i].numel()
    return Bucket([params[i] for i in ordered], [owner_of[i] for i in ordered], offsets, max(loads), world)


class OwnerReducer:
    """Reduce-scatters each bucket's gradients to their owners from backward hooks (``reducing`` only on the step's
    last micro-batch: earlier ones accumulate locally, as DDP's ``no_sync``). ``finish()`` waits for them and leaves
    ``p.grad`` set only on this rank's own parameters (the mean over ranks, in the parameter's dtype).

    ``reduce_dtype``: the flat buffers' dtype (fp32 for bf16 weights: the sum over ranks is taken in fp32).
    ``target(p)``: the tensor that receives ``p``'s averaged gradient (default ``p``; its fp32 master under bf16).
    """

    def __init__(self, buckets: list[Bucket], group, reduce_dtype: torch.dtype | None = None, target=None):
        self.buckets, self.group = buckets, group
        self.target = target or (lambda p: p)  # the tensor that receives p's averaged gradient (a master copy)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.reduce_dtype = reduce_dtype
        self.reducing = False
        self._bucket_of = {id(p): b for b in buckets for p in b.params}
        for b in buckets:
            b.owned = [i for i, o in enumerate(b.owners) if o == self.rank]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for b in buckets for p in b.params]

    def begin(self, last_micro_batch: bool) -> None:
        self.reducing = last_micro_batch

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self.reducing:
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, b: Bucket) -> None:
        """Pack the bucket's gradients into owner segments, free them, start the reduce-scatter."""
        dtype = self.reduce_dtype or b.params[0].dtype
        device = b.params[0].device
        b.flat = torch.zeros(self.world * b.segment, dtype=dtype, device=device)
        for p, owner, off in zip(b.params, b.owners, b.offsets):
            if p.grad is not None:  # a parameter unused this step contributes zeros
                start = owner * b.segment + off
                b.flat[start : start + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None  # the full gradient is no longer needed on this rank (ZeRO-2)
        b.out = torch.empty(b.segment, dtype=dtype, device=device)
        counted("reduce_scatter", nbytes(b.flat), self.group)
        b.work = dist.reduce_scatter(b.out, list(b.flat.chunk(self.world)), group=self.group, async_op=True)

    def finish(self) -> None:
        """After the last micro-batch's backward: launch what the hooks did not (parameters without gradients),
        wait for every reduce-scatter, and hand each owned parameter its averaged gradient (a view of the bucket's
        output segment)."""
        for b in self.buckets:
            if b.work is None:
                self._launch(b)
        for b in self.buckets:
            b.work.wait()
            b.out.div_(self.world)
            for i in b.owned:
                p, off = b.params[i], b.offsets[i]
                t = self.target(p)
                g = b.out[off : off + p.numel()].view(p.shape)
                t.grad = g if g.dtype == t.dtype else g.to(t.dtype)
            b.flat = b.work = None
            b.ready = 0
        self.reducing = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def gather_weights(buckets: list[Bucket], group, source_of=None) -> None:
    """Every rank receives the owners' updated weights: one all-gather per bucket in the reduce-scatter's layout.
    ``source_of(p)`` is the tensor holding ``p``'s new value on its owner (default ``p`` itself; a master copy under
    bf16 weights, cast to ``p``'s dtype)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for b in buckets:
        dtype, device = b.params[0].dtype, b.params[0].device
        send = torch.zeros(b.segment, dtype=dtype, device=device)
        for p, owner, off in zip(b.params, b.owners, b.offsets):
            if owner == rank:
                src = p if source_of is None else source_of(p)
                if src is not p:  # a master copy: the owner's own weight takes its (cast) value too
                    with torch.no_grad():
                        p.copy_(src)
                send[off : off + p.numel()].copy_(p.detach().reshape(-1))
        recv = torch.empty(world * b.segment, dtype=dtype, device=device)
        counted("all_gather", nbytes(recv), group)
        dist.all_gather(list(recv.chunk(world)), send, group=group)
        with torch.no_grad():
            for p, owner, off in zip(b.params, b.owners, b.offsets):
                if owner != rank:
                    start = owner * b.segment + off
                    p.copy_(recv[start : start + p.numel()].view_as(p))


def padding_ratio(buckets: list[Bucket]) -> float:
    """Elements on the wire (W segments per bucket) over the gradients' own (1.0: no padding)."""
    real = sum(b.numel for b in buckets)
    return sum(b.segment * b.world for b in buckets) / real if real else 1.0


__all__ = ["Bucket", "OwnerReducer", "build_layout", "gather_weights", "padding_ratio"]
