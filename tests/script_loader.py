"""Load one of the repository's scripts (scripts/*.py, tokenizer/train.py) as a module, for tests of its logic."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str, name: str) -> ModuleType:
    """Execute REPO/relative_path as a fresh module registered as `name` (dataclasses look their module up in
    sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
