#!/usr/bin/env bash
# distmerge on one machine: torchrun with one rank per GPU, or per CPU core (at most 8) without GPUs.
#   launch/merge_local.sh SOURCE TARGET [more `distmerge merge` options...]
#   NPROC_PER_NODE=4 launch/merge_local.sh ckpts/global_step_500/actor out/step500 --dtype bf16
# PYTHON picks the interpreter (default: python from PATH); MASTER_PORT the port (default: a free one).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/merge_local.sh SOURCE TARGET [distmerge merge options]" >&2
  exit 2
fi
SOURCE=$1 TARGET=$2
shift 2
PYTHON=${PYTHON:-python}
GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "${GPUS:-0}" -gt 0 ]; then
  NPROC=${NPROC_PER_NODE:-$GPUS}
else
  CPUS=$(nproc)
  NPROC=${NPROC_PER_NODE:-$(( CPUS < 8 ? CPUS : 8 ))}
fi
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
exec "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "$PORT" \
  -m distmerge merge --source "$SOURCE" --target "$TARGET" "$@"
