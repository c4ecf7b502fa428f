"""scripts/launch_multinode.sh: the torchrun command and environment it hands over, from its dry mode."""

from __future__ import annotations

import shlex

SCRIPT = "scripts/launch_multinode.sh"
ARGS = ["--config", "configs/tiny.yaml", "train.steps=3", "run.dir=/tmp/my run dir", 'log.note=it\'s "quoted"']


def test_multinode_command_and_environment(runner):
    out = runner.run(
        SCRIPT, *ARGS, LAUNCH_DRY_RUN="1", NNODES="2", NODE_RANK="1", NPROC_PER_NODE="4",
        MASTER_ADDR="host0", MASTER_PORT="29500", RDZV_ID="job7", NCCL_DEBUG="INFO", UNRELATED="x",
    )
    assert out.returncode == 0, out.stderr
    cmd = out.command
    assert cmd[0] == "torchrun"
    assert runner.flags(cmd) == {
        "--nnodes": "2",
        "--nproc-per-node": "4",
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": "host0:29500",
        "--rdzv-id": "job7",
        "--max-restarts": "0",
    }
    pretrain = cmd.index(str(runner.repo / "pretrain.py"))
    # Overrides reach pretrain.py as the same words, spaces and quotes included.
    assert cmd[pretrain + 1 :] == ARGS
    assert out.env == {
        "NNODES": "2",
        "NODE_RANK": "1",
        "NPROC_PER_NODE": "4",
        "MASTER_ADDR": "host0",
        "MASTER_PORT": "29500",
        "RDZV_ID": "job7",
        "NCCL_DEBUG": "INFO",
    }


def test_real_launch_execs_torchrun_with_exact_argv_and_env(runner):
    # A stub torchrun records what the script really executes (no dry mode involved).
    record = runner.tmp / "torchrun.argv"
    runner.stub(
        "torchrun",
        f'printf "%s\\0" "$@" > {shlex.quote(str(record))}\n'
        'echo "NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR"',
    )
    out = runner.run(SCRIPT, *ARGS, NNODES="3", NODE_RANK="2", NPROC_PER_NODE="1", MASTER_ADDR="10.0.0.1")
    assert out.returncode == 0, out.stderr
    argv = record.read_text().split("\0")[:-1]
    assert "--rdzv-endpoint=10.0.0.1:29400" in argv and "--nnodes=3" in argv
    # c10d ranks nodes as they join; torchrun would only warn about --node-rank.
    assert not any(a.startswith("--node-rank") for a in argv)
    assert argv[-len(ARGS) :] == ARGS
    assert out.stdout.strip() == "NNODES=3 NODE_RANK=2 MASTER_ADDR=10.0.0.1"


def test_single_node_is_standalone_and_counts_gpus(runner):
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert runner.flags(out.command) == {"--nnodes": "1", "--nproc-per-node": "1", "--standalone": "", "--max-restarts": "0"}
    assert out.command[-1].endswith("pretrain.py")

    runner.stub("nvidia-smi", 'printf "GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\n"')
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1")
    assert runner.flags(out.command)["--nproc-per-node"] == "2"

    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,3,5")
    assert runner.flags(out.command)["--nproc-per-node"] == "3"
    assert out.env["CUDA_VISIBLE_DEVICES"] == "0,3,5"


def test_node_rank_defaults_to_slurm_nodeid(runner):
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1", NNODES="4", MASTER_ADDR="h", SLURM_NODEID="3")
    assert out.env["NODE_RANK"] == "3"


def test_elastic_node_range(runner):
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1", NNODES="2:4", NODE_RANK="3", MASTER_ADDR="h")
    assert out.returncode == 0, out.stderr
    assert runner.flags(out.command)["--nnodes"] == "2:4"


def test_bad_settings_fail_with_the_variable_named(runner):
    cases = [
        ({"NNODES": "2"}, "MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
        ({"NNODES": "two"}, "NNODES"),
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT"),
    ]
    for env, name in cases:
        out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1", **env)
        assert out.returncode == 2, (env, out.stdout)
        assert name in out.stderr, (env, out.stderr)


def test_missing_torchrun_is_reported(runner):
    out = runner.run(SCRIPT, TORCHRUN="no-such-torchrun")
    assert out.returncode == 2
    assert "no-such-torchrun" in out.stderr
