"""``dist.mode=deepspeed``: the DeepSpeed engine (stage 0) around the owner backend's matrix-granular ZeRO-2, on gloo;
DeepSpeed configs asking for ZeRO stage 1 or 2 run on it.

Equivalence runs share their launches with test_owner.py (owner_runs.py). Tests that need DeepSpeed skip without
it, or fail where CI demands it (LOTUS_REQUIRE_SYSTEM_TOOLS=1; CI installs the ``deepspeed`` extra).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lotus_dist.distributed.deepspeed import check_config, deepspeed_config, engine_config
from lotus_dist.errors import UserError
from lotus_dist.train.config import load_config
from lotus_dist.train.metrics import read_metrics

import owner_runs as R  # tests/distributed is on sys.path (pyproject's pythonpath)
from dist_spawn import free_port
from owner_runs import PARAM_TOL, check_run
from pretrain_launch import REPO, SMALL, env_for, launch

pytestmark = pytest.mark.slow  # gloo ranks under torchrun and dist_spawn


@pytest.fixture
def needs_deepspeed():
    if R.HAS_DEEPSPEED:
        return
    reason = "deepspeed is not installed (pip install -e '.[deepspeed]')"
    if os.environ.get("LOTUS_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(reason + " and LOTUS_REQUIRE_SYSTEM_TOOLS=1")
    pytest.skip(reason)


# ---- config (no DeepSpeed needed) ---------------------------------------------------------------------------------

def _cfg(*overrides):
    return load_config(None, ["train.batch_size=16", "train.micro_batch_size=2", "train.grad_clip=0.5",
                              "dist.mode=deepspeed", *overrides])


def test_generated_config_follows_ours():
    ds = deepspeed_config(_cfg(), world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 0} and not ds["bf16"]["enabled"]


@pytest.mark.parametrize("body, needle", [
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
    ({"zero_optimization": {"stage": 3}}, "use dist.mode=fsdp"),
    ({"fp16": {"enabled": True}}, "'fp16.enabled' is not supported"),
    ({"optimizer": {"type": "Adam"}}, "this run's optimizer is optim.name=lotus"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4"),
])
def test_user_config_refusals(tmp_path, body, needle):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    with pytest.raises(UserError, match=needle) as err:
        deepspeed_config(_cfg(f"dist.deepspeed_config={path}"), world_size=2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_1_and_2_and_bf16_run_on_the_owner_backend(tmp_path, stage):
    """The stage is accepted (our owner backend is ZeRO-2 at matrix granularity) and the engine gets stage 0; bf16
    becomes the trainer's autocast, not DeepSpeed's flattening bf16 optimizer."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage, "overlap_comm": True}, "bf16": {"enabled": True}}))
    ds = deepspeed_config(_cfg(f"dist.deepspeed_config={path}", "train.dtype=bf16"), world_size=2)
    assert check_config(ds) == stage
    engine = engine_config(ds)
    assert engine["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert not engine["bf16"]["enabled"] and engine["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


def test_user_config_is_completed(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, "gradient_clipping": 0.5}))
    ds = deepspeed_config(_cfg(f"dist.deepspeed_config={path}"), world_size=4)
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5


# ---- gloo launches -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", R.METHODS)
def test_equivalence_world2_and_world3(needs_deepspeed, method):
    for res in (R.world2(), R.world3()):
        run = res["runs"][f"deepspeed_{method}"]
        assert run["engine"] == "DeepSpeedEngine"
        check_run(run, res["ref"][method], res["world"])


@pytest.mark.parametrize("method", ["lotus", "adamw"])
def test_resume_deepspeed_checkpoint_in_one_process(needs_deepspeed, method):
    R.check_resume_in_one_process("deepspeed", method)


def _resumed(key: str) -> dict:
    got = R.world3()["resume"][key]
    assert "error" not in got, got.get("error")
    return got


def test_resume_deepspeed_world2_in_deepspeed_world3(needs_deepspeed):
    got = _resumed("deepspeed_galore_w2->deepspeed_w3")
    assert got["param_rel"] < PARAM_TOL and got["switches"] == got["ref_switches"]


def test_resume_deepspeed_in_fsdp_adamw(needs_deepspeed):
    assert _resumed("deepspeed_adamw_w2->fsdp_w3")["param_rel"] < PARAM_TOL


def test_resume_deepspeed_in_fsdp_lotus(needs_deepspeed):
    got = R.world3()["resume"]["deepspeed_lotus_w2->fsdp_w3"]
    if "error" in got:  # the FSDP low-rank optimizer's sharded state is another work item
        pytest.skip("FSDP lotus cannot load this checkpoint yet: " + got["error"].strip().splitlines()[-1])
    assert got["param_rel"] < PARAM_TOL and got["switches"] == got["ref_switches"]


def test_pretrain_under_the_deepspeed_launcher_matches_single(needs_deepspeed):
    """``deepspeed --num_gpus=2 pretrain.py ... dist.mode=deepspeed`` (the launcher adds --local_rank=N); under
    torchrun the same mode runs in every owner_workers launch."""
    run_dir = R.workdir() / "pretrain" / "deepspeed_launcher"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus=2", f"--master_port={free_port()}",
           str(REPO / "pretrain.py"), "--config", str(REPO / "configs/tiny.yaml"), *R.PRETRAIN_ARGS,
           f"data.cache_dir={R.workdir() / 'cache'}", f"run.dir={run_dir}", "dist.mode=deepspeed", "dist.backend=gloo"]
    proc = subprocess.run(cmd, cwd=REPO, env=env_for({"DS_ACCELERATOR": "cpu"}), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    R.check_pretrain(read_metrics(run_dir), R.pretrain_single())


@pytest.mark.parametrize("stage", [1, 2])
def test_pretrain_with_a_zero_stage_config_matches_single(needs_deepspeed, tmp_path, stage):
    """A DeepSpeed user's config (ZeRO stage 1 or 2, micro-batch 2 as ours) trains on the owner backend and follows
    the single-process run; the log says what runs."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 2}))
    run_dir = tmp_path / "run"
    proc = launch(2, [*R.PRETRAIN_ARGS, f"data.cache_dir={R.workdir() / 'cache'}", f"run.dir={run_dir}",
                      "dist.mode=deepspeed", f"dist.deepspeed_config={path}"])
    assert f"ZeRO stage {stage} requested: lotus_dist runs its own matrix-granular ZeRO-2" in proc.stdout
    R.check_pretrain(read_metrics(run_dir), R.pretrain_single())


@pytest.mark.parametrize("body, needle", [({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 is not supported"),
                                          ({"zero_optimization": "stage2"}, "'zero_optimization' in ")])
def test_pretrain_refuses_a_bad_deepspeed_config_with_one_line(needs_deepspeed, tmp_path, body, needle):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(body))
    proc = launch(2, [*SMALL, f"run.dir={tmp_path / 'run'}", f"data.cache_dir={R.workdir() / 'cache'}",
                      "dist.mode=deepspeed", f"dist.deepspeed_config={path}"], check=False)
    assert proc.returncode != 0
    # Every rank raises the same error; torchrun may stop the slower rank before it prints, so count >= 1.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and len(set(errors)) == 1 and needle in errors[0], proc.stderr[-3000:]
    assert "distributed/deepspeed" not in proc.stderr  # no traceback from our code (torchrun has its own)
