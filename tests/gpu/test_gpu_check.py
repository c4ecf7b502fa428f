"""scripts/gpu_check.py cannot rot between GPU sessions: its dry run (every section, tiny shapes, on the CPU) runs
here, and a failing check or section must give a non-zero exit and still leave a report."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def gpu_check():
    return load_script("scripts/gpu_check.py", "gpu_check")


def test_dry_run_passes_every_section(tmp_path):
    report = tmp_path / "report.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LOTUS_CHECK_DEVICE", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--report", str(report), "--budget", "900"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    text = report.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + text[-3000:]
    for heading in ("## 1. Environment", "## 2. Correctness", "## 3. Speed", "## 4. Memory"):
        assert heading in text
    assert "FAIL" not in text and "skipped" not in text and "**all checks passed**" in text
    # the correctness tests really ran (on the CPU), not skipped; the torchrun run resumed bit for bit
    assert re.search(r"PASS: pytest -m gpu tests/gpu on cpu — \d+ passed", text)
    assert "PASS: ran on cpu with gloo" in text and "bitwise: yes" in text
    # one speed table per model, one memory table per shape, each with a row per method
    assert text.count("| method | steady step |") == 2 and text.count("| method | peak |") == 2
    for method in ("adamw", "galore", "lotus", "lotus+per_layer", "lotus+per_layer+ac"):
        assert f"| {method} |" in text


def test_a_failing_section_still_writes_the_report_and_exits_1(tmp_path, monkeypatch):
    script = gpu_check()

    def broken(report, plan, ctx):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(script, "section_env", broken)
    report = tmp_path / "report.md"
    assert script.main(["--dry-run", "--only", "env", "--report", str(report)]) == 1
    text = report.read_text()
    assert "FAIL: the section raised" in text and "RuntimeError: no such kernel" in text
    assert "**FAILED: 1. Environment**" in text


def test_a_failed_check_exits_1(tmp_path, monkeypatch):
    script = gpu_check()
    monkeypatch.setattr(script, "section_env", lambda report, plan, ctx: report.check("a check", False, "why"))
    report = tmp_path / "report.md"
    assert script.main(["--dry-run", "--only", "env", "--report", str(report)]) == 1
    assert "- FAIL: a check — why" in report.read_text()


def test_bad_section_name_is_refused(capsys):
    script = gpu_check()
    try:
        script.main(["--dry-run", "--only", "env,sped"])
    except SystemExit as e:
        assert e.code == 2
    assert "--only: unknown section(s) ['sped']" in capsys.readouterr().err
