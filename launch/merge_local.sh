#!/usr/bin/env bash
# distmerge on one machine: one rank per GPU, or per CPU core (at most 8) without GPUs, forked by
# `distmerge merge --local-ranks N` (one torch import for all ranks: ~2 s faster to start than torchrun).
#   launch/merge_local.sh SOURCE TARGET [more `distmerge merge` options...]
#   NPROC_PER_NODE=4 launch/merge_local.sh ckpts/global_step_500/actor out/step500 --dtype bf16
# PYTHON picks the interpreter (default: an activated virtualenv's python, else this checkout's .venv
# when it exists, else python3); MASTER_PORT the port (default: a free one).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/merge_local.sh SOURCE TARGET [distmerge merge options]" >&2
  exit 2
fi
SOURCE=$1 TARGET=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON=$VIRTUAL_ENV/bin/python
  elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
  else PYTHON=python3
  fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's distmerge, whichever interpreter runs it
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${GPUS:-0}" -gt 0 ]; then
  NPROC=${NPROC_PER_NODE:-$GPUS}
else
  CPUS=$(nproc)
  NPROC=${NPROC_PER_NODE:-$(( CPUS < 8 ? CPUS : 8 ))}
fi
exec "$PYTHON" -m distmerge merge --local-ranks "$NPROC" --source "$SOURCE" --target "$TARGET" "$@"
