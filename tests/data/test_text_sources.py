"""The document sources and the shuffle (text_sources.py, shuffle.py): epochs, rank splits of documents, real C4
samples, the hub reader."""

import collections

import pytest
import torch

from datahelpers import SEQ, data_cfg, json_roundtrip, mirror_docs, stream, take, write_shard
from lotus_dist.data import DataError, build_val_blocks
from lotus_dist.data.shuffle import ShuffledDocs
from lotus_dist.data.text_sources import HFStreamSource, LocalShardSource, find_shards


def epochs(docs, n=1):
    """The documents of the first n epochs of a ShuffledDocs, one list per epoch."""
    out = [[] for _ in range(n)]
    while True:
        doc = docs.next_doc()  # afterwards docs.epoch is the epoch this document belongs to
        if docs.epoch >= n:
            return out
        out[docs.epoch].append(doc)


# ---- shuffling and epochs --------------------------------------------------------------------------------------------


def test_epochs_are_complete_reshuffled_and_endless(mirror):
    source = LocalShardSource(find_shards(mirror, "train"), seed=3)
    docs = ShuffledDocs(source, buffer_size=8, seed=3)
    e0, e1 = epochs(docs, 2)
    assert sorted(e0) == sorted(e1) == sorted(mirror_docs(mirror))
    assert e0 != e1  # reshuffled with seed + epoch


# ---- rank splits of documents ----------------------------------------------------------------------------------------


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


def test_rank_without_documents_fails_instead_of_hanging(tmp_path, tok):
    write_shard(tmp_path / "c4-train.00000-of-00001.json.gz", [{"text": "only one document"}])
    cfg = data_cfg(source="c4", path=str(tmp_path), shuffle_buffer=2)
    next(stream(cfg, tok, 0, 2))
    with pytest.raises(DataError, match="no usable documents"):
        next(stream(cfg, tok, 1, 2))


# ---- real C4 samples (both schemas) ----------------------------------------------------------------------------------


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


# ---- the hub reader --------------------------------------------------------------------------------------------------


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
