"""The trainer end to end on the embedded corpus: learning, exact resume, refusal to overwrite, bad inputs."""

import subprocess
import sys

import pytest
import torch

from lotus_dist.train.metrics import read_metrics
from pretrain_runs import REPO, run, straight_and_resumed, trajectory  # tests/ is on sys.path (pyproject's pythonpath)

pytestmark = pytest.mark.slow  # trains for a while: 40-step runs resumed bitwise, 60 steps


@pytest.mark.parametrize("method, asynchronous", [("lotus", False), ("galore", False), ("lotus", True)])
def test_resumed_run_is_bitwise_identical(tmp_path, small_overrides, method, asynchronous):
    """40 steps straight vs. 20 steps (stopped) + resumed to 40: identical metrics lines for steps 21-40."""
    common = small_overrides + ["train.steps=40", "train.eval_every=10", "checkpoint.every=20", f"optim.name={method}",
                                "optim.verify_gap=5", "optim.gamma=0.1", "optim.update_gap=7",
                                f"checkpoint.async_save={str(asynchronous).lower()}"]
    assert run(common + [f"run.dir={tmp_path / 'straight'}"]) == 0
    assert run(common + [f"run.dir={tmp_path / 'resumed'}", "train.stop_at=20"]) == 0
    assert max(l["step"] for l in read_metrics(tmp_path / "resumed")) == 20
    assert run(common + [f"run.dir={tmp_path / 'resumed'}"]) == 0
    straight, resumed = trajectory(tmp_path / "straight", 21, 40), trajectory(tmp_path / "resumed", 21, 40)
    assert len(straight) == 20 and straight == resumed
    assert straight[-1]["switches"] > trajectory(tmp_path / "straight", 20, 20)[0]["switches"], "no switch after resume"
    # The whole file, not only its tail: nothing logged twice or lost around the resume point.
    assert [l["step"] for l in read_metrics(tmp_path / "resumed")] == list(range(1, 41))


def test_int8_states_resume_bitwise(tmp_path, small_overrides):
    """optim.state_dtype=int8 (rank 32: the MLP moments, 172 x 32, and the embedding's are codes): 30 steps straight
    vs. 15 + resumed to 30 are identical, the checkpoint holds int8 / uint8 codes and fp32 scales, and the run holds
    fewer optimizer bytes than the fp32 one."""
    from torch.distributed.checkpoint import FileSystemReader

    common = small_overrides + ["train.steps=30", "train.eval_every=10", "checkpoint.every=15", "optim.name=lotus",
                                "optim.rank=32", "optim.verify_gap=5", "optim.gamma=0.1", "optim.state_dtype=int8"]
    straight, resumed = straight_and_resumed(tmp_path, common, 15, 30)
    assert len(straight) == 15 and straight == resumed
    assert straight[-1]["switches"] > trajectory(tmp_path / "straight", 15, 15)[0]["switches"], "no switch after resume"
    meta = FileSystemReader(str(tmp_path / "resumed" / "checkpoints" / "step_00000015")).read_metadata()
    dtypes = {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if hasattr(v, "properties")}
    gate = "optim.state.layers.0.mlp.gate_proj.weight."
    assert dtypes[gate + "exp_avg"] == torch.int8 and dtypes[gate + "exp_avg_sq"] == torch.uint8
    assert dtypes[gate + "exp_avg_scale"] == torch.float32
    assert dtypes["optim.state.embed_tokens.weight.exp_avg"] == torch.int8
    assert run(common[:-1] + [f"run.dir={tmp_path / 'fp32'}", "train.steps=1"]) == 0
    assert straight[0]["optimizer_state_bytes"] < trajectory(tmp_path / "fp32")[0]["optimizer_state_bytes"]


def test_training_lowers_validation_loss(tmp_path, small_overrides):
    assert run(small_overrides + ["train.steps=60", "train.eval_every=30", f"run.dir={tmp_path}"]) == 0
    vals = [l["val_loss"] for l in read_metrics(tmp_path) if "val_loss" in l]
    assert len(vals) == 2 and vals[-1] < vals[0] - 0.3
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints").is_dir()


def test_resume_false_refuses_to_overwrite(tmp_path, small_overrides, capsys):
    args = small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]
    assert run(args) == 0
    capsys.readouterr()
    assert run(args + ["checkpoint.resume=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint.resume=false" in err and len(err.splitlines()) == 1


def test_checkpoint_of_another_model_is_refused(tmp_path, small_overrides, capsys):
    assert run(small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert run(small_overrides + ["train.steps=4", "train.eval_every=0", f"run.dir={tmp_path}", "model.dim=96"]) == 2
    err = capsys.readouterr().err
    assert "another model" in err and "dim: checkpoint 64 vs run 96" in err


@pytest.mark.parametrize("args, needle", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["train.steps=ten"], "'train.steps': expected an integer"),
    (["data.source=c4", "data.path=/nonexistent/c4"], "/nonexistent/c4"),
    (["data.tokenizer=/nonexistent/t.model"], "/nonexistent/t.model"),
    (["optim.per_layer=true", "train.grad_clip=1.0"], "set train.grad_clip=0"),
    (["train.grad_clip_unit=1.0"], "optim.per_layer=true only"),
    (["optim.per_layer=true", "train.grad_clip=0", "train.grad_clip_unit=1.0"], "train.grad_clip_unit needs"),
])
def test_bad_inputs_give_one_line(tmp_path, small_overrides, capsys, args, needle):
    assert run(small_overrides + [f"run.dir={tmp_path}"] + args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_cli_corrupt_yaml_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    proc = subprocess.run([sys.executable, str(REPO / "pretrain.py"), "--config", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid YAML" in lines[0] and "bad.yaml" in lines[0]


def test_nonfinite_gradient_is_skipped_and_logged(tmp_path, small_overrides, monkeypatch):
    monkeypatch.setenv("LOTUS_FAULT", "nan_grad:rank=0:step=3")
    common = small_overrides + ["train.steps=6", "train.eval_every=0", "checkpoint.every=0"]
    assert run(common + ["train.on_nonfinite=skip", "train.max_skipped_fraction=0.5", f"run.dir={tmp_path / 'skip'}"]) == 0
    lines = {l["step"]: l for l in read_metrics(tmp_path / "skip")}
    assert lines[3]["skipped"] == 1 and lines[3]["grad_norm"] is None  # NaN, written as JSON null
    assert "skipped" not in lines[4] and all(l["loss"] == l["loss"] for l in lines.values())
    # The skipped step applied nothing: a run without the fault differs from step 4 on, not before.
    monkeypatch.delenv("LOTUS_FAULT")
    assert run(common + [f"run.dir={tmp_path / 'clean'}"]) == 0
    clean = {l["step"]: l for l in read_metrics(tmp_path / "clean")}
    assert [clean[s]["loss"] for s in (1, 2, 3)] == [lines[s]["loss"] for s in (1, 2, 3)]
    assert clean[4]["loss"] != lines[4]["loss"]


def test_nonfinite_gradient_stops_with_a_checkpoint(tmp_path, small_overrides, monkeypatch, capsys):
    monkeypatch.setenv("LOTUS_FAULT", "nan_grad:rank=0:step=3")
    args = small_overrides + ["train.steps=6", "train.eval_every=0", "checkpoint.every=0", f"run.dir={tmp_path}"]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and "step 3" in err and len(err.splitlines()) == 1
    assert (tmp_path / "checkpoints/step_00000002/COMPLETE").exists()


def test_retention_keeps_the_last_k_checkpoints(tmp_path, small_overrides):
    args = small_overrides + ["train.steps=8", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=2",
                              f"run.dir={tmp_path}"]
    assert run(args) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000006", "step_00000008"]


def test_checkpoint_of_another_method_is_refused(tmp_path, small_overrides, capsys):
    assert run(small_overrides + ["train.steps=2", "train.eval_every=0", f"run.dir={tmp_path}"]) == 0
    capsys.readouterr()
    assert run(small_overrides + ["train.steps=4", "train.eval_every=0", f"run.dir={tmp_path}", "optim.name=galore"]) == 2
    err = capsys.readouterr().err
    assert "optim method 'lotus'" in err and "'galore'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("eval_every, missing", [(0, "train"), (10, "validation")])
def test_a_data_path_without_shards_is_refused_before_the_model_is_built(tmp_path, small_overrides, capsys,
                                                                         monkeypatch, eval_every, missing):
    import lotus_dist.train.trainer as trainer

    mirror = tmp_path / "c4"
    mirror.mkdir()
    if missing == "validation":  # train shards only: an evaluating run has nothing to evaluate on
        (mirror / "c4-train.00000-of-01024.json").write_text('{"text": "a line of text"}\n')
    built = []
    monkeypatch.setattr(trainer, "Llama", lambda *a, **k: built.append(1) or pytest.fail("the model was built"))
    code = run(small_overrides + ["data.source=c4", f"data.path={mirror}", f"train.eval_every={eval_every}",
                                  f"run.dir={tmp_path / 'run'}"])
    assert code == 2 and not built
    assert f"config key 'data.path': no {missing} shards" in capsys.readouterr().err
