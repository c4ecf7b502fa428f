"""ZeRO-2 at matrix granularity: owner streams cut into gradient buckets of a fixed size, reduced to the owners from
backward hooks. Everything here is computed from shapes only, so every rank issues the same collectives.

Layout (``plan_layout``; ``build_layout`` over parameters):

- **Owners.** Every parameter has one owner, by LPT over the whole model (largest first, to the rank with the
  fewest elements so far; ties to the rank holding the least optimizer state, so the embedding and lm_head land
  apart, then the lower rank; equal matrices, ordered by backward, so go round-robin over the ranks).
- **Streams.** Rank j's stream is its parameters laid end to end in the order backward produces their gradients
  (``lengths[j]`` elements): the streams advance together through backward, so a bucket is ready early. (LPT in
  backward-order chunks of a bucket would keep them closer still, measured on llama_7b x 8: 20 % less gradient
  waiting, but 11 % padding on the wire instead of 1 %, the embedding arriving last onto a full stream.)
- **Buckets.** Bucket b is positions [b*S, b*S + S_b) of every rank's stream: a contiguous buffer of W segments of
  S_b elements, segment j holding rank j's stretch (a parameter longer than what is left of a segment continues in
  the next bucket; the tail of a shorter stream is zeros). S = ``dist.bucket_mb`` / (W x 4 bytes), so a bucket is
  at most ``dist.bucket_mb`` of fp32 whatever W: the buffers do not grow with the world size, however large a
  matrix is (a matrix larger than a bucket spans several).

Per step (``OwnerReducer``, ``gather_weights``): one ``reduce_scatter_tensor`` per bucket (fp32) leaves owner j with
stretch b of its stream, written straight into its gradient buffer; one ``all_gather_into_tensor`` per bucket
returns the weights. That is W x max(lengths) elements each way: one all-reduce's worth of the gradients plus the
padding sum_j (max(lengths) - lengths[j]), which LPT keeps below W x the largest parameter (at scale, the lm_head
owner's stream is often that one matrix). The tensor forms need equal segments (hence the padding) and no
flattened copy, which the list forms cost; gloo has both on torch >= 2.6 (FSDP2's CPU path uses them too).

Memory (``step_buffer_bytes``: the reducer's own schedule replayed on shapes; the planner's ddp column). On a
micro-batch before the last, each gradient is added into its fp32 bucket(s) by its post-accumulate-grad hook and
freed: accumulation is in fp32 (as FSDP2's) also under bf16 weights, and the buckets (the padded model, 4 bytes per
element on every rank) live across the micro-batches. On the last one (the only one without accumulation) a
gradient waits in its own dtype until its bucket launches, which packs it into a fresh fp32 buffer; a bucket's
buffer is freed once its reduce-scatter is done, at most ``INFLIGHT`` being outstanding. An owner's gradients are
one fp32 buffer of its stream length (a bucket past its end lands in a scratch segment); the all-gather holds one
bucket's send and receive buffers at a time.

Why LPT on bytes rather than on optimizer-state bytes: the reduce-scatter sends W equal segments, so streams must
balance in gradient bytes for the bytes on the wire to be those of an all-reduce. Optimizer state follows the
gradient split (a projected matrix's low-rank state is much smaller than its gradient, an embedding's AdamW state
twice it): per-rank state is balanced to within the largest parameter's state, not to LPT's 4/3.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lotus_dist.counters import nbytes
from lotus_dist.distributed.matrix_comm import counted
from lotus_dist.errors import UserError

INFLIGHT = 2  # reduce-scatters outstanding during backward before the oldest is waited for (and its buffer freed)
ALIGN = 16  # segments are rounded down to a multiple of 16 elements (64-byte aligned fp32), where the cap allows


@dataclass
class Bucket:
    start: int  # stream position of the bucket's first element (the same on every rank)
    segment: int  # elements per rank segment
    world: int
    pieces: dict[int, tuple[int, int, int, int]]  # param index -> (owner, start in the param, length, start in segment)

    @property
    def numel(self) -> int:
        return self.world * self.segment


@dataclass
class Layout:
    params: list  # in backward order (``plan_layout`` alone: None)
    numels: list[int]
    owners: list[int]
    offsets: list[int]  # each parameter's start in its owner's stream
    lengths: list[int]  # elements of each rank's stream
    world: int
    buckets: list[Bucket]
    spans: list[list[int]]  # the buckets each parameter lies in, ascending

    @property
    def stream(self) -> int:
        """Stream positions every bucket sequence covers: the longest stream."""
        return max(self.lengths, default=0)


def plan_layout(numels: list[int], world: int, cap_bytes: float, state_bytes: list[int] | None = None,
                elem_bytes: int = 4) -> Layout:
    """The layout of parameters of ``numels`` elements (backward order) over ``world`` ranks, buckets of at most
    ``cap_bytes`` of ``elem_bytes``-byte gradients. ``state_bytes``: each parameter's optimizer state (ties)."""
    n = len(numels)
    per_bucket = max(world, int(cap_bytes // elem_bytes))
    segment = per_bucket // world
    if segment > ALIGN:
        segment -= segment % ALIGN
    state = state_bytes or [0] * n
    owners, lengths, held = [0] * n, [0] * world, [0] * world
    for k in sorted(range(n), key=lambda k: (-numels[k], k)):  # LPT over the whole model
        owner = min(range(world), key=lambda o: (lengths[o], held[o], o))
        owners[k] = owner
        lengths[owner] += numels[k]
        held[owner] += state[k]
    offsets, filled = [0] * n, [0] * world
    for k in range(n):
        offsets[k] = filled[owners[k]]
        filled[owners[k]] += numels[k]
    stream = max(lengths, default=0)
    buckets = [Bucket(s, min(segment, stream - s), world, {}) for s in range(0, stream, segment)]
    spans: list[list[int]] = [[] for _ in range(n)]
    for k in range(n):
        lo, end = offsets[k], offsets[k] + numels[k]
        while lo < end:
            b = lo // segment
            hi = min(end, (b + 1) * segment)
            buckets[b].pieces[k] = (owners[k], lo - offsets[k], hi - lo, lo - b * segment)
            spans[k].append(b)
            lo = hi
    return Layout([None] * n, list(numels), owners, offsets, lengths, world, buckets, spans)


def build_layout(params: list[torch.nn.Parameter], world: int, cap_bytes: float,
                 state_bytes: dict[int, int] | None = None) -> Layout:
    """``plan_layout`` over ``params`` (backward order); ``state_bytes``: id(param) -> its optimizer state's bytes."""
    sizes = state_bytes or {}
    layout = plan_layout([p.numel() for p in params], world, cap_bytes, [sizes.get(id(p), 0) for p in params])
    layout.params = list(params)
    return layout


def padding_ratio(layout: Layout) -> float:
    """Elements on the wire (W x the longest stream) over the gradients' own (1.0: no padding)."""
    real = sum(layout.numels)
    return layout.world * layout.stream / real if real else 1.0


def step_buffer_bytes(layout: Layout, accum: int = 1, weight_bytes: int = 4, reduce_bytes: int = 4,
                      inflight: int = INFLIGHT) -> list[dict]:
    """Per rank, the bytes of every buffer a ddp step holds, from shapes: ``OwnerReducer``'s schedule replayed with
    gradients arriving in layout (backward) order over ``accum`` micro-batches. Keys: ``own_grads`` (the rank's
    gradient buffer, fp32), ``backward`` (the most that the fp32 buckets, the gradients waiting for their bucket
    (in the weights' dtype), the receive buffers and the own gradients hold at once), ``gather`` (own gradients +
    the largest bucket's all-gather send and receive buffers, in the weights' dtype), ``peak`` (the larger)."""
    buckets, spans = layout.buckets, layout.spans
    grad = [n * weight_bytes for n in layout.numels]
    size = [b.numel * reduce_bytes for b in buckets]
    gather = max((b.segment * (layout.world + 1) for b in buckets), default=0) * weight_bytes
    out = []
    for rank in range(layout.world):
        own = layout.lengths[rank]
        live = peak = 0
        alloc = [False] * len(buckets)

        def take(nbytes):
            nonlocal live, peak
            live += nbytes
            peak = max(peak, live)

        def touch(b):
            if not alloc[b]:
                alloc[b] = True
                take(size[b])

        for _ in range(accum - 1):  # earlier micro-batches: add into the buckets (they stay), free the gradient
            for k in range(len(spans)):
                for b in spans[k]:
                    touch(b)
                peak = max(peak, live + grad[k])
        held, ready, pending = {}, [0] * len(buckets), deque()
        nxt, own_taken = 0, False

        def complete():
            nonlocal live
            b, scratch = pending.popleft()
            live -= size[b] + scratch
            alloc[b] = False

        def launch(b):
            nonlocal live, own_taken
            touch(b)
            if not own_taken:
                own_taken = True
                take(own * reduce_bytes)
            scratch = buckets[b].segment * reduce_bytes if buckets[b].start + buckets[b].segment > own else 0
            take(scratch)
            for k in buckets[b].pieces:
                if k in held:
                    held[k] -= 1
                    if not held[k]:
                        del held[k]
                        live -= grad[k]
            pending.append((b, scratch))
            while len(pending) > inflight:
                complete()

        for k in range(len(spans)):  # the last micro-batch
            if all(alloc[b] for b in spans[k]):
                peak = max(peak, live + grad[k])
            else:
                take(grad[k])
                held[k] = len(spans[k])
            for b in spans[k]:
                ready[b] += 1
            while nxt < len(buckets) and ready[nxt] == len(buckets[nxt].pieces):
                launch(nxt)
                nxt += 1
        while nxt < len(buckets):
            launch(nxt)
            nxt += 1
        while pending:
            complete()
        if not own_taken:
            take(own * reduce_bytes)
        own_bytes = own * reduce_bytes
        out.append(dict(own_grads=own_bytes, backward=peak, gather=own_bytes + gather,
                        peak=max(peak, own_bytes + gather)))
    return out


def check_fits(peak_bytes: float, device_bytes: float | None, what: str) -> None:
    """Refuse at start-up a ddp/deepspeed layout whose predicted per-rank peak (``what`` says of what) exceeds the
    device's memory before a single activation: no bucket size can help, sharding the weights can."""
    if device_bytes is not None and peak_bytes > device_bytes:
        raise UserError(f"dist.mode=ddp/deepspeed needs {peak_bytes / 2**20:.1f} MiB per rank ({what}) but the device "
                        f"has {device_bytes / 2**20:.1f} MiB: use dist.mode=fsdp (sharded weights and gradients)")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(-1)


class OwnerReducer:
    """Reduces the gradients to their owners from backward hooks, in ``layout``'s buckets.

    While a step runs (``begin``, every micro-batch) a micro-batch before the last adds each gradient into its fp32
    bucket buffer(s) from its post-accumulate-grad hook and frees it: the sum over micro-batches is taken in
    ``reduce_dtype`` (fp32), also under bf16 weights. On the last micro-batch a gradient goes into buckets that
    exist, or waits for its bucket's launch; a bucket whose gradients are all in is packed and reduce-scattered at
    once (in bucket order, the same on every rank; at most ``inflight`` outstanding), overlapping the rest of
    backward, into this rank's gradient buffer. ``finish()`` launches what the hooks did not (parameters without
    gradients), waits, and hands each owned parameter's ``target(p)`` (``p``, or its fp32 master under bf16
    weights) its averaged gradient: a view of that buffer. Outside a step the hooks do nothing (``p.grad``
    accumulates as usual). ``peak_bytes``: the most bytes its buffers and the gradients it holds took at once,
    measured (``step_buffer_bytes`` predicts it).
    """

    def __init__(self, layout: Layout, group, reduce_dtype: torch.dtype | None = None, target=None,
                 inflight: int = INFLIGHT):
        self.layout, self.group, self.inflight = layout, group, inflight
        self.target = target or (lambda p: p)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if layout.world != self.world:
            raise ValueError(f"layout for {layout.world} ranks used on a group of {self.world}")
        self.reduce_dtype = reduce_dtype
        self._index = {id(p): k for k, p in enumerate(layout.params)}
        self.owned = [k for k, o in enumerate(layout.owners) if o == self.rank]
        self.own_length = layout.lengths[self.rank]
        self.peak_bytes = 0
        self.active = self.last = False
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in layout.params]

    def _reset(self) -> None:
        self._flats: list[torch.Tensor | None] = [None] * len(self.layout.buckets)
        self._ready = [0] * len(self.layout.buckets)
        self._held: dict[int, list] = {}  # param index -> [buckets still to pack it, its gradient's bytes]
        self._next, self._pending, self._own, self._live = 0, deque(), None, 0

    def _note(self, extra: int = 0) -> None:
        self.peak_bytes = max(self.peak_bytes, self._live + extra)

    def _take(self, numel: int, zero: bool) -> torch.Tensor:
        p = self.layout.params[0]
        make = torch.zeros if zero else torch.empty
        t = make(numel, dtype=self.reduce_dtype or p.dtype, device=p.device)
        self._live += nbytes(t)
        self._note()
        return t

    def _bucket_flat(self, b: int) -> torch.Tensor:
        if self._flats[b] is None:
            self._flats[b] = self._take(self.layout.buckets[b].numel, zero=True)  # the padding stays zero
        return self._flats[b]

    def _add(self, k: int, grad: torch.Tensor, buckets) -> None:
        """Add parameter ``k``'s gradient into its pieces of ``buckets`` (one fused call)."""
        g, dst, src = grad.reshape(-1), [], []
        for b in buckets:
            bucket, flat = self.layout.buckets[b], self._flats[b]
            owner, start, length, at = bucket.pieces[k]
            dst.append(flat[owner * bucket.segment + at : owner * bucket.segment + at + length])
            src.append(g[start : start + length])
        if dst:
            torch._foreach_add_(dst, src)

    def begin(self, last_micro_batch: bool) -> None:
        self.active, self.last = True, last_micro_batch

    def _on_gradient(self, p: torch.Tensor) -> None:
        if not self.active:
            return
        k = self._index[id(p)]
        spans = self.layout.spans[k]
        if not self.last or all(self._flats[b] is not None for b in spans):
            for b in spans:
                self._bucket_flat(b)
            self._note(nbytes(p.grad))
            self._add(k, p.grad, spans)
            p.grad = None  # in its bucket(s) now (ZeRO-2: a rank keeps only its own parameters' gradients)
        else:  # kept until its bucket(s) launch: a gradient costs less than an fp32 bucket waiting for the others
            self._held[k] = [len(spans), nbytes(p.grad)]
            self._live += nbytes(p.grad)
            self._note()
        if self.last:
            for b in spans:
                self._ready[b] += 1
            buckets = self.layout.buckets
            while self._next < len(buckets) and self._ready[self._next] == len(buckets[self._next].pieces):
                self._launch(self._next)

    def _launch(self, b: int) -> None:
        bucket = self.layout.buckets[b]
        flat = self._bucket_flat(b)
        if self._own is None:
            self._own = self._take(self.own_length, zero=False)
        end = bucket.start + bucket.segment
        scratch = self._take(bucket.segment, zero=False) if end > self.own_length else None  # the padded tail
        for k in bucket.pieces:
            if k in self._held:
                p = self.layout.params[k]
                self._add(k, p.grad, [b])
                self._held[k][0] -= 1
                if not self._held[k][0]:
                    self._live -= self._held.pop(k)[1]
                    p.grad = None
        out = self._own[bucket.start : end] if scratch is None else scratch
        counted("reduce_scatter", nbytes(flat), self.group)
        work = dist.reduce_scatter_tensor(out, flat, group=self.group, async_op=True)
        self._pending.append((b, work, scratch))
        self._next = b + 1
        while len(self._pending) > self.inflight:
            self._complete()

    def _complete(self) -> None:
        b, work, scratch = self._pending.popleft()
        work.wait()
        start = self.layout.buckets[b].start
        if scratch is not None:
            mine = max(0, self.own_length - start)
            self._own[start : start + mine].copy_(scratch[:mine])
            self._live -= nbytes(scratch)
        self._live -= nbytes(self._flats[b])
        self._flats[b] = None

    def finish(self) -> None:
        self.last = True
        while self._next < len(self.layout.buckets):
            self._launch(self._next)
        while self._pending:
            self._complete()
        own = self._own if self._own is not None else self._take(self.own_length, zero=False)
        own.div_(self.world)
        for k in self.owned:
            p, off = self.layout.params[k], self.layout.offsets[k]
            t = self.target(p)
            g = own[off : off + p.numel()].view(p.shape)
            t.grad = g if g.dtype == t.dtype else g.to(t.dtype)
        self.active = self.last = False
        self._reset()  # the gradient buffer now lives on as the owned gradients (until zero_grad)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def gather_weights(layout: Layout, group, source_of=None) -> int:
    """Every rank receives the owners' updated weights: one ``all_gather_into_tensor`` per bucket, in the
    reduce-scatter's layout. ``source_of(p)`` holds ``p``'s new value on its owner (default ``p``; its fp32 master
    under bf16 weights, cast to ``p``'s dtype). Returns the most bytes its buffers held at once."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    params, peak = layout.params, 0
    with torch.no_grad():
        for k, owner in enumerate(layout.owners):
            if owner == rank and source_of is not None:
                src = source_of(params[k])
                if src is not params[k]:  # a master copy: the owner's own weight takes its (cast) value too
                    params[k].copy_(src)
        for bucket in layout.buckets:
            dtype, device, seg = params[0].dtype, params[0].device, bucket.segment
            send = torch.zeros(seg, dtype=dtype, device=device)
            recv = torch.empty(world * seg, dtype=dtype, device=device)
            peak = max(peak, nbytes(send) + nbytes(recv))
            mine = [(k, piece) for k, piece in bucket.pieces.items() if piece[0] == rank]
            if mine:
                torch._foreach_copy_([send[at : at + n] for _, (_, _, n, at) in mine],
                                     [_flat(params[k])[s : s + n] for k, (_, s, n, _) in mine])
            counted("all_gather", nbytes(recv), group)
            dist.all_gather_into_tensor(recv, send, group=group)
            theirs = [(k, piece) for k, piece in bucket.pieces.items() if piece[0] != rank]
            if theirs:
                torch._foreach_copy_([_flat(params[k])[s : s + n] for k, (_, s, n, _) in theirs],
                                     [recv[o * seg + at : o * seg + at + n] for _, (o, _, n, at) in theirs])
    return peak


__all__ = ["ALIGN", "Bucket", "INFLIGHT", "Layout", "OwnerReducer", "build_layout", "check_fits", "gather_weights",
           "padding_ratio", "plan_layout", "step_buffer_bytes"]
