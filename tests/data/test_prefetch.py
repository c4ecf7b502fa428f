"""PrefetchStream: the bare stream's batches and positions, bitwise resume, errors, shutdown, pinning, wiring.

Nothing here sleeps: waits are on conditions (with a generous bound, so a bug fails instead of hanging).
"""

import dataclasses
import gc
import json
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

from datahelpers import data_cfg, write_shard  # tests/data is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError, PrefetchStream, TokenStream, build_train_stream

REPO = Path(__file__).resolve().parents[2]
SEQ = 16
N, K = 40, 13  # batches compared (more than an epoch of the mirror at this rank), batches before the checkpoint
BOUND = 60  # seconds: an upper bound on condition waits, never a guess at how long something takes


def stream(cfg, tok, rank=1, world=2, mb=2):
    return build_train_stream(cfg, tok, seq_len=SEQ, micro_batch_size=mb, rank=rank, world_size=world, seed=0)


def json_roundtrip(state):
    return json.loads(json.dumps(state))  # the trainer stores the state as JSON


class Counting:
    """Endless batches [[i, i, i]]; its state is the count; optionally ends or fails after ``last`` batches."""

    def __init__(self, last=None, error=None):
        self.i, self.last, self.error = 0, last, error
        self.made = threading.Condition()

    def __next__(self):
        if self.last is not None and self.i == self.last:
            raise self.error or StopIteration
        with self.made:
            self.i += 1
            self.made.notify_all()
        return torch.full((1, 3), self.i)

    def wait_made(self, n):
        with self.made:
            return self.made.wait_for(lambda: self.i >= n, timeout=BOUND)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


class Watched:
    """A real stream whose batches can be waited for (to take a state while the worker is ahead)."""

    def __init__(self, stream):
        self.stream, self.made = stream, 0
        self.cond = threading.Condition()

    def __next__(self):
        batch = next(self.stream)
        with self.cond:
            self.made += 1
            self.cond.notify_all()
        return batch

    def wait_made(self, n):
        with self.cond:
            return self.cond.wait_for(lambda: self.made >= n, timeout=BOUND)

    def state_dict(self):
        return self.stream.state_dict()

    def load_state_dict(self, state):
        self.stream.load_state_dict(state)


@pytest.fixture(params=["node", "global"])
def cfg(request, mirror):
    """data.split node / global over the 4-shard mirror (rank 1 of 2 reads 2 whole shards under node)."""
    return lambda prefetch: data_cfg(source="c4", path=str(mirror), shuffle_buffer=8, split=request.param,
                                     prefetch=prefetch)


# ---- the same batches and positions as the bare stream -----------------------------------------------------------


def test_batches_and_state_equal_the_bare_stream(cfg, tok):
    bare, pre = stream(cfg(0), tok), stream(cfg(2), tok)
    assert isinstance(bare, TokenStream) and isinstance(pre, PrefetchStream)
    assert pre.state_dict() == bare.state_dict()  # before the first batch: the position at construction
    for _ in range(N):
        assert torch.equal(next(pre), next(bare))
        assert pre.state_dict() == bare.state_dict()  # the consumer's position, not the worker's
        assert (pre.epoch, pre.stats) == (bare.epoch, bare.stats)
    assert bare.epoch >= 1  # an epoch boundary was crossed
    pre.close()


def test_resume_from_a_prefetched_state_is_bitwise(cfg, tok):
    bare = stream(cfg(0), tok)
    reference = [next(bare) for _ in range(N)]
    bare_after_k = stream(cfg(0), tok)
    for _ in range(K):
        next(bare_after_k)
    watched = Watched(stream(cfg(0), tok))
    pre = PrefetchStream(watched, depth=2)
    assert all(torch.equal(next(pre), ref) for ref in reference[:K])
    assert watched.wait_made(K + 2)  # the worker is ahead when the checkpoint is taken
    state = json_roundtrip(pre.state_dict())
    assert state == json_roundtrip(bare_after_k.state_dict())

    fresh = stream(cfg(3), tok)  # another depth: the state does not depend on it
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert all(torch.equal(next(fresh), ref) for ref in reference[K:])
    fresh.close()

    for _ in range(5):  # a running stream with batches queued: loading drops them and restarts from the state
        next(pre)
    pre.load_state_dict(state)
    assert all(torch.equal(next(pre), ref) for ref in reference[K:])
    pre.close()


def test_state_is_taken_while_the_worker_is_ahead():
    inner = Counting()
    s = PrefetchStream(inner, depth=3)
    for _ in range(4):
        next(s)
    assert inner.wait_made(4 + 3)  # three more made without being asked for: the worker runs ahead
    assert s.state_dict() == {"i": 4}  # ... and the state is still the consumer's
    s.load_state_dict({"i": 2})
    assert [int(next(s)[0, 0]) for _ in range(3)] == [3, 4, 5]
    s.close()


# ---- errors and the end of a stream -----------------------------------------------------------------------------


def test_worker_error_reaches_the_consumer_unchanged():
    error = DataError("config key 'data.path': shard 'c4-train.00007.json.gz' is unreadable")
    s = PrefetchStream(Counting(last=3, error=error), depth=2)
    assert [int(next(s)[0, 0]) for _ in range(3)] == [1, 2, 3]  # the batches made before it, first
    with pytest.raises(DataError) as info:
        next(s)
    assert info.value is error and type(info.value) is DataError and str(info.value) == str(error)
    with pytest.raises(DataError):
        next(s)  # the stream stays broken
    assert s.state_dict() == {"i": 3}
    assert s._worker is None  # the thread was stopped


def test_pipeline_error_is_the_bare_streams(tmp_path, tok):
    root = tmp_path / "c4"
    root.mkdir()
    write_shard(root / "c4-train.00000-of-00001.json.gz", [{"text": "  "}] * 3)  # no usable document
    seen = []
    for prefetch in (0, 2):
        s = stream(data_cfg(source="c4", path=str(root), prefetch=prefetch), tok, rank=0, world=1)
        with pytest.raises(DataError) as info:
            next(s)
        seen.append((type(info.value), str(info.value)))
    assert seen[0] == seen[1] and "no usable documents" in seen[1][1]


def test_a_finite_stream_ends():
    assert [int(b[0, 0]) for b in PrefetchStream(Counting(last=5), depth=2)] == [1, 2, 3, 4, 5]


# ---- the thread: stopping, collection, interpreter exit ----------------------------------------------------------


def test_close_stops_the_thread():
    s = PrefetchStream(Counting(), depth=2)
    next(s)
    thread = s._worker.thread
    assert thread.daemon and thread.is_alive()
    s.close()
    assert not thread.is_alive()
    s.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        next(s)
    with PrefetchStream(Counting(), depth=1) as s:
        next(s)
        thread = s._worker.thread
    assert not thread.is_alive()


def test_a_dropped_stream_stops_its_thread():
    s = PrefetchStream(Counting(), depth=2)
    next(s)
    thread = s._worker.thread
    del s
    gc.collect()
    thread.join(timeout=BOUND)
    assert not thread.is_alive()


def test_interpreter_exits_with_a_busy_worker():
    """Neither a worker blocked on its full queue nor one stuck inside the stream keeps the process alive."""
    code = """if True:
        import threading, torch
        from lotus_dist.data.prefetch import PrefetchStream

        class Stuck:  # a read that never returns
            def __init__(self): self.n = 0
            def __next__(self):
                self.n += 1
                if self.n > 1:
                    threading.Event().wait()
                return torch.zeros(1)
            def state_dict(self): return {}

        class Endless:
            def __next__(self): return torch.zeros(1)
            def state_dict(self): return {}

        full, stuck = PrefetchStream(Endless(), depth=1), PrefetchStream(Stuck(), depth=4)
        next(full), next(stuck)
        print("exiting")
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=BOUND)
    assert proc.returncode == 0 and proc.stdout == "exiting\n", proc.stderr


# ---- pinning and wiring -----------------------------------------------------------------------------------------


def test_pin_memory_only_under_cuda_and_in_the_worker(monkeypatch):
    pinned_on = []

    def pin_memory(self, *args, **kwargs):
        pinned_on.append(threading.current_thread().name)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with PrefetchStream(Counting(), pin_memory=True) as s:
        next(s)
        assert not s.pin_memory
    assert pinned_on == []  # never attempted without CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with PrefetchStream(Counting(), pin_memory=True) as s:
        next(s)
    assert pinned_on and set(pinned_on) == {"lotus-data-prefetch"}


def test_build_train_stream_prefetches_per_config(tok, mirror):
    default = data_cfg(source="c4", path=str(mirror))
    assert default.prefetch == 2
    s = stream(default, tok)
    assert isinstance(s, PrefetchStream) and s.depth == 2 and isinstance(s.stream, TokenStream)
    assert s.seq_len == SEQ and s.rank == 1  # the wrapped stream's attributes
    assert isinstance(stream(data_cfg(source="c4", path=str(mirror), prefetch=0), tok), TokenStream)
    old = types.SimpleNamespace(**{k: v for k, v in dataclasses.asdict(default).items() if k != "prefetch"})
    assert isinstance(stream(old, tok), TokenStream)  # a config object without the key: no thread



class NeedsCollectives(Counting):
    """Before batches 1, 4, 7, ... something must run on the training thread (as IndexedStream's round build, which
    synchronises the ranks)."""

    def __init__(self):
        super().__init__()
        self.built = []  # (the batch it was for, the thread it ran on)

    def collective_work(self):
        return self._build if self.i % 3 == 0 and len(self.built) <= self.i // 3 else None

    def _build(self):
        self.built.append((self.i + 1, threading.current_thread().name))

    def __next__(self):
        if self.collective_work():
            self._build()  # unwrapped: inside next(), on the caller's thread
        return super().__next__()


def test_collective_work_runs_on_the_consumer_thread_in_order():
    bare, inner = NeedsCollectives(), NeedsCollectives()
    s = PrefetchStream(inner, depth=3)
    builds_after = []
    for _ in range(7):
        assert torch.equal(next(s), next(bare))
        builds_after.append(len(inner.built))
    here = threading.current_thread().name
    assert inner.built == bare.built == [(1, here), (4, here), (7, here)]
    assert builds_after == [1, 1, 1, 2, 2, 2, 3]  # run when the consumer reached them, however far the worker was
    s.close()
