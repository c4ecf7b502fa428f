"""Config loading: YAML + overrides, and one-line errors naming the bad key, value or file."""

from pathlib import Path

import pytest

from lotus_dist.optim.methods import resolve_parts
from lotus_dist.train.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_recipes_load_with_galore_schedule():
    steps = {"llama_60m": 10_000, "llama_130m": 20_000, "llama_350m": 60_000, "llama_1b": 100_000, "llama_7b": 150_000}
    for name, n in steps.items():
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert (cfg.model.name, cfg.train.steps, cfg.train.seq_len, cfg.train.batch_size) == (name, n, 256, 512)
        scale = resolve_parts(cfg.optim)["scale"]
        assert (cfg.optim.lr, scale, cfg.train.warmup_ratio, cfg.train.min_lr_ratio) == (0.01, 0.25, 0.1, 0.1)


def test_recipes_leave_alpha_to_the_method():
    # A recipe that wrote GaLore's alpha 0.25 would silently run APOLLO at 0.25 instead of 1 (Mini: 128).
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        for name, alpha in (("lotus", 0.25), ("apollo", 1.0), ("apollo_mini", 128.0)):
            cfg.optim.name = name
            assert resolve_parts(cfg.optim)["scale"] == alpha, (path.name, name)


def test_overrides_are_typed():
    cfg = load_config(REPO / "configs/tiny.yaml", ["optim.lr=3e-4", "train.steps=7", "optim.name=galore",
                                                   "log.tensorboard=false", "optim.betas=[0.9, 0.95]", "model.dim=64"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.optim.name == "galore"
    assert cfg.log.tensorboard is False and cfg.optim.betas == [0.9, 0.95] and cfg.model.dim == 64


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="'train.steps': expected an integer"):
        load_config(None, ["train.steps=1.5"])


@pytest.mark.parametrize("override, pattern", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("trainn.steps=1", "unknown config key 'trainn'"),
    ("train.steps=many", "'train.steps': expected an integer"),
    ("log.tensorboard=maybe", "'log.tensorboard': expected true/false"),
    ("optim.solver=qr", "'optim.solver': 'qr' is not one of"),
    ("dist.mode=mpi", "'dist.mode'"),
    ("train.batch_size=10", "'train.batch_size' \\(10\\) must be a multiple"),
    ("steps", "not of the form section.key=value"),
    ("optim=3", "'optim': expected a section"),
])
def test_bad_keys_and_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(REPO / "configs/tiny.yaml", [override])
    assert "\n" not in str(err.value)


def test_corrupt_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 10\n  seq_len: [128\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line \d+: invalid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_key_in_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  name: lotus\n  rnak: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.rnak'"):
        load_config(bad)
