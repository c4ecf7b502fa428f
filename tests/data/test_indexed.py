"""Megatron indexed datasets: preprocess -> .bin/.idx -> GPTDataset/BlendedDataset stream (megatron-core extra)."""

import builtins
import collections
import gzip
import importlib.util
import json
import threading
from pathlib import Path

import pytest
import torch

from datahelpers import data_cfg, make_mirror, mirror_docs  # tests/data is on sys.path (pyproject's pythonpath)
from script_loader import load_script
from lotus_dist.data import DataError, build_train_stream, build_val_blocks

SEQ = 16

try:
    HAVE_MEGATRON = importlib.util.find_spec("megatron.core") is not None
except ImportError:  # no "megatron" package at all
    HAVE_MEGATRON = False
if not HAVE_MEGATRON:
    pytest.skip("megatron-core is not installed (pip install -e .[megatron])", allow_module_level=True)


def _preprocess_module():
    return load_script("scripts/preprocess_c4.py", "preprocess_c4")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """Two tokenized mirrors (different documents) in the layout preprocess_c4 writes."""
    root = tmp_path_factory.mktemp("indexed")
    mirror_a = make_mirror(root / "a", n_train_shards=3, docs_per_shard=5, n_val=4)
    mirror_b = root / "b"
    mirror_b.mkdir()
    for f in mirror_a.iterdir():  # the same documents, upper-cased: a second, distinguishable data set
        lines = [json.loads(line) for line in gzip.open(f, "rt")]
        (mirror_b / f.name).write_bytes(gzip.compress(
            "".join(json.dumps({"text": r["text"].upper()}) + "\n" for r in lines).encode(), mtime=0))
    pre = _preprocess_module()
    assert pre.main(["--input", str(mirror_a), "--output", str(root / "tok_a"), "--workers", "2"]) == 0
    assert pre.main(["--input", str(mirror_b), "--output", str(root / "tok_b"), "--workers", "1",
                     "--splits", "train"]) == 0
    return {"mirror_a": mirror_a, "a": root / "tok_a" / "c4-train_text_document",
            "b": root / "tok_b" / "c4-train_text_document", "cache": str(root / "cache")}


def stream(cfg, tok, rank=0, world=1, mb=2, seed=0):
    return build_train_stream(cfg, tok, seq_len=SEQ, micro_batch_size=mb, rank=rank, world_size=world, seed=seed)


def test_preprocess_round_trip(indexed, tok):
    from lotus_dist.data.indexed import read_documents

    docs = mirror_docs(indexed["mirror_a"])
    stored = list(read_documents(str(indexed["a"])))
    assert len(stored) == len(docs)
    for ids, text in zip(stored, docs):
        assert ids.tolist() == tok.encode(text) + [tok.eos_id]
    meta = json.loads(Path(str(indexed["a"]) + ".json").read_text())
    assert meta["docs"] == len(docs) and meta["vocab_size"] == tok.vocab_size


def test_stream_samples_are_made_of_stored_documents(indexed, tok):
    """GPTDataset shuffles documents, then cuts windows: inside a sample, EOS separates whole stored documents."""
    from lotus_dist.data.indexed import read_documents

    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"])
    batch = next(stream(cfg, tok, mb=4))
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.long
    docs = [d.tolist()[:-1] for d in read_documents(str(indexed["a"]))]  # without their EOS
    for row in batch.tolist():
        pieces = [[]]  # a window: the tail of a document, whole documents, the head of one
        for t in row:
            pieces.append([]) if t == tok.eos_id else pieces[-1].append(t)
        if len(pieces) == 1:  # inside one document
            assert any(d[i : i + len(row)] == row for d in docs for i in range(len(d)))
            continue
        assert all(p in docs for p in pieces[1:-1])
        assert any(d[len(d) - len(pieces[0]) :] == pieces[0] for d in docs)
        assert any(d[: len(pieces[-1])] == pieces[-1] for d in docs)


def test_resume_and_world_size_invariance(indexed, tok):
    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"])
    one = stream(cfg, tok, mb=4)
    reference = [next(one) for _ in range(40)]  # several rounds (epochs) of the small data set
    assert one.epoch >= 2
    two = [stream(cfg, tok, r, 2, mb=2) for r in range(2)]
    assert all(torch.equal(torch.cat([next(s) for s in two]), ref) for ref in reference[:5])
    state = json.loads(json.dumps(two[1].state_dict()))
    resumed = stream(cfg, tok, 0, 1, mb=4)
    resumed.load_state_dict(state)  # saved at 2 ranks, resumed at 1
    assert all(torch.equal(next(resumed), ref) for ref in reference[5:])


def test_rounds_reshuffle(indexed, tok):
    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"])
    s = stream(cfg, tok, mb=1)
    n = s.round_size
    first = [next(s) for _ in range(n)]
    second = [next(s) for _ in range(n)]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_weighted_blend(indexed, tok):
    cfg = data_cfg(source="indexed", blend=[0.25, str(indexed["a"]), 0.75, str(indexed["b"])],
                   cache_dir=indexed["cache"])
    s = stream(cfg, tok, mb=1)
    upper = collections.Counter()
    for _ in range(200):
        text = tok.decode(next(s)[0].tolist())
        letters = [c for c in text if c.isalpha()]
        upper[sum(c.isupper() for c in letters) > len(letters) * 0.9] += 1
    assert 0.6 < upper[True] / 200 < 0.9  # about 3/4 of the samples from the upper-cased prefix


def test_val_blocks_from_sibling_prefix(indexed, tok):
    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"], val_tokens=64)
    blocks = build_val_blocks(cfg, tok, seq_len=SEQ)
    assert blocks.shape == (4, SEQ + 1)
    val_docs = mirror_docs(indexed["mirror_a"], "validation")
    assert blocks[0].tolist() == (tok.encode(val_docs[0]) + [tok.eos_id])[: SEQ + 1]
    with pytest.raises(DataError, match="data.val_path"):
        build_val_blocks(data_cfg(source="indexed", path=str(indexed["b"]), val_tokens=64), tok, seq_len=SEQ)


def test_missing_prefix_and_bad_blend(indexed, tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        stream(data_cfg(source="indexed", path=str(tmp_path / "nothing")), tok)
    with pytest.raises(DataError, match="data.blend"):
        stream(data_cfg(source="indexed", blend=[1.0, str(indexed["a"]), 2.0]), tok)
    with pytest.raises(DataError, match="data.path"):
        stream(data_cfg(source="indexed"), tok)


def test_tokenizer_mismatch_is_refused(indexed, tmp_path):
    from lotus_dist.data import load_tokenizer

    module = load_script("tokenizer/train.py", "tok_train")
    other = load_tokenizer(str(module.train(str(indexed["mirror_a"]), tmp_path / "other.model", vocab_size=300,
                                            quiet=True, threads=1)))
    with pytest.raises(DataError, match="was tokenized with"):
        stream(data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"]), other)


def test_install_hint_without_megatron(monkeypatch, tok, indexed):
    real_import = builtins.__import__

    def no_megatron(name, *args, **kwargs):
        if name.startswith("megatron"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_megatron)
    with pytest.raises(DataError, match=r"pip install -e \.\[megatron\]"):
        stream(data_cfg(source="indexed", path=str(indexed["a"])), tok)


def _record_builds(monkeypatch):
    """(thread name, round) of every round build, from now on."""
    from lotus_dist.data.indexed import IndexedStream

    builds, real = [], IndexedStream._build

    def build(self, round_):
        builds.append((threading.current_thread().name, round_))
        return real(self, round_)

    monkeypatch.setattr(IndexedStream, "_build", build)
    return builds


def test_ranks_build_a_round_at_the_same_batch(indexed, tok, monkeypatch):
    """Under a process group a round build is collective: every rank must build at the same global batch, also when
    the round boundary falls inside a global batch and a rank's own samples all lie before it."""
    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"], prefetch=0)
    round_size = stream(cfg, tok).round_size
    mb = next(m for m in range(2, round_size) if round_size % (2 * m))  # boundaries fall inside global batches
    built_at = []
    for rank in range(2):
        s = stream(cfg, tok, rank, 2, mb=mb)
        builds = _record_builds(monkeypatch)
        at = []
        for i in range(3 * round_size // (2 * mb)):
            n = len(builds)
            next(s)
            at += [(i, r) for _, r in builds[n:]]
        built_at.append(at)
        monkeypatch.undo()
    assert len(built_at[0]) >= 3 and built_at[0] == built_at[1]


def test_prefetch_runs_round_builds_on_the_training_thread_and_resumes_bitwise(indexed, tok, monkeypatch):
    cfg = data_cfg(source="indexed", path=str(indexed["a"]), cache_dir=indexed["cache"], prefetch=0)
    bare = stream(cfg, tok, mb=3)
    reference = [next(bare) for _ in range(bare.round_size)]  # three rounds of 3-sample batches
    builds = _record_builds(monkeypatch)
    cfg.prefetch = 2
    pre = stream(cfg, tok, mb=3)
    k = len(reference) // 2
    assert all(torch.equal(next(pre), ref) for ref in reference[:k])
    state = json.loads(json.dumps(pre.state_dict()))
    assert state == {**bare.state_dict(), "sample": 3 * k}
    fresh = stream(cfg, tok, mb=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(next(fresh), ref) for ref in reference[k:])
    pre.close()
    fresh.close()
    assert len(builds) >= 3 and {name for name, _ in builds} == {threading.current_thread().name}
