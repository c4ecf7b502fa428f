import pytest
from pretrain_runs import SMALL  # tests/ is on sys.path (pyproject's pythonpath)


@pytest.fixture
def small_overrides(tmp_path):
    return SMALL + [f"data.cache_dir={tmp_path / 'cache'}"]


@pytest.fixture(scope="session")
def small_args():
    """SMALL, for module-scoped fixtures (which cannot use the function-scoped ``small_overrides``)."""
    return list(SMALL)
