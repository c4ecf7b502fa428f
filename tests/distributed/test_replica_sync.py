"""dist.replica_sync=lowrank under HSDP 2 x 2 on gloo (replicas exchange R = project(G), not G) follows one process
with the same clipping rule (train.grad_clip_norm=consumed), keeps the replicas bit-identical, resumes bit for bit
and moves a fraction of the projected matrices' replica bytes (docs/distributed.md).

One module-scoped set of runs per method serves every assertion: the single-process reference, the HSDP run
straight through, and the same HSDP run stopped and resumed; one short replica_sync=full run gives the bytes."""

import json
from pathlib import Path

import pytest
import torch

from lotus_dist.distributed.replica_sync import replica_step_bytes
from lotus_dist.distributed.sharding_plan import plan_for_model
from lotus_dist.model.llama import Llama, llama_config
from lotus_dist.train.metrics import read_metrics
from pretrain_launch import SMALL, launch

pytestmark = pytest.mark.slow  # torchrun runs

DIGEST_SCRIPT = Path(__file__).with_name("replica_digest.py")
STEPS, STOP = 30, 14
HSDP = ["dist.replicate=2", "dist.replica_sync=lowrank"]


def _args(tmp: Path, method: str, steps: int = STEPS) -> list[str]:
    # switches within the run: galore every 5 steps, lotus's displacement checked every 3
    return [*SMALL, f"train.steps={steps}", "train.eval_every=0", "checkpoint.every=0", f"optim.name={method}",
            "optim.gamma=0.5", "optim.verify_gap=3", "optim.update_gap=5", "train.grad_clip=0.5",
            "train.grad_clip_norm=consumed", f"data.cache_dir={tmp / 'cache'}"]


def _digests(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.fixture(scope="module", params=["lotus", "galore"])
def runs(request, tmp_path_factory):
    tmp, method = tmp_path_factory.mktemp(f"replica_{request.param}"), request.param
    args = _args(tmp, method)
    launch(0, [*args, f"run.dir={tmp / 'single'}"])
    out = launch(4, [*args, *HSDP, f"run.dir={tmp / 'hsdp'}"], entry=DIGEST_SCRIPT,
                 env={"DIGEST_OUT": str(tmp / "digest")}).stdout
    if method == "lotus":  # the resume path (DCP, the optimizer's state dict) is one for both methods: once
        launch(4, [*args, *HSDP, f"run.dir={tmp / 'resumed'}", f"train.stop_at={STOP}"])
        launch(4, [*args, *HSDP, f"run.dir={tmp / 'resumed'}"], entry=DIGEST_SCRIPT,
               env={"DIGEST_OUT": str(tmp / "digest_resumed")})
    return tmp, method, out


def test_lowrank_follows_single_process(runs):
    tmp, _, out = runs
    assert "falls back to full" not in out
    single, hsdp = read_metrics(tmp / "single"), read_metrics(tmp / "hsdp")
    assert [l["step"] for l in hsdp] == [l["step"] for l in single] == list(range(1, STEPS + 1))
    for a, b in zip(single, hsdp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["switches"] == a["switches"], a["step"]
    assert hsdp[-1]["switches"] > 14  # SMALL's 14 projected matrices switched more than once each on average
    assert any(l["grad_norm"] > 0.5 for l in single)  # the clipping bit


def test_replicas_stay_bit_identical_and_resume_bit_for_bit(runs):
    tmp, method, _ = runs
    straight = _digests(tmp / "digest")
    # mesh (replicate, shard) = [[0, 1], [2, 3]]: ranks 0 and 2 hold shard 0, ranks 1 and 3 shard 1
    assert straight[0] == straight[2] and straight[1] == straight[3]
    assert straight[0] != straight[1]
    if method != "lotus":
        return
    assert _digests(tmp / "digest_resumed") == straight
    keys = ("loss", "grad_norm", "switches", "replica_comm_bytes")
    after = [{k: l[k] for k in keys} for l in read_metrics(tmp / "hsdp") if l["step"] > STOP]
    assert [{k: l[k] for k in keys} for l in read_metrics(tmp / "resumed") if l["step"] > STOP] == after


def test_lowrank_moves_a_fraction_of_the_projected_replica_bytes(runs):
    tmp, method, _ = runs
    if method != "lotus":
        pytest.skip("one full-sync run, for lotus")
    launch(4, [*_args(tmp, method, steps=2), "dist.replicate=2", f"run.dir={tmp / 'full'}"])
    full = read_metrics(tmp / "full")[1]  # step 2: an ordinary step (no first basis, no switch)
    low = read_metrics(tmp / "hsdp")[1]
    rank, dim = 8, 64  # SMALL: r = 8 of the model's 64
    ratio = low["replica_projected_comm_bytes"] / full["replica_projected_comm_bytes"]
    assert ratio == pytest.approx(rank / dim, rel=0.01)
    # the planner's count (replica_sync.replica_step_bytes, from the plan alone) is what the run sent
    with torch.device("meta"):
        model = Llama(llama_config(name="tiny", dim=64, n_layers=2, n_heads=4, ffn_dim=172))
    planned = replica_step_bytes(plan_for_model(model, 4, rank, replicate=2))
    assert full["replica_projected_comm_bytes"] == round(planned["full"]["projected"])
    # + the one element that keeps every replica buffer non-empty (an empty shard's too)
    assert low["replica_projected_comm_bytes"] == round(planned["lowrank"]["projected"]) + 4
    # the plain parameters' all-reduce (FSDP2's, both runs) is the rest, unchanged
    assert (full["replica_comm_bytes"] - full["replica_projected_comm_bytes"]
            == pytest.approx(low["replica_comm_bytes"] - low["replica_projected_comm_bytes"], abs=8))
