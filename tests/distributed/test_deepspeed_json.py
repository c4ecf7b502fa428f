"""``dist.deepspeed_config``: every key of a user's DeepSpeed JSON is understood, ``"auto"`` is filled from our
config, a value that contradicts ours is refused naming our key, unknown keys and wrongly-typed values are refused
in one line naming the key and the file; a JSON outside ``dist.mode=deepspeed`` is refused at config load.

The config tests need no DeepSpeed (``deepspeed_config`` is called directly on JSON files in tmp_path); the one
launch that shows ``gradient_clipping`` really clips needs it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lotus_dist.distributed.deepspeed import deepspeed_config, engine_config
from lotus_dist.errors import UserError
from lotus_dist.train.config import ConfigError, load_config, merge_overrides
from lotus_dist.train.metrics import read_metrics

import owner_runs as R  # tests/distributed is on sys.path (pyproject's pythonpath)
from pretrain_launch import env_for, launch

BASE = ["train.batch_size=16", "train.micro_batch_size=2", "train.grad_clip=0.5", "dist.mode=deepspeed",
        "train.steps=100", "train.warmup_ratio=0.1", "train.min_lr_ratio=0.1", "dist.bucket_mb=25"]


@pytest.fixture
def needs_deepspeed():
    if not R.HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")


def _resolve(tmp_path, body, *overrides, world_size=2, device_type="cpu"):
    path = tmp_path / "ds.json"
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    cfg = load_config(None, merge_overrides(BASE, [f"dist.deepspeed_config={path}", *overrides]))
    return deepspeed_config(cfg, world_size, device_type), cfg


def _refused(tmp_path, body, *overrides, **kw) -> str:
    with pytest.raises(UserError) as err:
        _resolve(tmp_path, body, *overrides, **kw)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _strings(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)
    elif isinstance(obj, str):
        yield obj


# A Hugging Face style ZeRO-2 template: "auto" wherever the HF Trainer would fill a value from its arguments.
HF_ZERO2 = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": "auto",
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": "auto",
                          "contiguous_gradients": True, "offload_optimizer": {"device": "none"}},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                        "cos_min_ratio": "auto", "warmup_min_ratio": "auto"}},
    "steps_per_print": "auto", "wall_clock_breakdown": False,
}


@pytest.mark.parametrize("dtype, device_type, bf16", [("auto", "cpu", False), ("bf16", "cpu", True),
                                                      ("auto", "cuda", True)])
def test_auto_is_filled_from_our_config(tmp_path, dtype, device_type, bf16):
    ds, _ = _resolve(tmp_path, HF_ZERO2, "optim.name=adamw", f"train.dtype={dtype}", device_type=device_type)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 16 // (2 * 2) and ds["gradient_clipping"] == 0.5
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 25 * 2**20 // 4  # fp32 elements
    assert ds["bf16"] == {"enabled": bf16} and ds["fp16"] == {"enabled": False}
    engine = engine_config(ds)
    assert "auto" not in set(_strings(engine))  # DeepSpeed itself would refuse a string where it wants a number
    assert "optimizer" not in engine and "scheduler" not in engine  # ours are optim.* and train.*
    assert engine["zero_optimization"]["stage"] == 0 and not engine["bf16"]["enabled"]
    assert engine.get("torch_autocast", {}).get("enabled", False) == bf16


def test_deepspeed_parses_the_resolved_template(needs_deepspeed, tmp_path):
    """DeepSpeed's own config parser takes what the engine is given (in a subprocess: no DeepSpeed import here)."""
    ds, _ = _resolve(tmp_path, HF_ZERO2, "optim.name=adamw", "train.dtype=bf16", world_size=1)
    (tmp_path / "engine.json").write_text(json.dumps(engine_config(ds)))
    code = ("import json, sys; from deepspeed.runtime.config import DeepSpeedConfig; "
            "c = DeepSpeedConfig(json.load(open(sys.argv[1]))); "
            "print(c.train_batch_size, c.gradient_accumulation_steps, c.gradient_clipping, c.zero_optimization_stage, "
            "c.zero_config.reduce_bucket_size, c.bfloat16_config.enabled, c.torch_autocast_enabled)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "engine.json")], capture_output=True, text=True,
                          env=env_for({"DS_ACCELERATOR": "cpu"}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-7:] == ["16", "8", "0.5", "0", str(25 * 2**20 // 4), "False", "True"]


def test_stated_values_equal_to_ours_are_accepted(tmp_path):
    body = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
            "gradient_clipping": 0.5, "zero_optimization": {"stage": 1, "reduce_bucket_size": 2e8},
            "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10,
                                                                "cos_min_ratio": 0.1, "warmup_type": "linear"}}}
    # 2e8 fp32 elements are 762.939453125 MiB; dist.bucket_mb given to 6 digits is the same bucket.
    ds, _ = _resolve(tmp_path, body, "dist.bucket_mb=762.939", "optim.name=adamw", "optim.lr=0.001",
                     "optim.betas=[0.9,0.95]", "optim.eps=1e-8", "optim.weight_decay=0.1")
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 1


def test_gradient_clipping_is_the_trainers_clip(tmp_path):
    """The trainer clips with train.grad_clip (the engine never steps): a JSON value that differs is refused with
    the key to set; with it set, the config the trainer reads clips at the JSON's value."""
    message = _refused(tmp_path, {"gradient_clipping": 0.1})
    assert "gradient_clipping=0.1" in message and "train.grad_clip=0.1" in message and "ds.json" in message
    ds, cfg = _resolve(tmp_path, {"gradient_clipping": 0.1}, "train.grad_clip=0.1")
    assert cfg.train.grad_clip == ds["gradient_clipping"] == 0.1
    assert "train.grad_clip=0" in _refused(tmp_path, {"gradient_clipping": 0})  # DeepSpeed's "off"


@pytest.mark.parametrize("body, overrides, needles", [
    ({"train_batch_size": 32}, [], ["train_batch_size=32", "this run's 16", "set train.batch_size"]),
    ({"gradient_accumulation_steps": 8}, [], ["gradient_accumulation_steps=8", "this run's 4"]),
    ({"bf16": {"enabled": True}}, [], ["bf16.enabled=true", "fp32: train.dtype=auto on cpu", "train.dtype=bf16"]),
    ({"bf16": {"enabled": False}}, ["train.dtype=bf16"], ["bf16.enabled=false", "set train.dtype=fp32"]),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, ["train.dtype=bf16"], ["torch_autocast.dtype"]),
    ({"fp16": {"enabled": True}}, [], ["'fp16.enabled' is not supported"]),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}, [], ["use dist.mode=fsdp"]),
    ({"zero_optimization": {"overlap_comm": False}}, [], ["zero_optimization.overlap_comm=false", "always overlaps"]),
    ({"zero_optimization": {"reduce_bucket_size": 2e8}}, [], ["reduce_bucket_size=200000000.0",
                                                               "dist.bucket_mb=762.939"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}}}, [],
     ["zero_optimization.offload_optimizer.device", "offloading is not supported"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, [], ["optim.name=lotus"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}, ["optim.name=adamw"],
     ["optimizer.params.lr=0.0003", "set optim.lr=0.0003"]),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}, [], ["scheduler.type", "train.*"]),
    ({"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 50}}}, [],
     ["scheduler.params.total_num_steps=50", "set train.steps"]),
])
def test_contradictions_name_our_key(tmp_path, body, overrides, needles):
    message = _refused(tmp_path, body, *overrides)
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("body, key", [
    ({"gradient_predivide_factor": 1.0}, "'gradient_predivide_factor'"),
    ({"zero_optimization": {"stage": 2, "round_robin_gradients": True}}, "'zero_optimization.round_robin_gradients'"),
    ({"bf16": {"enabled": "auto", "immediate_grad_update": True}}, "'bf16.immediate_grad_update'"),
    ({"optimizer": {"type": "lotus", "params": {"torch_adam": True}}}, "'optimizer.params.torch_adam'"),
    ({"zero_optimization": {"offload_param": {"device": "none", "buffer_count": 4}}},
     "'zero_optimization.offload_param.buffer_count'"),
])
def test_unknown_keys_are_refused_by_name(tmp_path, body, key):
    message = _refused(tmp_path, body)
    assert key in message and "is not a key lotus_dist understands" in message and "ds.json" in message, message


@pytest.mark.parametrize("body, needle", [
    ({"zero_optimization": "stage2"}, "'zero_optimization' in FILE must be an object ({...}), got \"stage2\""),
    ({"zero_optimization": {"stage": "2"}}, "'zero_optimization.stage' in FILE must be 0, 1, 2 or 3, got \"2\""),
    ({"train_batch_size": "16"}, "'train_batch_size' in FILE must be an integer or \"auto\", got \"16\""),
    ({"train_micro_batch_size_per_gpu": True}, "'train_micro_batch_size_per_gpu' in FILE must be an integer"),
    ({"gradient_clipping": [1.0]}, "'gradient_clipping' in FILE must be a number or \"auto\", got [1.0]"),
    ({"bf16": {"enabled": "yes"}}, "'bf16.enabled' in FILE must be true or false or \"auto\""),
    ({"bf16": True}, "'bf16' in FILE must be an object"),
    ({"fp16": {"loss_scale": "dynamic"}}, "'fp16.loss_scale' in FILE must be a number"),
    ({"scheduler": "WarmupCosineLR"}, "'scheduler' in FILE must be an object"),
    ({"optimizer": {"type": "lotus", "params": {"betas": 0.9}}}, "'optimizer.params.betas' in FILE must be a list"),
    ({"zero_optimization": {"reduce_bucket_size": "5e8"}}, "'zero_optimization.reduce_bucket_size' in FILE must be a"),
    ('["zero_optimization"]', "FILE must hold a JSON object"),
    ('{"zero_optimization": {"stage": 2},}', "cannot read FILE as JSON"),
])
def test_wrongly_typed_values_are_one_line(tmp_path, body, needle):
    assert needle.replace("FILE", str(tmp_path / "ds.json")) in _refused(tmp_path, body)


@pytest.mark.parametrize("mode", ["auto", "single", "fsdp", "ddp"])
def test_a_json_outside_deepspeed_mode_is_refused(tmp_path, mode):
    path = tmp_path / "ds.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match=rf"'dist.deepspeed_config' \({path}\) applies to dist.mode=deepspeed "
                                          rf"only, but dist.mode={mode}"):
        load_config(None, [f"dist.deepspeed_config={path}", f"dist.mode={mode}"])


def test_pretrain_refuses_a_json_outside_deepspeed_mode_with_exit_2(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.1}))
    proc = launch(0, [f"run.dir={tmp_path / 'run'}", f"dist.deepspeed_config={path}"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: config key 'dist.deepspeed_config' ({path}) applies to dist.mode=deepspeed only, but "
        f"dist.mode=auto; set dist.mode=deepspeed or drop dist.deepspeed_config"]
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.slow  # torchrun on 2 ranks
def test_gradient_clipping_from_the_json_clips_the_run(needs_deepspeed, tmp_path):
    """A deepspeed run whose JSON says gradient_clipping=0.05 (and train.grad_clip=0.05) follows the one-process run
    clipped at 0.05, not the default-clipped one: the clip really happens, at the JSON's value."""
    clip = 0.05
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": clip, "zero_optimization": {"stage": 2}}))
    run_dir = tmp_path / "run"
    launch(2, [*R.PRETRAIN_ARGS, f"data.cache_dir={R.workdir() / 'cache'}", f"run.dir={run_dir}",
               "dist.mode=deepspeed", f"dist.deepspeed_config={path}", f"train.grad_clip={clip}"])
    metrics = read_metrics(run_dir)
    assert all(r["grad_norm"] > 2 * clip for r in metrics)  # every step is clipped (the norm is before clipping)
    R.check_pretrain(metrics, R.pretrain(0, "single_clip_0.05", f"train.grad_clip={clip}"))
    unclipped = R.pretrain_single()  # train.grad_clip=1.0
    assert metrics[0]["loss"] == pytest.approx(unclipped[0]["loss"], rel=R.LOSS_TOL)  # the same start
    assert abs(metrics[-1]["loss"] - unclipped[-1]["loss"]) > 100 * R.LOSS_TOL * unclipped[-1]["loss"]
