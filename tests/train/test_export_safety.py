"""scripts/export_hf.py --overwrite replaces a previous export and nothing else: never the run, a folder holding it
or inside it (after symlinks and '..'), the current directory, a file, or a folder of the user's (real directories,
a real 4-step run)."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from script_loader import load_script

import pretrain_runs  # tests/ is on sys.path (pyproject's pythonpath)

REPO = Path(__file__).resolve().parents[2]
EXPORTER = load_script("scripts/export_hf.py", "export_hf_safety")


def export(*args, process=False):
    """(returncode, stdout, stderr) of the exporter's command line, in this process or as a real one."""
    if process:
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_hf.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=REPO)
        return proc.returncode, proc.stdout, proc.stderr
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = EXPORTER.main(list(map(str, args)))
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with a hash of its bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            found[str(path.relative_to(root))] = ("link:" + os.readlink(path) if path.is_symlink()
                                                  else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_args):
    """A finished run (checkpoints of steps 2 and 4) with a neighbour run beside it, under root/runs."""
    root = tmp_path_factory.mktemp("export_safety")
    runs = root / "runs"
    overrides = [*small_args, "train.steps=4", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=2",
                 f"run.dir={runs / 'run'}", f"data.cache_dir={root / 'cache'}"]
    assert pretrain_runs.run(overrides) == 0
    (runs / "neighbour").mkdir()
    (runs / "neighbour" / "notes.txt").write_text("another run's files\n")
    return root, runs / "run"


def refused(args, needle, root, process=False):
    """The export is refused in one line containing ``needle`` and nothing under ``root`` changed."""
    before = tree(root)
    code, _, err = export(*args, process=process)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert tree(root) == before


@pytest.mark.parametrize("out, needle", [
    (lambda run: run, "is the run directory itself"),
    (lambda run: run / ".." / "run", "is the run directory itself"),
    (lambda run: run / "..", "holds the run directory"),
    (lambda run: run.parent.parent, "holds the run directory"),
    (lambda run: run / "sub", "lies inside the run directory"),
    (lambda run: run / "checkpoints", "lies inside the run directory"),
    (lambda run: run / "checkpoints" / ".." / "sub" / "..", "is the run directory itself"),
])
def test_out_that_is_holds_or_lies_in_the_run_is_refused_even_with_overwrite(run, out, needle):
    root, run_dir = run
    refused(["--run-dir", run_dir, "--out", out(run_dir), "--overwrite"], needle, root)


def test_symlinks_are_resolved_before_the_comparison(run, tmp_path):
    root, run_dir = run
    (tmp_path / "link_to_run").symlink_to(run_dir, target_is_directory=True)
    (tmp_path / "link_to_runs").symlink_to(run_dir.parent, target_is_directory=True)
    refused(["--run-dir", run_dir, "--out", tmp_path / "link_to_run", "--overwrite"],
            "is the run directory itself", root)
    refused(["--run-dir", run_dir, "--out", tmp_path / "link_to_runs", "--overwrite"],
            "holds the run directory", root)
    refused(["--run-dir", tmp_path / "link_to_run", "--out", run_dir, "--overwrite"],
            "is the run directory itself", root)
    # OUT.tmp, where the export is written first, must not be the run either
    (tmp_path / "x.tmp").symlink_to(run_dir, target_is_directory=True)
    refused(["--run-dir", run_dir, "--out", tmp_path / "x", "--overwrite"], "is (or holds) the run directory", root)


def test_the_run_itself_as_out_is_refused_by_the_real_command(run):
    root, run_dir = run
    refused(["--run-dir", run_dir, "--out", run_dir, "--overwrite"], "is the run directory itself", root,
            process=True)


def test_overwrite_refuses_a_folder_of_the_users_and_leaves_it_intact(run, tmp_path):
    root, run_dir = run
    mine = tmp_path / "mine"
    (mine / "deep").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work\n")
    (mine / "deep" / "data.bin").write_bytes(b"\x00" * 64)
    before = tree(tmp_path)
    code, _, err = export("--run-dir", run_dir, "--out", mine, "--overwrite")
    assert code == 2 and "refuses to delete" in err and "has no lotus_export.json" in err, err
    assert tree(tmp_path) == before and not (tmp_path / "mine.tmp").exists()


def test_overwrite_replaces_a_previous_export_and_only_that(run, tmp_path):
    root, run_dir = run
    out = tmp_path / "export"
    assert export("--run-dir", run_dir, "--out", out, "--step", 2)[0] == 0
    marker = json.loads((out / "lotus_export.json").read_text())
    assert marker["complete"] and marker["step"] == 2
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != "lotus_export.json")

    code, _, err = export("--run-dir", run_dir, "--out", out)  # without --overwrite
    assert code == 2 and "exists and is not empty" in err

    (tmp_path / "export.tmp").mkdir()  # an interrupted export's leftover (it carries the marker) is cleared
    (tmp_path / "export.tmp" / "lotus_export.json").write_text(json.dumps({"files": ["config.json"]}))
    (tmp_path / "export.tmp" / "config.json").write_text("{")
    assert export("--run-dir", run_dir, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "config.json").read_text())["lotus_dist"]["step"] == 4
    assert not (tmp_path / "export.tmp").exists()

    (out / "results.json").write_text("{}")  # the user's file inside an export: not deleted
    before = tree(tmp_path)
    code, _, err = export("--run-dir", run_dir, "--out", out, "--overwrite", "--step", 2)
    assert code == 2 and "it holds results.json, which the export did not write" in err, err
    assert tree(tmp_path) == before

    (out / "results.json").unlink()  # an export from before the marker: the user removes it by hand
    (out / "lotus_export.json").unlink()
    before = tree(tmp_path)
    code, _, err = export("--run-dir", run_dir, "--out", out, "--overwrite", "--step", 2)
    assert code == 2 and "no lotus_export.json" in err and "remove it yourself" in err, err
    assert tree(tmp_path) == before


def test_a_working_folder_of_the_users_is_not_deleted(run, tmp_path):
    root, run_dir = run
    (tmp_path / "export.tmp").mkdir()
    (tmp_path / "export.tmp" / "keep.txt").write_text("mine\n")
    refused(["--run-dir", run_dir, "--out", tmp_path / "export"], "working folder", tmp_path)


def test_out_that_is_a_file_or_the_current_directory_is_refused(run, tmp_path, monkeypatch):
    root, run_dir = run
    (tmp_path / "file.txt").write_text("not a folder\n")
    for overwrite in ([], ["--overwrite"]):
        refused(["--run-dir", run_dir, "--out", tmp_path / "file.txt", *overwrite], "is a file, not a folder",
                tmp_path)
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    monkeypatch.chdir(here)  # an empty current directory: replacing it would pull it from under the shell
    refused(["--run-dir", run_dir, "--out", ".", "--overwrite"], "is the current directory", tmp_path)
    refused(["--run-dir", run_dir, "--out", "..", "--overwrite"], "is the current directory or holds it", tmp_path)
