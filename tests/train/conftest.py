import pytest

# A model and run small enough for a 2-core CPU: a few seconds per 40 steps.
SMALL = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.ffn_dim=172", "train.seq_len=32",
         "train.batch_size=8", "train.micro_batch_size=4", "data.val_tokens=2048", "log.every=1",
         "log.tensorboard=false", "log.progress=false", "optim.rank=8"]


@pytest.fixture
def small_overrides(tmp_path):
    return SMALL + [f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="session")
def small_args():
    """SMALL, for module-scoped fixtures (which cannot use the function-scoped ``small_overrides``)."""
    return list(SMALL)
