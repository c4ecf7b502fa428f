"""The C4 text streams: packing, shuffling, epochs, rank splits, exact resume, validation blocks, real samples."""

import collections
import gzip
import json
from pathlib import Path

import pytest
import torch

from datahelpers import data_cfg, mirror_docs, write_shard  # tests/data is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError, build_train_stream, build_val_blocks
from lotus_dist.data.c4 import HFStreamSource, LocalShardSource, ShuffledDocs, find_shards

SEQ = 16


def stream(cfg, tok, rank=0, world=1, mb=2, seed=0):
    return build_train_stream(cfg, tok, seq_len=SEQ, micro_batch_size=mb, rank=rank, world_size=world, seed=seed)


def take(s, n):
    return [next(s) for _ in range(n)]


def json_roundtrip(state):
    return json.loads(json.dumps(state))  # the state must be JSON, not pickled objects


def epochs(docs, n=1):
    """The documents of the first n epochs of a ShuffledDocs, one list per epoch."""
    out = [[] for _ in range(n)]
    while True:
        doc = docs.next_doc()  # afterwards docs.epoch is the epoch this document belongs to
        if docs.epoch >= n:
            return out
        out[docs.epoch].append(doc)


# ---- format and packing -----------------------------------------------------------------------------------------


def test_embedded_stream_shapes(tok, cache_dir):
    s = stream(data_cfg(source="embedded", cache_dir=cache_dir), tok, mb=4)
    batch = next(s)
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.long
    assert 0 <= batch.min() and batch.max() < tok.vocab_size


def test_packing_has_no_padding_and_carries_the_remainder(tok, mirror):
    # shuffle_buffer=1 and one shard in file order: the stream is exactly the documents + EOS, cut with stride SEQ
    files = find_shards(mirror, "train")
    source = LocalShardSource(files[:1], shuffle_shards=False)
    expected = []
    for doc in mirror_docs(mirror)[:6]:
        expected += tok.encode(doc) + [tok.eos_id]
    # prefetch=0: the bare TokenStream, whose documents are replaced below
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=1, prefetch=0)
    s = stream(cfg, tok, mb=1)
    s.docs = ShuffledDocs(source, buffer_size=1, seed=0)
    blocks = [next(s)[0] for _ in range(len(expected) // SEQ)]
    for i in range(len(blocks) - 1):
        assert blocks[i][-1] == blocks[i + 1][0]  # stride seq_len: every token is a target exactly once
    flat = torch.cat([blocks[0]] + [b[1:] for b in blocks[1:]]).tolist()
    assert flat == expected[: len(flat)]
    assert tok.eos_id in flat


# ---- shuffling and epochs ----------------------------------------------------------------------------------------


def test_epochs_are_complete_reshuffled_and_endless(mirror):
    source = LocalShardSource(find_shards(mirror, "train"), seed=3)
    docs = ShuffledDocs(source, buffer_size=8, seed=3)
    e0, e1 = epochs(docs, 2)
    assert sorted(e0) == sorted(e1) == sorted(mirror_docs(mirror))
    assert e0 != e1  # reshuffled with seed + epoch
    

def test_stream_is_deterministic_for_a_seed(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=8)
    a, b, c = (take(stream(cfg, tok, seed=s), 5) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


# ---- exact resume ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["node", "global"])
@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(tok, mirror, split, world):
    """Stop after k batches (mid-epoch, then again past an epoch boundary), restore, and compare."""
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split=split)
    for rank in range(world):
        full = stream(cfg, tok, rank, world)
        reference = take(full, 60)  # a few epochs of the small mirror
        assert full.epoch >= 1
        for k in (3, 25):
            s = stream(cfg, tok, rank, world)
            take(s, k)
            state = json_roundtrip(s.state_dict())
            resumed = stream(cfg, tok, rank, world)
            resumed.load_state_dict(state)
            got = take(resumed, 60 - k)
            assert all(torch.equal(x, y) for x, y in zip(got, reference[k:])), (split, world, rank, k)


def test_exact_resume_embedded(tok, cache_dir):
    cfg = data_cfg(source="embedded", cache_dir=cache_dir, shuffle_buffer=50)
    s = stream(cfg, tok, 1, 2)
    take(s, 7)
    state = json_roundtrip(s.state_dict())
    reference = take(s, 10)
    resumed = stream(cfg, tok, 1, 2)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 10), reference))


def test_global_state_resumes_at_another_world_size(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split="global")
    two = [stream(cfg, tok, r, 2, mb=2) for r in range(2)]
    for _ in range(4):
        for s in two:
            next(s)
    state = json_roundtrip(two[0].state_dict())
    other = json_roundtrip(two[1].state_dict())
    assert {**state, "rank": None} == {**other, "rank": None}  # the position is the same on every rank
    reference = [torch.cat([next(s) for s in two]) for _ in range(5)]
    one = stream(cfg, tok, 0, 1, mb=4)
    one.load_state_dict(state)
    assert all(torch.equal(next(one), ref) for ref in reference)


# ---- rank splits -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])  # 4 shards: whole shards per rank at 2, every 3rd example at 3
def test_node_split_is_disjoint_and_complete(mirror, world):
    files = find_shards(mirror, "train")
    per_rank = []
    for rank in range(world):
        docs = ShuffledDocs(LocalShardSource(files, rank=rank, world_size=world), buffer_size=4, seed=0,
                            tag=str(rank))
        per_rank.append(epochs(docs)[0])
    everything = [d for docs in per_rank for d in docs]
    assert collections.Counter(everything) == collections.Counter(mirror_docs(mirror))
    assert all(per_rank)


def test_node_split_token_streams_differ_per_rank(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=4)
    a, b = next(stream(cfg, tok, 0, 2)), next(stream(cfg, tok, 1, 2))
    assert not torch.equal(a, b)


def test_global_split_batches_do_not_depend_on_world_size(tok, mirror):
    cfg = data_cfg(source="c4", path=str(mirror), shuffle_buffer=5, split="global")
    global_batch = 4
    batches = {}
    for world in (1, 2, 4):
        streams = [stream(cfg, tok, r, world, mb=global_batch // world) for r in range(world)]
        batches[world] = [torch.cat([next(s) for s in streams]) for _ in range(6)]
    for world in (2, 4):
        assert all(torch.equal(x, y) for x, y in zip(batches[1], batches[world]))


def test_rank_without_documents_fails_instead_of_hanging(tmp_path, tok):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [{"text": "only one document"}])
    cfg = data_cfg(source="c4", path=str(tmp_path), shuffle_buffer=2)
    next(stream(cfg, tok, 0, 2))
    with pytest.raises(DataError, match="no usable documents"):
        next(stream(cfg, tok, 1, 2))


# ---- validation blocks -------------------------------------------------------------------------------------------


def test_val_blocks(tok, cache_dir):
    cfg = data_cfg(source="embedded", cache_dir=cache_dir, val_tokens=1000)
    blocks = build_val_blocks(cfg, tok, seq_len=SEQ)
    assert blocks.shape == (1000 // SEQ, SEQ + 1)
    assert torch.equal(blocks[:-1, -1], blocks[1:, 0])
    assert torch.equal(blocks, build_val_blocks(cfg, tok, seq_len=SEQ))  # no rank, no shuffle: always the same
    first = find_shards(Path(cache_dir) / "embedded", "validation")[0]
    with gzip.open(first, "rt") as fh:
        first_doc = json.loads(fh.readline())["text"]
    assert blocks[0].tolist() == tok.encode(first_doc)[: SEQ + 1]


def test_val_blocks_shorter_split_warns(tok, mirror, caplog):
    cfg = data_cfg(source="c4", path=str(mirror), val_tokens=10**6)
    blocks = build_val_blocks(cfg, tok, seq_len=SEQ)
    assert 0 < blocks.shape[0] < 10**6 // SEQ
    assert "less than data.val_tokens" in caplog.text


# ---- real C4 samples (both schemas) ------------------------------------------------------------------------------


def test_real_c4_samples(tok, shared_mirror):
    cfg = data_cfg(source="c4", path=str(shared_mirror), shuffle_buffer=4, val_tokens=512)
    s = stream(cfg, tok, mb=2)
    batches = take(s, 30)
    assert all(b.shape == (2, SEQ + 1) for b in batches)
    assert sum(s.stats.values()) == 0
    assert build_val_blocks(cfg, tok, seq_len=SEQ).shape == (512 // SEQ, SEQ + 1)
    # the Dolma-style validation sample (text,id,added,...) is read through the same reader
    files = find_shards(shared_mirror, "validation")
    assert [f.name for f in files] == ["c4-validation-sample.jsonl.gz"]
    (docs,) = epochs(ShuffledDocs(LocalShardSource(files), buffer_size=1, seed=0))
    assert len(docs) == 10 and all(docs)


def test_hub_code_path_on_local_files(mirror):
    """HFStreamSource is the hub reader (datasets streaming); run it on local JSON files, at 2 ranks, with resume."""
    from datasets import load_dataset

    files = [str(f) for f in find_shards(mirror, "train")]

    def factory():
        return load_dataset("json", data_files=files, split="train", streaming=True)

    per_rank = []
    for rank in range(2):
        src = HFStreamSource(factory, name="local json", rank=rank, world_size=2)
        docs = []
        while (d := src.next_doc()) is not None:
            docs.append(d)
            if len(docs) == 3:
                state = json_roundtrip(src.state_dict())
        per_rank.append(docs)
        resumed = HFStreamSource(factory, name="local json", rank=rank, world_size=2)
        resumed.load_state_dict(state)
        rest = []
        while (d := resumed.next_doc()) is not None:
            rest.append(d)
        assert rest == docs[3:]
    assert collections.Counter(per_rank[0] + per_rank[1]) == collections.Counter(mirror_docs(mirror))


def test_hub_source_end_to_end_with_load_dataset_redirected(monkeypatch, tok, mirror):
    """data.source=c4 without data.path streams allenai/c4 through datasets; redirect load_dataset to local files
    (no network here) and run the whole hub path: split by node, shuffle, pack, resume, validation blocks."""
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def fake_load(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        files = [str(f) for f in find_shards(mirror, split)]
        return real_load("json", data_files=files, split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = data_cfg(source="c4", path=None, shuffle_buffer=4, val_tokens=64)
    for rank in range(2):
        s = stream(cfg, tok, rank, 2)
        take(s, 3)
        state = json_roundtrip(s.state_dict())
        reference = take(s, 30)  # crosses an epoch boundary of this rank's half
        assert s.epoch >= 1
        resumed = stream(cfg, tok, rank, 2)
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(take(resumed, 30), reference))
    assert build_val_blocks(cfg, tok, seq_len=SEQ).shape == (64 // SEQ, SEQ + 1)
    assert calls[0] == ("allenai/c4", "en", "train", True) and ("allenai/c4", "en", "validation", True) in calls
