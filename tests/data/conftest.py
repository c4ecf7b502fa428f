import shutil

import pytest
from datahelpers import SHARED_C4, make_mirror  # tests/data is on sys.path (pyproject's pythonpath)

from lotus_dist.data import load_tokenizer
from lotus_dist.data.corpus import ensure_embedded_corpus


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer("tokenizer/embedded.model")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    ensure_embedded_corpus(str(path))
    return str(path)


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    return make_mirror(tmp_path_factory.mktemp("mirror"))


@pytest.fixture
def shared_mirror(tmp_path):
    """A C4 mirror made of the real samples in ../shared/data/c4 (renamed like C4 shards) plus synthetic docs."""
    if not SHARED_C4.is_dir():
        pytest.skip(f"real C4 samples not present ({SHARED_C4})")
    root = make_mirror(tmp_path / "c4", n_train_shards=2, docs_per_shard=3, n_val=0)
    (root / "c4-validation.00000-of-00001.json.gz").unlink()
    for i, f in enumerate(sorted(SHARED_C4.glob("c4-sample.*.json.gz"))):
        shutil.copy(f, root / f"c4-train.{10 + i:05d}-of-00020.json.gz")
    shutil.copy(SHARED_C4 / "c4-validation-sample.jsonl.gz", root / "c4-validation-sample.jsonl.gz")
    return root
