"""scripts/bench_data.py --quick runs end to end (so that the benchmark cannot rot)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_data_quick(cache_dir):
    proc = subprocess.run([sys.executable, "scripts/bench_data.py", "--quick", "--cache-dir", cache_dir], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for section in ("## 1. pipeline alone", "## 2. overlap", "## 3. tokens/s each rank", "## 4. needed per GPU"):
        assert section in out
    assert "prefetch depth 2" in out and "torch ops" in out
    ratio_rows = [line.split() for line in out.split("ratio pipeline / needed")[1].splitlines()[2:10]]
    assert [(row[0], row[1]) for row in ratio_rows] == [(w, s) for w in "1248" for s in ("global", "node")]
    assert all(float(x) > 0 for row in ratio_rows for x in row[2:])
