#!/usr/bin/env bash
# Start pretrain.py under torchrun as one node of a multi-node job.
#
# Run the same command on every host; only NODE_RANK differs:
#   host0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 scripts/launch_multinode.sh --config configs/llama_1b.yaml
#   host1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=host0 scripts/launch_multinode.sh --config configs/llama_1b.yaml
# The arguments go to pretrain.py unchanged (--config FILE, section.key=value overrides).
#
# Environment [default]:
#   NNODES          number of nodes, or MIN:MAX for an elastic job [1]
#   NODE_RANK       this node's rank, 0..NNODES-1, checked and exported [$SLURM_NODEID, else 0]
#   NPROC_PER_NODE  processes on this node, one per GPU [GPUs in CUDA_VISIBLE_DEVICES or nvidia-smi, else 1]
#   MASTER_ADDR     host of node 0, which serves the c10d rendezvous [required when NNODES > 1]
#   MASTER_PORT     port of the rendezvous [29400]
#   RDZV_ID         job id, identical on every node [lotus]
#   MAX_RESTARTS    torchrun --max-restarts [0]
#   TORCHRUN        the torchrun executable [torchrun]
#   PRETRAIN        the training script [pretrain.py of this checkout]
#   LAUNCH_DRY_RUN  1: print the environment and the torchrun command instead of running them
set -euo pipefail

die() {
    echo "launch_multinode.sh: $*" >&2
    exit 2
}

# Number of GPUs this process may use; 1 on a CPU-only host (one gloo process).
detect_gpus() {
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local -a ids
        IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    local listing count
    if listing="$(nvidia-smi --list-gpus 2>/dev/null)"; then
        count="$(grep -c '^GPU ' <<<"$listing" || true)"
        if ((count > 0)); then
            echo "$count"
            return
        fi
    fi
    echo 1
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(detect_gpus)}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29400}"
RDZV_ID="${RDZV_ID:-lotus}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
TORCHRUN="${TORCHRUN:-torchrun}"
PRETRAIN="${PRETRAIN:-$ROOT/pretrain.py}"

[[ "$NNODES" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be N or MIN:MAX, got '$NNODES'"
[[ "$NODE_RANK" =~ ^[0-9]+$ ]] || die "NODE_RANK must be a number, got '$NODE_RANK'"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive number, got '$NPROC_PER_NODE'"
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a number, got '$MASTER_PORT'"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '$MAX_RESTARTS'"
max_nodes="${NNODES#*:}"
((NODE_RANK < max_nodes)) || die "NODE_RANK ($NODE_RANK) must be below NNODES ($NNODES)"

cmd=("$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE")
if [[ "$NNODES" == 1 && -z "$MASTER_ADDR" ]]; then
    # One node: --standalone runs its own rendezvous on a free local port.
    cmd+=(--standalone)
else
    [[ -n "$MASTER_ADDR" ]] || die "MASTER_ADDR (the host of node 0) is required when NNODES=$NNODES"
    # c10d: node 0's torchrun hosts the rendezvous store (it recognises MASTER_ADDR as its own name or
    # address); the other nodes connect to it. Nodes are ranked in joining order, so NODE_RANK is only
    # exported for the record (torchrun ignores --node-rank under c10d, with a warning).
    cmd+=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID")
fi
cmd+=(--max-restarts="$MAX_RESTARTS" "$PRETRAIN" "$@")

export NNODES NODE_RANK NPROC_PER_NODE MASTER_PORT RDZV_ID
if [[ -n "$MASTER_ADDR" ]]; then
    export MASTER_ADDR
fi

if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
    # A runnable shell snippet: the variables torchrun inherits that matter to a run, then the command.
    echo "# launch_multinode.sh dry run: environment handed to torchrun, then the command"
    while IFS= read -r name; do
        case "$name" in
        NNODES | NODE_RANK | NPROC_PER_NODE | MASTER_ADDR | MASTER_PORT | RDZV_ID | OMP_NUM_THREADS | \
            CUDA_VISIBLE_DEVICES | NCCL_* | GLOO_* | TORCH_* | LOTUS_*)
            printf 'export %s=%q\n' "$name" "${!name}"
            ;;
        esac
    done < <(compgen -e | LC_ALL=C sort)
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
    exit 0
fi

command -v "$TORCHRUN" >/dev/null || die "'$TORCHRUN' not found: activate the environment or set TORCHRUN"
exec "${cmd[@]}"
