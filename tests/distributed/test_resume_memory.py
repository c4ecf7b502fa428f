"""A resumed run needs no more memory than a fresh one (issue 31): the load fills the live parameter and optimizer
tensors in place, so the resume's start-up peak stays within this rank's weights + optimizer state + one stored
item (the largest parameter) + 5 % of the model, and the first step after the resume peaks exactly as the same
step of an uninterrupted run (PeakMemory on every step: peak_pretrain.py), in fsdp and ddp, and at another world
size (saved by 2 ranks, resumed by 3)."""

from __future__ import annotations

import json
import shutil

import pytest

from lotus_dist.distributed.capacity import dry_run
from lotus_dist.train.config import load_config, merge_overrides
from lotus_dist.train.metrics import read_events
from pretrain_launch import REPO, SMALL, concurrently, launch

pytestmark = pytest.mark.slow  # torchrun runs

PEAK_SCRIPT = REPO / "scripts/peak_pretrain.py"
# dim 256 (not SMALL's 64): the blocks, not the 8000 x dim embedding, make most of the model, so that the bound
# is tight (the old load's zero-gradient step, model/W of gradients, does not fit in it). Batch 12: 2 and 3 ranks.
ARGS = [*SMALL, "model.dim=256", "model.n_layers=4", "model.ffn_dim=688", "train.batch_size=12", "train.steps=4",
        "checkpoint.every=2", "train.eval_every=0"]
RESUME_STEP = 3


def run(tmp_path, name, world, extra, copy_from=None):
    """Launch into run dir ``name``; returns {rank: {step: record}} of this launch's per-step peaks."""
    run_dir = tmp_path / name
    if copy_from is not None:
        shutil.copytree(tmp_path / copy_from, run_dir)
    out = tmp_path / "peaks" / f"{name}_{len(list((tmp_path / 'peaks').glob(name + '_*')))}"
    proc = launch(world, [*ARGS, *extra, f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run_dir}"],
                  entry=PEAK_SCRIPT, env={"PEAK_OUT": str(out)})
    peaks = {int(p.stem[4:]): {r["step"]: r for r in json.loads(p.read_text())} for p in out.glob("rank*.json")}
    assert len(peaks) == world
    return proc, peaks


def check_resume(startup, straight, resumed, model_bytes):
    # this rank's weights and optimizer state, as the uninterrupted run holds them when step 3 starts
    held = max(rec[RESUME_STEP]["start_bytes"] for rec in straight.values())
    largest = 8000 * 256 * 4  # the embedding and lm_head
    bound = held + largest + 0.05 * model_bytes
    assert startup["step"] == RESUME_STEP - 1 and startup["load_s"] > 0
    assert held <= startup["startup_peak_bytes"] <= bound, (startup, held, bound)
    for rank, rec in resumed.items():  # nothing the load made is alive at step 3, nor adds to its peak
        ours, theirs = rec[RESUME_STEP], straight[rank][RESUME_STEP]
        assert abs(ours["start_bytes"] - theirs["start_bytes"]) <= 0.05 * theirs["start_bytes"], (rank, ours, theirs)
        assert abs(ours["peak_bytes"] - theirs["peak_bytes"]) <= 0.05 * theirs["peak_bytes"], (rank, ours, theirs)


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_resume_start_up_peak_within_the_bound_and_the_next_step_peaks_as_uninterrupted(tmp_path, mode):
    extra = [f"dist.mode={mode}"]

    def stopped_then_resumed():
        run(tmp_path, "part", 2, [*extra, "train.stop_at=2"])
        return run(tmp_path, "part", 2, extra)

    (_, straight), (_, resumed) = concurrently(lambda: run(tmp_path, "straight", 2, extra), stopped_then_resumed)
    fresh, startup = read_events(tmp_path / "part", "startup")
    assert fresh["step"] == 0 and "load_s" not in fresh
    check_resume(startup, straight, resumed, startup["model_bytes"])
    if mode == "fsdp":  # the planner says what a resume needs (its ddp column plans the bf16 weights of CUDA):
        # at most a whole largest parameter in flight; here one saved shard of it (the stored items are shards)
        planned = dry_run(load_config(str(REPO / "configs/tiny.yaml"), merge_overrides(ARGS, ["dist.world_size=2"])),
                          out=lambda line: None)["lotus"]
        held = max(rec[RESUME_STEP]["start_bytes"] for rec in straight.values())
        assert abs(planned["params"] + planned["optimizer"] - held) <= 0.01 * held, (planned, held)
        assert startup["startup_peak_bytes"] <= planned["resume"], (startup, planned["resume"])


def test_resume_at_another_world_size_within_the_bound_with_one_fallback_line(tmp_path):
    """Saved by 2 ranks, resumed by 3: DCP reshards into the live 3-rank shards. 688 columns do not split over 3
    ranks: the four down_proj matrices are fallbacks, said in one line, listed in the run directory."""

    def saved_by_2_resumed_by_3():
        run(tmp_path, "part2", 2, ["train.stop_at=2"])
        return run(tmp_path, "part3", 3, [], copy_from="part2")

    (_, straight), (proc, resumed) = concurrently(lambda: run(tmp_path, "straight3", 3, []), saved_by_2_resumed_by_3)
    _, startup = read_events(tmp_path / "part3", "startup")
    assert startup["world_size"] == 3
    check_resume(startup, straight, resumed, startup["model_bytes"])
    lines = [line for line in proc.stdout.splitlines() if "fallback" in line and "fallback)" not in line]
    assert len(lines) == 1 and "4 fallback matrices" in lines[0] and "4 x 256x688" in lines[0], lines
    assert "plan_fallbacks.txt" in lines[0]
    details = (tmp_path / "part3" / "plan_fallbacks.txt").read_text().splitlines()
    assert sorted(details) == sorted(f"fallback layers.{i}.mlp.down_proj.weight 256x688: "
                                     + details[0].split(": ", 1)[1] for i in range(4))
