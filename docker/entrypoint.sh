#!/usr/bin/env bash
# Entry point of the lotus_dist image.
#   docker run IMAGE [pretrain.py args]       one process: python pretrain.py ARGS
#   LOTUS_LAUNCH=torchrun                     torchrun via scripts/launch_multinode.sh (NNODES, NODE_RANK,
#                                             MASTER_ADDR ... from the environment; see that script)
#   docker run IMAGE COMMAND [args]           any other program of the image (bash, tensorboard, pytest ...)
# LOTUS_ARGS holds extra pretrain.py arguments, split like a shell line (quotes kept, nothing expanded)
# and placed after the others, so compose users can add overrides without editing the command.
set -euo pipefail

APP="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

run() {
    if [[ "${LAUNCH_DRY_RUN:-0}" == 1 ]]; then
        printf -v line '%q ' "$@"
        echo "${line% }"
        exit 0
    fi
    exec "$@"
}

# A first word that names a program (and is no option or override) runs that program as it is.
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]] && command -v "$1" >/dev/null; then
    run "$@"
fi

extra=()
if [[ -n "${LOTUS_ARGS:-}" ]]; then
    split='
import os, shlex, sys
line = os.environ["LOTUS_ARGS"]
try:
    words = shlex.split(line)
except ValueError as e:
    sys.exit(f"entrypoint.sh: cannot split LOTUS_ARGS as a shell line ({e}): {line}")
sys.stdout.write("".join(w + "\0" for w in words))
'
    mapfile -d '' -t extra < <("$PYTHON" -c "$split")
    # A bad quote must stop the run, not silently drop the overrides.
    wait "$!" || exit 2
    # They are in the argument list now; the workers need not see them twice.
    unset LOTUS_ARGS
fi

case "${LOTUS_LAUNCH:-python}" in
python) run "$PYTHON" "$APP/pretrain.py" "$@" "${extra[@]}" ;;
torchrun) exec "$APP/scripts/launch_multinode.sh" "$@" "${extra[@]}" ;;
*)
    echo "entrypoint.sh: LOTUS_LAUNCH must be python or torchrun, got '${LOTUS_LAUNCH}'" >&2
    exit 2
    ;;
esac
