import sys
from pathlib import Path

# The spawn helper and the worker script live beside the tests; --import-mode=importlib does not put this
# directory on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))
