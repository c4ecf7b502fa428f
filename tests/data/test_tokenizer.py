"""Tokenizer loading (shipped, existing, broken models) and tokenizer training."""

import os
from pathlib import Path

import pytest
import sentencepiece as spm
from script_loader import load_script

from datahelpers import hub_cache, make_mirror  # tests/data is on sys.path (pyproject's pythonpath)
from lotus_dist.data import DataError, load_tokenizer


def _train_module():
    return load_script("tokenizer/train.py", "tokenizer_train")


def test_shipped_model(tok):
    assert tok.vocab_size == 8000
    assert tok.eos_id == 2 and tok.bos_id == 1
    text = "HAMLET.\nTo be, or not to be:  that is the question.\n\n1599 café"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text  # identity normalisation: newlines and spaces survive


def test_relative_path_resolves_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("tokenizer/embedded.model").vocab_size == 8000
    assert load_tokenizer("embedded").vocab_size == 8000  # the short name


def test_relative_path_prefers_current_dir(tmp_path, monkeypatch):
    model = tmp_path / "tokenizer" / "embedded.model"
    model.parent.mkdir()
    _tiny_model(tmp_path / "mirror", model, vocab_size=300)
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer("tokenizer/embedded.model").vocab_size == 300


def _tiny_model(mirror_root, output, **kw):
    make_mirror(mirror_root, n_train_shards=2, docs_per_shard=5)
    return _train_module().train(str(mirror_root), output, quiet=True, threads=1, **kw)


def test_training_on_a_handful_of_documents(tmp_path):
    out = _tiny_model(tmp_path / "mirror", tmp_path / "tiny.model", vocab_size=300, num_docs=6)
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 300 and tok.eos_id == 2
    assert tok.decode(tok.encode("the of and to")) == "the of and to"
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


def test_training_unigram(tmp_path):
    out = _tiny_model(tmp_path / "mirror", tmp_path / "uni.model", vocab_size=300, model_type="unigram")
    assert load_tokenizer(str(out)).vocab_size == 300


def test_existing_model_without_bos_is_accepted(tmp_path):
    """T5's spiece.model: no BOS, EOS = 1, pad = 0."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i} of a small corpus" for i in range(200)))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "t5"), vocab_size=60,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "t5.model"))
    assert tok.eos_id == 1 and tok.bos_id is None


def test_model_without_eos_fails_clearly(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"sentence number {i}" for i in range(200)))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(tmp_path / "noeos"), vocab_size=40,
                                   hard_vocab_limit=False, eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="defines no EOS"):
        load_tokenizer(str(tmp_path / "noeos.model"))


def test_not_a_model(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(str(bad))


# ---- hf:<repo> (the Hugging Face cache, tested offline on a cache laid out as huggingface_hub lays it out) ----

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = hub_cache(tmp_path / "hub")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_name_reads_the_cache(offline_hub):
    tok = load_tokenizer("hf:google-t5/t5-base")  # no tokenizer.model in the repo: spiece.model, T5's name
    assert tok.vocab_size == 8000 and Path(tok.path).name == "spiece.model"
    assert str(offline_hub) in str(Path(tok.path).resolve().parent.parent.parent)
    assert load_tokenizer("hf:google-t5/t5-base:spiece.model").vocab_size == 8000


@pytest.mark.parametrize("spec, needle", [
    ("hf:", "is not hf:<repo>"),
    ("hf:a/b/c", "is not hf:<repo>"),
    ("hf:google-t5/t5-small", "'hf:google-t5/t5-small' has no sentencepiece model in reach"),
    ("hf:google-t5/t5-base:tokenizer.model", "has no sentencepiece model in reach (tokenizer.model:"),
])
def test_hub_name_errors_name_the_spec(offline_hub, spec, needle):
    with pytest.raises(DataError, match="data.tokenizer") as e:
        load_tokenizer(spec)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_hub_name_one_process_per_machine_downloads(offline_hub, monkeypatch):
    """The first process may download; the others only read the cache, after every process agreed."""
    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **k: calls.append(k["local_files_only"]) or real(*a, **k))
    agreed = []
    tok = load_tokenizer("hf:google-t5/t5-base", first=False, agree=lambda p: agreed.append(p) or [None, p])
    assert tok.vocab_size == 8000 and agreed == [None] and calls and all(calls)  # never the network
    calls.clear()
    load_tokenizer("hf:google-t5/t5-base", first=True, agree=lambda p: [p])
    assert calls[0] is False
    # the first process's failure stops every process with its message
    with pytest.raises(DataError, match="fetch failed on the first"):
        load_tokenizer("hf:google-t5/t5-base", first=False, agree=lambda p: ["fetch failed on the first", p])
