"""The config's allowed values are read from its Literal annotations, and the low-rank keys' types are the
optimizer's schema (optim/options.py OPTIONS): the config and ``check_options`` cannot disagree on a value."""

import dataclasses
import typing

import pytest

from lotus_dist.optim.options import OPTIONS, check_options
from lotus_dist.train.config import Config, ConfigError, OptimConfig, load_config


def _unwrap(annotation):
    """``Optional[X]`` -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def _keys(cls=Config, prefix=""):
    """(section.key, annotation without Optional) of every leaf key of the config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _unwrap(hints[f.name])


CHOICE_KEYS = {key: typing.get_args(t) for key, t in _keys() if typing.get_origin(t) is typing.Literal}


def test_the_keys_with_fixed_choices_are_literals():
    assert set(CHOICE_KEYS) == {
        "optim.proj_type", "optim.solver", "optim.switch", "optim.moments", "optim.residual", "optim.reference_dtype",
        "optim.state_dtype",
        "optim.projector_dtype",
        "optim.projectors", "optim.refresh", "data.source", "data.split", "train.dtype", "train.on_nonfinite",
        "dist.mode", "dist.backend", "dist.reduce_dtype", "dist.replica_sync", "train.grad_clip_norm",
        "train.compile_backend"}


@pytest.mark.parametrize("key", sorted(CHOICE_KEYS))
def test_a_literal_key_takes_its_choices_and_refuses_others_in_one_line(key):
    allowed = CHOICE_KEYS[key]
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}=bogus"])
    assert str(err.value) == f"config key '{key}': 'bogus' is not one of {', '.join(allowed)}"
    with pytest.raises(ConfigError, match=f"^config key '{key}': expected a string, got 3$"):
        load_config(None, [f"{key}=3"])
    section, name = key.split(".")
    for value in allowed:
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value


@pytest.mark.parametrize("key", sorted(OPTIONS))
def test_the_config_and_the_optimizer_agree_on_every_lowrank_key(key):
    """The config's annotation is the schema's type, so both accept and refuse the same values, in the same words."""
    config_type = _unwrap(typing.get_type_hints(OptimConfig)[key])
    option = OPTIONS[key]
    assert config_type == option.type, (key, config_type, option.type)
    assert {f.name: f for f in dataclasses.fields(OptimConfig)}[key].metadata["doc"] == option.doc
    if option.choices is not None:
        assert option.choices == CHOICE_KEYS[f"optim.{key}"]
        for value in option.choices:
            check_options({key: value})
            assert getattr(load_config(None, [f"optim.{key}={value}"]).optim, key) == value
        bad = "bogus"
    else:
        bad = 0.0 if option.type is float else 0 if option.bound == "positive" else -1  # the config reads floats
    with pytest.raises(ValueError) as optimizer_err:
        check_options({key: bad}, prefix="optim.")
    with pytest.raises(ConfigError) as config_err:
        load_config(None, [f"optim.{key}={bad}"])
    name, problem = str(optimizer_err.value).split(": ", 1)  # "optim.<key>: <problem>"
    if key == "rank":  # the config refuses it first, for every method (adamw too): its own range check
        assert str(config_err.value) == "config key 'optim.rank' must be >= 1, got 0"
    else:
        assert str(config_err.value) == f"config key '{name}': {problem}"
