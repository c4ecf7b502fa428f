"""scripts/slurm/pretrain.sbatch without Slurm: SLURM_* variables and stub scontrol / srun programs."""

from __future__ import annotations

SCRIPT = "scripts/slurm/pretrain.sbatch"
ARGS = ["--config", "configs/llama_1b.yaml", "optim.name=galore", "run.dir=/scratch/run with spaces"]
HOSTS = ["gpu-001", "gpu-002", "gpu-003", "gpu-004"]


def slurm_env(runner, **extra):
    env = {
        "SLURM_JOB_NODELIST": "gpu-[001-004]",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_ID": "4242",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_ON_NODE": "64",
        "SLURM_SUBMIT_DIR": str(runner.repo),
    }
    env.update(extra)
    return env


def stub_scontrol(runner):
    hosts = "\\n".join(HOSTS)
    runner.stub(
        "scontrol",
        '[[ "$1 $2 $3" == "show hostnames gpu-[001-004]" ]] || { echo "unexpected: $*" >&2; exit 1; }\n'
        f'printf "{hosts}\\n"',
    )


def test_sbatch_header_requests_one_task_per_node(runner):
    path = runner.repo / SCRIPT
    header = [line for line in path.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header
    assert any(line.startswith("#SBATCH --nodes=") for line in header)
    assert path.stat().st_mode & 0o111, "sbatch runs it as a program"


def test_dry_run_prints_srun_and_rendezvous_on_first_host(runner):
    stub_scontrol(runner)
    out = runner.run(SCRIPT, *ARGS, LAUNCH_DRY_RUN="1", NODE_RANK="7", **slurm_env(runner))
    assert out.returncode == 0, out.stderr
    assert out.env == {
        "NNODES": "4",
        "NPROC_PER_NODE": "8",
        "MASTER_ADDR": "gpu-001",
        "MASTER_PORT": "29400",
        "RDZV_ID": "4242",
    }
    cmd = out.command
    assert cmd[0] == "srun"
    assert runner.flags(cmd) == {
        "--nodes": "4",
        "--ntasks": "4",
        "--ntasks-per-node": "1",
        "--kill-on-bad-exit": "1",
        "--cpus-per-task": "64",
    }
    launcher = cmd.index(str(runner.repo / "scripts" / "launch_multinode.sh"))
    assert cmd[launcher + 1 :] == ARGS


def test_each_node_runs_torchrun_against_the_head(runner):
    # A stub srun starts its command once per node, as Slurm would, with that node's SLURM_NODEID,
    # and puts the launcher in dry mode so that each node prints its torchrun command.
    stub_scontrol(runner)
    runner.stub(
        "srun",
        "n=1\n"
        'while [[ "$1" == -* ]]; do case "$1" in --nodes=*) n="${1#*=}" ;; esac; shift; done\n'
        'for ((i = 0; i < n; i++)); do SLURM_NODEID="$i" LAUNCH_DRY_RUN=1 "$@"; done',
    )
    # NODE_RANK exported at submission must not reach the tasks: each takes its SLURM_NODEID.
    out = runner.run(SCRIPT, *ARGS, NODE_RANK="7", **slurm_env(runner, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:4"))
    assert out.returncode == 0, out.stderr
    nodes = out.stdout.split("# launch_multinode.sh dry run")[1:]
    assert len(nodes) == 4
    for rank, text in enumerate(nodes):
        env, (cmd,) = runner.parse_dry_run(text.split("\n", 1)[1])
        assert (env["NODE_RANK"], env["NNODES"], env["MASTER_ADDR"]) == (str(rank), "4", "gpu-001")
        assert cmd[0] == "torchrun"
        assert runner.flags(cmd) == {
            "--nnodes": "4",
            "--nproc-per-node": "4",
            "--rdzv-backend": "c10d",
            "--rdzv-endpoint": "gpu-001:29400",
            "--rdzv-id": "4242",
            "--max-restarts": "0",
        }
        assert cmd[-len(ARGS) :] == ARGS
    assert "4 nodes x 4 processes, rendezvous gpu-001:29400" in out.stderr


def test_overrides_of_the_rendezvous(runner):
    stub_scontrol(runner)
    out = runner.run(
        SCRIPT, LAUNCH_DRY_RUN="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="29555", NPROC_PER_NODE="2",
        **slurm_env(runner, SLURM_CPUS_ON_NODE=""),
    )
    assert out.returncode == 0, out.stderr
    assert (out.env["MASTER_ADDR"], out.env["MASTER_PORT"], out.env["NPROC_PER_NODE"]) == ("10.1.2.3", "29555", "2")
    assert "--cpus-per-task" not in runner.flags(out.command)


def test_outside_slurm_or_checkout_it_explains(runner):
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1")
    assert out.returncode == 2 and "sbatch" in out.stderr
    stub_scontrol(runner)
    out = runner.run(SCRIPT, LAUNCH_DRY_RUN="1", **slurm_env(runner, SLURM_SUBMIT_DIR=str(runner.tmp)))
    assert out.returncode == 2 and "LOTUS_ROOT" in out.stderr
