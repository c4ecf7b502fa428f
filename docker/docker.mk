# Docker targets of lotus_dist. The top-level Makefile includes this file: include docker/docker.mk
#
#   make docker-build [VARIANT=cuda|cpu]              build lotus_dist:$(VARIANT) from docker/Dockerfile
#   make docker-up [VARIANT=cpu] [NNODES=2] [NPROC_PER_NODE=1] [LOTUS_CONFIG=...] [LOTUS_ARGS='k=v ...']
#                                                     start the compose cluster (docker/compose.yaml) and follow the nodes
#   make docker-down [DOCKER_VOLUMES=1]               stop it; DOCKER_VOLUMES=1 also deletes the data and runs volumes
#
# VARIANT=cuda (the default) adds docker/compose.gpu.yaml (NODE0_GPUS, NODE1_GPUS pick the GPUs).

VARIANT ?= cuda
NNODES ?= 2
NPROC_PER_NODE ?= 1
LOTUS_CONFIG ?= configs/tiny.yaml
LOTUS_RUN ?= tiny
LOTUS_ARGS ?=
DOCKER ?= docker
DOCKER_PROJECT ?= lotus_dist
DOCKER_VOLUMES ?= 0
# Compose v2 (the docker plugin) where it exists, else the standalone docker-compose.
DOCKER_COMPOSE ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo '$(DOCKER) compose' || echo docker-compose)

DOCKER_COMPOSE_FILES := -f docker/compose.yaml $(if $(filter cuda,$(VARIANT)),-f docker/compose.gpu.yaml)
DOCKER_COMPOSE_CMD = $(DOCKER_COMPOSE) $(DOCKER_COMPOSE_FILES) -p $(DOCKER_PROJECT)
DOCKER_NODES = $(addprefix node,$(shell seq 0 $$(($(firstword $(subst :, ,$(NNODES))) - 1))))

# Handed to compose through the environment, so that LOTUS_ARGS keeps its quotes (compose splits it
# in the container, not make or the shell here).
docker-build docker-up docker-down: export VARIANT := $(VARIANT)
docker-build docker-up docker-down: export NNODES := $(NNODES)
docker-build docker-up docker-down: export NPROC_PER_NODE := $(NPROC_PER_NODE)
docker-build docker-up docker-down: export LOTUS_CONFIG := $(LOTUS_CONFIG)
docker-build docker-up docker-down: export LOTUS_RUN := $(LOTUS_RUN)
docker-build docker-up docker-down: export LOTUS_ARGS := $(LOTUS_ARGS)

.PHONY: docker-build docker-up docker-down

docker-build:
	$(DOCKER) build -f docker/Dockerfile --build-arg VARIANT=$(VARIANT) -t lotus_dist:$(VARIANT) .

docker-up: docker-build
	$(DOCKER_COMPOSE_CMD) up --detach --no-build
	$(DOCKER_COMPOSE_CMD) logs --follow $(DOCKER_NODES)

docker-down:
	$(DOCKER_COMPOSE_CMD) down --remove-orphans $(if $(filter 1,$(DOCKER_VOLUMES)),--volumes)
