#!/usr/bin/env bash
# Set up everything the tests need and run them; CI runs exactly this (.ci/run).
#   bash launch/test.sh                 # the whole suite (about 20 min on 2 cores)
#   bash launch/test.sh -m "not slow"   # the fast tier: no test that starts processes
#   bash launch/test.sh tests/test_cli.py -k typo
# Needs python3 with venv, g++, access to the package index and about 2.2 GB of disk for .venv.
# As root with apt-get it also installs SLURM (slurm-wlm) for tests/test_slurm.py; where it cannot,
# it says so in one line before the run (that test then fails with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
say() { echo "launch/test.sh: $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" \
    || { say "python3 -m venv failed: install python3 with venv (Debian: apt-get install python3-venv)"; exit 1; }
fi
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned: a plain `torch` requirement in a fresh venv may pull a multi-GB CUDA build
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
# torchtitan writes the torchtitan fixtures; its declared dependencies (wandb, datasets, ...) are
# not needed to build and save a model, so it is installed without them plus what its imports need
"$VENV/bin/pip" install -q --no-deps torchtitan==0.3.0 spmd_types==0.2.3 torch_checkpointing==0.1.1 tyro==1.0.17 \
  docstring_parser==0.18.0 typeguard==4.6.1 triton==3.9.0 einops==0.8.2
# Megatron-Bridge's LoRA writes the Megatron LoRA fixtures; only its PEFT modules are imported
# (tests/make_megatron_lora.py), so it is installed without its training stack's dependencies
"$VENV/bin/pip" install -q --no-deps megatron-bridge==0.3.1
# torchtune writes the torchtune fixtures; it pins packages of its own (torchao 0.10), so it gets an
# environment of its own that sees this one's packages (torch included) through a .pth file
TT_VENV=${TORCHTUNE_VENV:-.venv-torchtune}
purelib() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
if ! "$TT_VENV/bin/python" -c "import torchtune" 2>/dev/null; then
  (python3 -m venv "$TT_VENV" && realpath "$(purelib "$VENV")" > "$(purelib "$TT_VENV")/main-venv.pth" \
    && "$TT_VENV/bin/pip" install -q torchtune==0.6.1 torchao==0.10.0) \
    || say "could not set up torchtune in $TT_VENV: the torchtune tests will be skipped"
fi
export TORCHTUNE_PYTHON="$PWD/$TT_VENV/bin/python"

if ! command -v slurmctld >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing SLURM (apt-get install slurm-wlm) for tests/test_slurm.py"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm >/dev/null) \
      || say "could not install slurm-wlm; tests/test_slurm.py will fail"
  else
    say "SLURM (slurm-wlm) is missing and cannot be installed without root and apt-get: tests/test_slurm.py will fail"
  fi
fi
[ $# -gt 0 ] || say "running every test: about 20 min on 2 cores (the fast tier: bash launch/test.sh -m 'not slow')"
exec "$VENV/bin/python" -m pytest -q "$@"
