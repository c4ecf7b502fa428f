"""What a resumed run may change in the optimizer's settings: applied from the new config, or refused.

Torch's ``load_state_dict`` puts the checkpoint's param groups in place of the config's, so without this table a
changed ``optim.weight_decay`` would be recorded in config.yaml's history and silently not used. Every key of a
param group is in ``ON_RESUME`` (a key that is not is refused, so a new option must be classified here); the table
is the one of README.md "What a resume may change".

Each checkpoint records its groups' settings (``as_json(snapshot(...))``) in train_state.json, so a refused change is found
before the state is loaded (a changed switch policy or residual has other state tensors, which DCP could not
load); checkpoints written before the record are checked on the groups they load.
"""

from __future__ import annotations

import json
from pathlib import Path

from lotus_dist.errors import UserError
from lotus_dist.optim.options import LOWRANK_DEFAULTS

APPLIED, REFUSED = "applied", "refused"

# group key -> (what a resume does with a changed value, why)
ON_RESUME: dict[str, tuple[str, str]] = {
    "initial_lr": (APPLIED, "the lr schedule's base (optim.lr), set every step"),
    "betas": (APPLIED, "Adam's decay rates"),
    "eps": (APPLIED, "Adam's epsilon"),
    "weight_decay": (APPLIED, "decoupled weight decay"),
    "scale": (APPLIED, "alpha, the scale of the projected update"),
    "update_gap": (APPLIED, "T of the fixed schedule (the next switch follows the new T)"),
    "gamma": (APPLIED, "the switch threshold (γ)"),
    "verify_gap": (APPLIED, "η, the interval between switch checks"),
    "t_min": (APPLIED, "the minimum interval of path_efficiency"),
    "window": (APPLIED, "w of path_efficiency (the current window closes at the new size)"),
    "oversample": (APPLIED, "p of the randomized SVD (next refresh)"),
    "power_iters": (APPLIED, "q of the randomized SVD (next refresh)"),
    "geodesic_step": (APPLIED, "η_g of grasswalk (next refresh)"),
    "moments": (APPLIED, "what the moments do at the next switch"),
    "seed": (APPLIED, "the seed of the random bases drawn from now on"),
    "solver": (APPLIED, "the solver of the next refresh; refused to or from online_pca, which has its own state"),
    "rank": (REFUSED, "the shape of the moments and projectors"),
    "proj_type": (REFUSED, "which side is projected: the shape of the moments and projectors"),
    "granularity": (REFUSED, "projfactor's reshaping: the shape of its state"),
    "switch": (REFUSED, "the switch policy's state (tau/d_init, pe_*) is another one"),
    "residual": (REFUSED, "another update rule; the limiter's state (fira_norm) exists only with Fira's or APOLLO's"),
    "reference_dtype": (REFUSED, "the form of the stored switch reference (d_init, or int4's codes)"),
    "state_dtype": (REFUSED, "the stored moments are another format (fp32, bf16 or int8 codes and scales)"),
    "projector_dtype": (APPLIED, "the stored projectors are cast on load (to bf16: rounded once, as a refresh "
                                 "stores them; to fp32: exact); refused to or from int8, whose codes and row "
                                 "scales are another format"),
    "fused": (APPLIED, "how the step is batched (optim/fused_step.py); the state stays per matrix"),
}
NOT_SETTINGS = ("params", "lr")  # the parameters; lr is the schedule's, re-set before every step


def snapshot(optimizer) -> list[dict]:
    """Each param group's settings as they are now (taken before a load replaces them; ``apply`` puts them back)."""
    return [{k: v for k, v in g.items() if k not in NOT_SETTINGS} for g in optimizer.param_groups]


def as_json(groups: list[dict]) -> list[dict]:
    """``snapshot``'s groups as JSON values (what train_state.json records and ``changes`` compares)."""
    return json.loads(json.dumps(groups, default=list))


def _config_key(key: str) -> str:
    return "optim.lr" if key == "initial_lr" else f"optim.{key}"


def _refused(key: str, old, new) -> bool:
    if key == "solver":
        return "online_pca" in (old, new)
    if key == "projector_dtype":
        return "int8" in (old, new)
    return ON_RESUME.get(key, (REFUSED, ""))[0] == REFUSED


def changes(saved: list[dict], run: list[dict], path: Path) -> list[str]:
    """The applied changes as ``optim.key old -> new`` (each key once); UserError naming the key and both values for
    a refused change, or for groups that do not match."""
    if len(saved) != len(run):
        raise UserError(f"checkpoint {path} has {len(saved)} optimizer parameter group(s), this run {len(run)}: it "
                        f"was written by another optimizer layout; choose another run.dir")
    applied: dict[str, str] = {}
    for old_group, new_group in zip(saved, run):
        for key in sorted(set(old_group) | set(new_group)):
            # a key the checkpoint's record lacks is an option added since: it was written with that option's default
            old, new = old_group.get(key, LOWRANK_DEFAULTS.get(key)), new_group.get(key)
            if old == new:
                continue
            name = _config_key(key)
            if _refused(key, old, new):
                why = ON_RESUME.get(key, (REFUSED, "a setting this version does not know how to change"))[1]
                raise UserError(f"checkpoint {path} was written with {name}={_show(old)}, this run has "
                                f"{name}={_show(new)}: a resume cannot change it ({why}); set {name}={_show(old)} "
                                f"again, or choose another run.dir")
            applied.setdefault(name, f"{name} {_show(old)} -> {_show(new)}")
    return list(applied.values())


def apply(optimizer, run: list[dict]) -> None:
    """Put this run's settings (its ``snapshot``) back into the param groups a load replaced (the applied keys;
    refused ones are equal by now). In place: the group dicts and their ``params`` stay, so an optimizer's
    param -> group cache stays valid."""
    for group, wanted in zip(optimizer.param_groups, run):
        group.update(wanted)


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


__all__ = ["APPLIED", "ON_RESUME", "REFUSED", "apply", "as_json", "changes", "snapshot"]
