"""scripts/gpu_check.py cannot rot between GPU sessions, nor trip on itself: its dry run (every section, tiny shapes,
on the CPU) runs here with every distribution outside its declared needs hidden; a missing need stops it before
anything runs, with one line naming what to install; every item ends before the budget (a fake clock); an item that
overruns is stopped (a subprocess with its whole tree) and reported; a failing check or section gives a non-zero
exit and still leaves a report."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from script_loader import load_script

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def gpu_check():
    return load_script("scripts/gpu_check.py", "gpu_check")


def part(name: str):
    """A module of scripts/gpucheck (the script's parts), loaded the way the script loads them."""
    gpu_check()
    import importlib

    return importlib.import_module(f"gpucheck.{name}")


# ---- only the declared needs ----------------------------------------------------------------------------------------

# A sitecustomize for the child processes: a top-level module that is not stdlib, not this checkout and not from a
# distribution in LOTUS_ALLOWED_DISTS (or their requirements, recursively) is not found — `import x` raises and
# importlib.util.find_spec("x") is None — as on a GPU machine that has only the needs installed.
ONLY_NEEDS_HOOK = textwrap.dedent('''
    import importlib.machinery
    import importlib.metadata as md
    import os
    import re
    import sys

    _REPO = os.path.realpath(os.environ["LOTUS_REPO"]) + os.sep
    _PREFIX = os.path.realpath(sys.prefix) + os.sep


    def _norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()


    def _closure(names):
        seen, todo = set(), [_norm(n) for n in names]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                requirements = md.requires(name) or []
            except md.PackageNotFoundError:
                continue
            todo += [_norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements if "extra ==" not in r]
        return seen


    _dists = _closure(os.environ["LOTUS_ALLOWED_DISTS"].split(","))
    _allowed = {top for top, dists in md.packages_distributions().items() if any(_norm(d) in _dists for d in dists)}


    class _OnlyNeeds(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            spec = super().find_spec(name, path, target)
            if (spec is None or "." in name or name in _allowed or name in sys.stdlib_module_names
                    or name.startswith("_sysconfigdata")):
                return spec
            where = os.path.realpath(spec.origin or next(iter(spec.submodule_search_locations or []), "") or "/")
            if where.startswith(_REPO) and not where.startswith(_PREFIX):
                return spec  # this checkout (lotus_dist, the scripts, the tests), not an installed package
            return None


    sys.meta_path[:] = [_OnlyNeeds if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
''')


def only_needs_env(tmp_path: Path, dists: list[str]) -> dict:
    hook = tmp_path / "only_needs"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(ONLY_NEEDS_HOOK)
    env = dict(os.environ, OMP_NUM_THREADS="1", LOTUS_REPO=str(REPO), LOTUS_ALLOWED_DISTS=",".join(dists),
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("LOTUS_CHECK_DEVICE", None)
    return env


@pytest.mark.slow  # the whole dry run: torchrun runs and benchmarks
def test_dry_run_passes_every_section_with_only_the_declared_needs(tmp_path):
    """The needs of needs.py are all the check and what it runs (pytest, torchrun, pretrain.py) import."""
    env = only_needs_env(tmp_path, part("needs").pip_names())
    hidden = subprocess.run([sys.executable, "-c", "import tqdm"], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'tqdm'" in hidden.stderr  # the hook hides what is installed
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--report", str(report), "--budget", "900"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=960)
    text = report.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + text[-3000:]
    for heading in ("## 1. Environment", "## 2. Correctness", "## 3. Speed", "## 4. Memory"):
        assert heading in text
    assert "FAIL" not in text and "- skipped" not in text and "**all checks passed**" in text
    # the correctness tests really ran (on the CPU), not skipped; the torchrun run resumed bit for bit
    assert re.search(r"PASS: pytest -m gpu tests/gpu on cpu — \d+ passed", text)
    assert "PASS: ran on cpu with gloo" in text and "bitwise: yes" in text
    # one speed table per model, one memory table per shape, each with a row per method
    assert text.count("| method | steady step |") == 2 and text.count("| method | peak |") == 2
    for method in ("adamw", "galore", "lotus", "lotus+compile", "lotus+fused", "lotus+per_layer", "lotus+per_layer+ac"):
        assert f"| {method} |" in text
    assert text.count("compiled / eager tokens/s (lotus+compile / lotus, train.compile=true): ") == 2
    assert text.count("fused / per-matrix optimizer step (lotus+fused / lotus, optim.fused=true): ") == 2
    elapsed, budget = map(int, re.search(r"\((\d+) s in all, budget (\d+) s\)", text).groups())
    assert budget == 900 and elapsed <= budget


def test_a_missing_need_stops_the_check_first_with_one_line(tmp_path):
    """pyyaml and pytest hidden: exit 2, one line naming both, and nothing ran (no report)."""
    env = only_needs_env(tmp_path, ["torch", "numpy", "sentencepiece"])
    report = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--report", str(report)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install pytest pyyaml" in lines[0], proc.stderr
    assert proc.stdout == "" and not report.exists()


def test_needs_are_per_section_and_a_fake_module_is_named(tmp_path, monkeypatch, capsys):
    script, needs = gpu_check(), part("needs")
    absent = {"pytest"}
    assert needs.missing(["env"], find_spec=lambda m: None if m in absent else object()) == []
    assert needs.missing(["env", "correctness"], find_spec=lambda m: None if m in absent else object()) == ["pytest"]
    found = lambda m: object()  # noqa: E731
    assert needs.missing(["correctness"], find_spec=found, version=lambda p: "6.2.5") == ["pytest>=7.0"]
    assert needs.missing(["correctness"], find_spec=found, version=lambda p: "8.3.1") == []
    monkeypatch.setitem(needs.NEEDS, "speed", {"lotus_no_such_module": "lotus-no-such-package"})
    report = tmp_path / "report.md"
    assert script.main(["--dry-run", "--only", "speed", "--report", str(report)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks lotus-no-such-package; install with: pip install lotus-no-such-package" in err[0]
    assert not report.exists()


def test_the_speed_section_reads_lotus_dist_s_peak_table_and_flop_formula():
    """MFU's two factors are the trainer's: the datasheet peak by device name (a variant before its family), else
    the measured yardstick; the FLOPs of one token by the model's formula."""
    mfu = part("mfu")
    from lotus_dist.model.llama import Llama, flops_per_token, llama_config

    assert mfu.peak_flops({"gpu_name": "NVIDIA H100 PCIe"})[0] == 756e12
    assert mfu.peak_flops({"gpu_name": "NVIDIA H100 80GB HBM3"})[0] == 989e12
    assert mfu.peak_flops({"gpu_name": "NVIDIA H200"})[0] == 989e12
    assert mfu.peak_flops({"gpu_name": "NVIDIA A100-SXM4-80GB"})[0] == 312e12
    assert mfu.peak_flops({"gpu_name": "NVIDIA B200"})[0] == 2250e12
    assert mfu.peak_flops({"gpu_name": "NVIDIA GeForce RTX 4090"})[0] == 165e12
    assert mfu.peak_flops({"gpu_name": "Some GPU", "yardstick_tflops": 12.5})[0] == 12.5e12
    cfg = llama_config("tiny", dim=64, n_layers=2, n_heads=4, ffn_dim=172, vocab_size=512)
    with __import__("torch").device("meta"):
        model = Llama(cfg)
    assert mfu.model_flops_per_token(model, 32) == flops_per_token(cfg, 32)


# ---- the budget ---------------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_every_item_gets_a_timeout_that_ends_before_the_budget(tmp_path, monkeypatch):
    """The GPU plan's items, each running to its time limit (the worst case), on a fake clock: every window ends
    before the deadline less the reserve; pytest's limit is cut to what is left; what cannot fit is skipped with its
    reason; nothing waits for real."""
    budget_mod, items, plan_mod, report_mod = part("budget"), part("items"), part("plan"), part("report")
    clock = FakeClock(1000.0)
    budget = budget_mod.Budget(480, start=1000.0, clock=clock)
    assert budget.reserve == budget_mod.RESERVE_S
    end = 1000.0 + 480 - budget.reserve
    windows = []

    @contextlib.contextmanager
    def runs_to_its_limit(seconds):
        windows.append((clock.now, seconds))
        clock.now += seconds
        raise budget_mod.ItemTimeout()
        yield  # noqa: unreachable (a generator)

    def command_runs_to_its_limit(cmd, *, cwd, env, timeout, log):
        windows.append((clock.now, timeout))
        clock.now += timeout
        return None, "still running"

    monkeypatch.setattr(budget_mod, "time_limit", runs_to_its_limit)
    monkeypatch.setattr(budget_mod, "run_command", command_runs_to_its_limit)
    report = report_mod.Report(tmp_path / "r.md", "t")
    check = items.Check(report=report, budget=budget)
    gpu = plan_mod.plan_for(False)
    clock.now += 25  # start-up: torch imported, CUDA initialised
    check.attempt("yardstick", gpu.needs["env"], gpu.limits["env"], lambda: None)
    assert check.command("pytest", ["pytest"], needs=gpu.needs["pytest"], limit=600, log=tmp_path / "l", env={},
                         cwd=tmp_path) is None
    for i in range(6):
        check.attempt(f"item {i}", gpu.needs["step"], gpu.limits["step"], lambda: None)
    assert windows and all(start + timeout <= end + 1e-9 for start, timeout in windows), windows
    assert clock.now <= end + 1e-9
    assert windows[1][1] < 600 and windows[1][0] + windows[1][1] == pytest.approx(end)  # cut to the budget
    text = "\n".join(report.lines)
    assert "- skipped: yardstick — timed out after 60 s (its own limit)" in text
    assert re.search(r"- skipped: pytest — stopped at the end of the budget after 375 s; its process tree was "
                     r"killed", text)
    assert re.search(r"- skipped: item 0 — needs ~15 s, 0 s of the budget left", text)
    assert report.skipped == ["yardstick", "pytest"] + [f"item {i}" for i in range(6)] and not report.failures
    # an item that finishes early leaves the rest to the next; one that does not fit is not started
    clock = FakeClock(0.0)
    budget = budget_mod.Budget(100, start=0.0, reserve=10, clock=clock)
    check = items.Check(report=report_mod.Report(tmp_path / "s.md", "t"), budget=budget)
    monkeypatch.setattr(budget_mod, "time_limit", lambda seconds: (windows.append((clock.now, seconds)),
                                                                    contextlib.nullcontext())[1])
    windows.clear()
    ran = []
    for i, (needs, takes) in enumerate([(10, 30), (10, 45), (20, 5), (5, 1)]):
        def work(takes=takes, i=i):
            clock.now += takes
            ran.append(i)
        check.attempt(f"m{i}", needs, 60, work)
    assert ran == [0, 1, 3] and [t for _, t in windows] == [60, 60, 15] and clock.now == 76
    assert "- skipped: m2 — needs ~20 s, 15 s of the budget left" in check.report.lines


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


# A child that starts a grandchild in a session of its own (out of the child's process group, as a careless
# launcher might), writes both pids, and waits on it; the grandchild waits for a signal that never comes.
HANGING_TREE = textwrap.dedent('''
    import subprocess, sys
    grandchild = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True)
    open(sys.argv[1] + ".tmp", "w").write(f"{__import__('os').getpid()} {grandchild.pid}")
    __import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
    grandchild.wait()
''')


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("cut_by", ["budget", "own limit"])
def test_a_subprocess_past_its_timeout_is_killed_with_its_whole_tree(tmp_path, cut_by):
    budget_mod, items, report_mod = part("budget"), part("items"), part("report")
    # a 3 s window: the budget's end (a skip) or the item's own limit (a failure: a hang)
    budget = budget_mod.Budget(4, reserve=1) if cut_by == "budget" else budget_mod.Budget(600)
    limit = 1000 if cut_by == "budget" else 3
    report = report_mod.Report(tmp_path / "r.md", "t")
    check = items.Check(report=report, budget=budget)
    pids = tmp_path / "pids"
    result = check.command("hanging tree", [sys.executable, "-c", HANGING_TREE, str(pids)], needs=1, limit=limit,
                           log=tmp_path / "tree.log", env=dict(os.environ), cwd=tmp_path)
    assert result is None
    assert pids.exists(), "the child did not start its grandchild within its time limit"
    child, grandchild = map(int, pids.read_text().split())
    try:
        assert not alive(child) and not alive(grandchild)
    finally:  # whatever the outcome, nothing of the test is left running
        for pid in (child, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    text = "\n".join(report.lines)
    if cut_by == "budget":
        assert re.search(r"- skipped: hanging tree — stopped at the end of the budget after [\d.]+ s; its process tree "
                         r"was killed", text) and not report.failures
    else:
        assert ("- FAIL: hanging tree — did not finish within its own limit of 3 s (a hang?); its process tree was "
                "killed") in text and report.failures == ["hanging tree"]


def test_an_in_process_item_past_its_timeout_is_interrupted(tmp_path):
    budget_mod, items, report_mod = part("budget"), part("items"), part("report")
    report = report_mod.Report(tmp_path / "r.md", "t")
    check = items.Check(report=report, budget=budget_mod.Budget(600))
    never = threading.Event()
    assert check.attempt("a wait for nothing", 0, 0.5, never.wait) == (False, None)
    assert "- skipped: a wait for nothing — timed out after 0.5 s (its own limit)" in report.lines
    assert check.attempt("a quick one", 0, 30, lambda: 42) == (True, 42)
    assert report.verdict() == "all checks that ran passed; 1 item(s) skipped: a wait for nothing"


# ---- exit codes -----------------------------------------------------------------------------------------------------

def test_a_failing_section_still_writes_the_report_and_exits_1(tmp_path, monkeypatch):
    script, env = gpu_check(), part("env")

    def broken(run):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(env, "section_env", broken)
    report = tmp_path / "report.md"
    assert script.main(["--dry-run", "--only", "env", "--report", str(report)]) == 1
    text = report.read_text()
    assert "FAIL: the section raised" in text and "RuntimeError: no such kernel" in text
    assert "**FAILED: 1. Environment**" in text


def test_a_failed_check_exits_1(tmp_path, monkeypatch):
    script, env = gpu_check(), part("env")
    monkeypatch.setattr(env, "section_env", lambda run: run.report.check("a check", False, "why"))
    report = tmp_path / "report.md"
    assert script.main(["--dry-run", "--only", "env", "--report", str(report)]) == 1
    assert "- FAIL: a check — why" in report.read_text()


def test_bad_section_name_is_refused(capsys):
    script = gpu_check()
    with pytest.raises(SystemExit) as e:
        script.main(["--dry-run", "--only", "env,sped"])
    assert e.value.code == 2
    assert "--only: unknown section(s) ['sped']" in capsys.readouterr().err
