import sys
from pathlib import Path

# Helpers shared by every test folder (script_loader) live here; --import-mode=importlib does not put this
# directory on sys.path by itself.
sys.path.insert(0, str(Path(__file__).resolve().parent))
