"""What a resume may change (README "What a resume may change"): optimizer settings are either really applied —
in the steps after the resume and in the next checkpoint — or refused at start-up naming the key and the
checkpoint's value, before a state they do not fit is loaded. One resume per row of the table."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lotus_dist.optim.options import LOWRANK_DEFAULTS
from lotus_dist.optim.methods import METHODS
from lotus_dist.train.metrics import read_metrics
from lotus_dist.train.resume_changes import ON_RESUME, REFUSED

from pretrain_runs import REPO, one_error_line, run, step_dirs  # tests/ is on sys.path (pyproject's pythonpath)
from tokenizer_copies import swapped_model

pytestmark = pytest.mark.slow  # trains for a while: runs resumed with changed settings

BASE = ["train.steps=2", "train.eval_every=0", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def lotus_run(tmp_path_factory, small_args):
    """Two steps of Lotus with a checkpoint at step 2, to resume from with changed settings."""
    work = tmp_path_factory.mktemp("resume_changes")
    args = [*small_args, *BASE, f"data.cache_dir={work / 'cache'}"]
    assert run(args + [f"run.dir={work / 'base'}"]) == 0
    return work, args


def resume(lotus_run, tmp_path, *changes) -> tuple[int, Path]:
    work, args = lotus_run
    run_dir = tmp_path / "run"
    shutil.copytree(work / "base", run_dir)
    return run(args + [f"run.dir={run_dir}", "train.steps=4", *changes]), run_dir


def resume_in(lotus_run, run_dir: Path, *changes) -> int:
    _, args = lotus_run
    return run(args + [f"run.dir={run_dir}", "train.steps=4", *changes])


def saved_groups(run_dir: Path, step: int) -> list[dict]:
    return json.loads((run_dir / f"checkpoints/step_{step:08d}/train_state.json").read_text())["optim_groups"]


def losses(run_dir: Path) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if "loss" in line]


@pytest.fixture(scope="module")
def unchanged(lotus_run, tmp_path_factory):
    """The resume with nothing changed: the trajectory an applied change must leave."""
    code, run_dir = resume(lotus_run, tmp_path_factory.mktemp("unchanged"))
    assert code == 0
    return losses(run_dir)


@pytest.mark.parametrize("change, key, value", [
    ("optim.weight_decay=0.5", "weight_decay", 0.5),
    ("optim.betas=[0.5,0.5]", "betas", [0.5, 0.5]),
    ("optim.eps=0.01", "eps", 0.01),
    ("optim.scale=2.0", "scale", 2.0),
])
def test_a_changed_hyper_parameter_is_applied_and_kept_in_the_next_checkpoint(lotus_run, unchanged, tmp_path,
                                                                              capsys, change, key, value):
    code, run_dir = resume(lotus_run, tmp_path, change)
    assert code == 0
    out = capsys.readouterr().out
    assert "resume applies the changed optimizer settings" in out and f"optim.{key}" in out, out
    groups = saved_groups(run_dir, 4)
    assert all(g[key] == value for g in groups if key in g) and any(key in g for g in groups)
    # really used: the steps after the resume differ from the unchanged resume's, the steps before are the same
    changed = losses(run_dir)
    assert changed[:2] == unchanged[:2] and changed[2:] != unchanged[2:]


def test_a_changed_solver_is_the_one_of_the_next_refresh(lotus_run, tmp_path):
    """rsvd -> svd: applied (neither keeps state of its own); a check every step with a threshold every
    displacement passes makes a refresh happen at step 3, where the two solvers' bases differ."""
    switching = ["optim.verify_gap=1", "optim.gamma=10"]
    code, same = resume(lotus_run, tmp_path / "rsvd", *switching)
    assert code == 0
    code, changed = resume(lotus_run, tmp_path / "svd", *switching, "optim.solver=svd")
    assert code == 0
    assert [g.get("solver") for g in saved_groups(changed, 4)] == ["svd", None]
    assert losses(changed)[:3] == losses(same)[:3] and losses(changed)[3] != losses(same)[3]


def test_a_schedule_and_check_interval_change_is_applied(lotus_run, tmp_path):
    code, run_dir = resume(lotus_run, tmp_path, "optim.gamma=0.5", "optim.verify_gap=1", "optim.update_gap=3")
    assert code == 0
    projected = saved_groups(run_dir, 4)[0]
    assert (projected["gamma"], projected["verify_gap"], projected["update_gap"]) == (0.5, 1, 3)


@pytest.mark.parametrize("change, old", [
    ("optim.switch=fixed", "optim.switch=displacement"),  # was: KeyError 'tau' in the first step
    ("optim.switch=path_efficiency", "optim.switch=displacement"),  # was: a DCP traceback (pe_acc missing)
    ("optim.residual=fira", "optim.residual=none"),  # was: a DCP traceback (fira_norm missing)
    ("optim.reference_dtype=fp32", "optim.reference_dtype=bf16"),
    ("optim.solver=online_pca", "optim.solver=rsvd"),
    ("optim.proj_type=left", "optim.proj_type=std"),
])
def test_a_change_of_state_or_meaning_is_refused_naming_the_checkpoints_value(lotus_run, tmp_path, capsys, change,
                                                                              old):
    capsys.readouterr()
    code, run_dir = resume(lotus_run, tmp_path, change)
    assert code == 2
    err = one_error_line(capsys)
    assert old in err and change in err and "step_00000002" in err, err
    assert step_dirs(run_dir) == ["step_00000002"]  # refused before anything was written


def test_a_checkpoint_without_the_record_is_checked_on_the_groups_it_loads(lotus_run, tmp_path, capsys):
    """Checkpoints written before train_state.json recorded the settings: the loaded groups are compared."""
    work, _ = lotus_run
    for change, code in (("optim.weight_decay=0.5", 0), ("optim.switch=fixed", 2)):
        run_dir = tmp_path / change
        shutil.copytree(work / "base", run_dir)
        state = run_dir / "checkpoints/step_00000002/train_state.json"
        record = json.loads(state.read_text())
        del record["optim_groups"]
        state.write_text(json.dumps(record))
        (run_dir / "checkpoints/step_00000002/manifest_rank_00000.json").unlink()  # legacy: no manifest either
        (run_dir / "checkpoints/step_00000002/COMPLETE").write_text("step 2\n")
        capsys.readouterr()
        assert resume_in(lotus_run, run_dir, change) == code
        if code == 0:
            assert saved_groups(run_dir, 4)[0]["weight_decay"] == 0.5
        else:
            assert "optim.switch=displacement" in one_error_line(capsys)


def test_every_param_group_key_of_every_method_is_in_the_table():
    """A new option must be classified (applied or refused); an unclassified one would be refused on resume."""
    keys = set(LOWRANK_DEFAULTS) | {"rank", "betas", "eps", "weight_decay", "initial_lr"}
    keys |= {k for parts in METHODS.values() if parts for k in parts}
    assert keys <= set(ON_RESUME), sorted(keys - set(ON_RESUME))
    assert {k for k, (what, _) in ON_RESUME.items() if what == REFUSED} == {
        "rank", "proj_type", "granularity", "switch", "residual", "reference_dtype", "state_dtype"}


def test_a_resume_does_not_need_the_init_from_folder(tmp_path, small_overrides, capsys):
    """model.init_from is read by a fresh start only: a resume continues after the folder is gone (item 14)."""
    run_dir = tmp_path / "run"
    args = small_overrides + BASE + [f"run.dir={run_dir}"]
    assert run(args) == 0
    export = tmp_path / "hf"
    subprocess.run([sys.executable, str(REPO / "scripts/export_hf.py"), "--run-dir", str(run_dir), "--out",
                    str(export)], check=True, cwd=REPO, capture_output=True)
    second = tmp_path / "continued"
    assert run(small_overrides + BASE + [f"run.dir={second}", f"model.init_from={export}"]) == 0
    shutil.rmtree(export)
    capsys.readouterr()
    assert run(small_overrides + BASE + [f"run.dir={second}", f"model.init_from={export}", "train.steps=4"]) == 0
    out = capsys.readouterr().out
    assert "model.init_from is not read" in out and "resumed from" in out
    # a fresh start still refuses the missing folder, in one line
    assert run(small_overrides + BASE + [f"run.dir={tmp_path / 'fresh'}", f"model.init_from={export}"]) == 2
    assert "is not a Hugging Face model folder" in one_error_line(capsys)


def test_the_readme_table_says_what_the_code_does():
    """README's "What a resume may change" lists every optimizer setting in the column the code puts it in."""
    text = (REPO / "README.md").read_text()
    rows = text[text.index("| applied on resume | refused on resume |"):].split("\n\n")[0].splitlines()[2:]
    applied = " ".join(r.strip().strip("|").split(" | ")[0] for r in rows)
    refused = " ".join(r.strip().strip("|").split(" | ")[1] for r in rows)
    for key, (what, _) in ON_RESUME.items():
        name = "`optim.lr`" if key == "initial_lr" else f"`optim.{key}`"
        assert name in (refused if what == REFUSED else applied), (key, what)
    assert "`optim.solver` to or from `online_pca`" in refused


def test_another_tokenizer_of_the_same_size_is_refused_on_resume_unless_allowed(lotus_run, tmp_path, capsys):
    """Item 10: the checkpoint records the tokenizer's fingerprint; ids of another model mean other tokens."""
    other = swapped_model(tmp_path / "swapped.model")
    capsys.readouterr()
    code, run_dir = resume(lotus_run, tmp_path, f"data.tokenizer={other}")
    assert code == 2
    err = one_error_line(capsys)
    assert "another tokenizer" in err and "data.allow_tokenizer_change=true" in err and "step_00000002" in err, err
    assert resume_in(lotus_run, run_dir, f"data.tokenizer={other}", "data.allow_tokenizer_change=true") == 0


def test_an_option_added_since_the_checkpoint_compares_as_its_default(tmp_path):
    """A checkpoint's record written before optim.state_dtype existed lacks the key: it was written with the default
    (fp32 moments), so a run at the default resumes and a run asking for int8 is refused, naming the default."""
    from lotus_dist.errors import UserError
    from lotus_dist.train.resume_changes import changes

    saved = [{"rank": 8, "betas": [0.9, 0.999]}, {"betas": [0.9, 0.999]}]
    at_default = [{**g, "state_dtype": "fp32"} for g in saved]
    assert changes(saved, at_default, tmp_path) == []
    with pytest.raises(UserError, match=r"optim.state_dtype=fp32, this run has optim.state_dtype=int8"):
        changes(saved, [{**g, "state_dtype": "int8"} for g in saved], tmp_path)
