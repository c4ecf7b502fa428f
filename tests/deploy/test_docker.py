"""docker/: the compose file (validated by docker-compose), the entry point in dry mode, the Makefile
targets, and static checks of the Dockerfile. No Docker engine is needed."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

COMPOSE = "docker/compose.yaml"
GPU_OVERLAY = "docker/compose.gpu.yaml"
ENTRYPOINT = "docker/entrypoint.sh"


def compose_config(runner, require_tool, *files, **env):
    exe = require_tool("docker-compose")
    args = [exe]
    for f in files:
        args += ["-f", str(runner.repo / f)]
    proc = subprocess.run(
        [*args, "config"], env=runner.env(**env), cwd=runner.tmp, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def node_launch(runner, service):
    """Run the image's entry point as compose would start this service, in dry mode."""
    env = {k: str(v) for k, v in service["environment"].items()}
    return runner.run(ENTRYPOINT, *service["command"], LAUNCH_DRY_RUN="1", **env)


def test_compose_two_node_cluster_with_c10d_head_on_node0(runner, require_tool):
    cfg = compose_config(runner, require_tool, COMPOSE)
    services = cfg["services"]
    assert set(services) == {"node0", "node1", "tensorboard"}
    for rank in (0, 1):
        node = services[f"node{rank}"]
        assert node["hostname"] == f"node{rank}"  # node0's torchrun recognises the endpoint as itself
        assert node["image"] == "lotus_dist:cpu" and node["build"]["args"]["VARIANT"] == "cpu"
        env = node["environment"]
        assert (env["NNODES"], env["NODE_RANK"], env["NPROC_PER_NODE"]) == ("2", str(rank), "1")
        assert {v.split(":")[0] for v in node["volumes"]} == {"data", "runs"}

        out = node_launch(runner, node)
        assert out.returncode == 0, out.stderr
        assert (out.env["NNODES"], out.env["NODE_RANK"], out.env["MASTER_ADDR"]) == ("2", str(rank), "node0")
        assert out.command[0] == "torchrun"
        assert runner.flags(out.command) == {
            "--nnodes": "2",
            "--nproc-per-node": "1",
            "--rdzv-backend": "c10d",
            "--rdzv-endpoint": "node0:29400",
            "--rdzv-id": "lotus",
            "--max-restarts": "0",
        }
        assert out.command[-3:] == ["--config", "configs/tiny.yaml", "run.dir=/runs/tiny"]

    tb = services["tensorboard"]
    assert tb["command"][:3] == ["tensorboard", "--logdir", "/runs"]
    assert "runs:/runs:ro" in tb["volumes"]
    assert set(cfg["volumes"]) == {"data", "runs"}


def test_compose_settings_and_overrides_pass_through(runner, require_tool):
    lotus_args = 'train.steps=20 run.note="two words" optim.name=galore'
    cfg = compose_config(
        runner, require_tool, COMPOSE,
        NNODES="3", NPROC_PER_NODE="2", LOTUS_CONFIG="configs/llama_60m.yaml", LOTUS_RUN="exp1",
        LOTUS_ARGS=lotus_args, RDZV_ID="r9", TENSORBOARD_PORT="7007",
    )
    node = cfg["services"]["node1"]
    assert node["environment"]["LOTUS_ARGS"] == lotus_args
    out = node_launch(runner, node)
    assert out.returncode == 0, out.stderr
    f = runner.flags(out.command)
    assert (f["--nnodes"], f["--nproc-per-node"], f["--rdzv-id"]) == ("3", "2", "r9")
    assert out.command[-6:] == [
        "--config", "configs/llama_60m.yaml", "run.dir=/runs/exp1",
        "train.steps=20", "run.note=two words", "optim.name=galore",
    ]
    assert cfg["services"]["tensorboard"]["ports"][0]["published"] in (7007, "7007")


def test_gpu_overlay_gives_each_node_its_own_gpus(runner, require_tool):
    cfg = compose_config(
        runner, require_tool, COMPOSE, GPU_OVERLAY, VARIANT="cuda", NODE0_GPUS="0,1", NODE1_GPUS="2,3"
    )
    for rank, gpus in ((0, "0,1"), (1, "2,3")):
        node = cfg["services"][f"node{rank}"]
        assert node["image"] == "lotus_dist:cuda"
        (device,) = node["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["device_ids"] == [gpus]
        assert node["environment"]["NODE_RANK"] == str(rank)  # the overlay keeps the base settings


def test_entrypoint_help_runs_pretrain_directly(runner):
    out = runner.run(ENTRYPOINT, "--help", LAUNCH_DRY_RUN="1")
    assert out.returncode == 0, out.stderr
    assert out.command == ["python", str(runner.repo / "pretrain.py"), "--help"]


def test_entrypoint_splits_lotus_args_like_a_shell(runner):
    out = runner.run(
        ENTRYPOINT, "--config", "configs/tiny.yaml",
        LAUNCH_DRY_RUN="1", LOTUS_ARGS="""train.steps=3 'run.dir=/runs/a b' log.x="it's" $HOME""",
    )
    assert out.returncode == 0, out.stderr
    # Quotes group words; nothing is expanded ($HOME stays literal).
    assert out.command[2:] == ["--config", "configs/tiny.yaml", "train.steps=3", "run.dir=/runs/a b", "log.x=it's", "$HOME"]

    out = runner.run(ENTRYPOINT, LAUNCH_DRY_RUN="1", LOTUS_ARGS="run.dir='/runs/unclosed")
    assert out.returncode == 2 and "LOTUS_ARGS" in out.stderr


def test_entrypoint_runs_other_programs_and_rejects_bad_launch(runner):
    out = runner.run(ENTRYPOINT, "tensorboard", "--logdir", "/runs", LAUNCH_DRY_RUN="1")
    assert out.command == ["tensorboard", "--logdir", "/runs"]
    out = runner.run(ENTRYPOINT, "--help", LOTUS_LAUNCH="mpirun")
    assert out.returncode == 2 and "LOTUS_LAUNCH" in out.stderr


def test_makefile_targets(runner):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")

    def dry(*args):
        proc = subprocess.run(
            [make, "-n", "-f", "docker/docker.mk", *args, "DOCKER_COMPOSE=docker-compose"],
            cwd=runner.repo, env=runner.env(), capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert dry("docker-build") == ["docker build -f docker/Dockerfile --build-arg VARIANT=cuda -t lotus_dist:cuda ."]
    up = dry("docker-up", "VARIANT=cpu")
    assert up[0] == "docker build -f docker/Dockerfile --build-arg VARIANT=cpu -t lotus_dist:cpu ."
    assert re.fullmatch(r"docker-compose -f docker/compose.yaml +-p lotus_dist up --detach --no-build", up[1])
    assert up[2].endswith("logs --follow node0 node1")
    assert "-f docker/compose.gpu.yaml" in dry("docker-up")[1]
    assert dry("docker-down", "VARIANT=cpu", "DOCKER_VOLUMES=1")[0].endswith("down --remove-orphans --volumes")


def test_dockerfile_structure(runner):
    text = (runner.repo / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [line.split()[0] for line in lines if re.match(r"^[A-Z]+\s", line)]
    assert "ARG VARIANT=cuda" in lines
    assert {"FROM ${CUDA_IMAGE} AS base-cuda", "FROM ${CPU_IMAGE} AS base-cpu", "FROM base-${VARIANT} AS image"} <= set(lines)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"PIP_CONSTRAINT=/app/constraints\.txt", text)
    assert "RUN /app/docker/entrypoint.sh --help >/dev/null" in lines
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    # The last USER is unprivileged, and it comes before the entry point.
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in lines
    for script in (ENTRYPOINT, "scripts/launch_multinode.sh"):
        assert (runner.repo / script).stat().st_mode & 0o111, script
    # The torch pin the image relies on is the one in constraints.txt.
    assert re.search(r"^torch==\d", (runner.repo / "constraints.txt").read_text(), re.M)


def test_dockerignore_keeps_what_the_image_needs(runner):
    ignored = [
        line.strip() for line in (runner.repo / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".venv" in ignored and ".git" in ignored
    for needed in ("pretrain.py", "configs", "tokenizer", "constraints.txt", "pyproject.toml", "lotus_dist", "docker", "scripts"):
        assert not any(pattern.strip("/") == needed for pattern in ignored), needed


def test_cluster_doc_names_files_and_targets_that_exist(runner):
    readme = (runner.repo / "README.md").read_text()
    assert "## Running on a cluster" in readme
    text = readme.split("## Running on a cluster", 1)[1]
    for path in sorted(set(re.findall(r"\b((?:scripts|docker|configs)/[\w./-]+\.(?:sh|sbatch|yaml|mk))\b", text))):
        assert (runner.repo / path).is_file(), path
    targets = set(re.findall(r"^([\w-]+):", (runner.repo / "docker" / "docker.mk").read_text(), re.M))
    for target in set(re.findall(r"make (docker-\w+)", text)):
        assert target in targets, target
