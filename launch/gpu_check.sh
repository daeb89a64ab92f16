#!/usr/bin/env bash
# The GPU checks, run on a machine with CUDA (not in CI): the NCCL backend end to end, and rank
# scaling on a many-core host. Uses the machine's own python3/torch; writes logs to ${OUT:-/tmp/gpu_out}.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; W=/tmp/gpu_work; rm -rf "$W"; mkdir -p "$OUT" "$W"
run() { python3 -m torch.distributed.run --nproc-per-node "$1" --master-addr 127.0.0.1 --master-port $((29600 + RANDOM % 1000)) "${@:2}"; }
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'cores', __import__('os').cpu_count())"
run 2 tests/make_fsdp_checkpoint.py --out "$W/fsdp2" --optim-step > "$OUT/fixture.log" 2>&1 || { echo fixture failed; tail -20 "$OUT/fixture.log"; }
run 4 tests/make_fsdp_checkpoint.py --out "$W/tp" --layout tp --model qwen2 >> "$OUT/fixture.log" 2>&1 || { echo tp fixture failed; tail -20 "$OUT/fixture.log"; }
for fx in fsdp2 tp; do
  for n in 1 2; do  # NCCL needs a GPU per rank: with one GPU, 2 ranks are refused (nccl) or use gloo (auto)
    for backend in nccl auto; do
      echo "== backend $backend, collective: $fx with $n rank(s)"
      run "$n" -m distmerge merge --source "$W/$fx" --target "$W/out_${fx}_${n}_$backend" --backend $backend \
        --transport collective --max-shard-size 60KB --no-progress > "$OUT/log_${fx}_${n}_$backend.log" 2>&1; rc=$?
      grep -h "distmerge\|Error" "$OUT/log_${fx}_${n}_$backend.log" | grep -v "^W\|^\[W" | tail -4
      [ $rc = 0 ] && python3 tests/compare_reference.py "$W/$fx" "$W/out_${fx}_${n}_$backend"
    done
  done
done
[ "${SCALING:-1}" = 0 ] && exit 0
echo "== scaling on $(nproc) cores, 1.4 GB fp32 checkpoint, direct transport"
run 2 tests/make_fsdp_checkpoint.py --out "$W/big" --hidden 2048 --layers 8 --heads 16 --kv-heads 4 \
  --intermediate 2816 --vocab 32000 --meta-init --no-reference > "$OUT/big.log" 2>&1 || tail -5 "$OUT/big.log"
cat "$W"/big/*.pt > /dev/null
for n in 1 2 4 8; do
  sync; start=$(python3 -c "import time; print(time.time())")
  if [ "$n" = 1 ]; then python3 -m distmerge merge --source "$W/big" --target "$W/big_out_$n" --no-progress > "$OUT/scale_$n.log" 2>&1
  else run "$n" -m distmerge merge --source "$W/big" --target "$W/big_out_$n" --no-progress > "$OUT/scale_$n.log" 2>&1; fi
  python3 -c "import sys, time; print(sys.argv[1], 'rank(s):', round(time.time() - float(sys.argv[2]), 2), 's wall')" "$n" "$start"
  grep -h "merged\|rank [0-9]:" "$OUT/scale_$n.log" | tail -3
done
