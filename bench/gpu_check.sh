#!/usr/bin/env bash
# The GPU-machine checks (never in CI): the NCCL path end to end against the CPU reference, and
# rank scaling on a many-core host. Uses the machine's own python3/torch/transformers; installs
# xxhash from bench/work/wheels if it is missing (the machine may have no network). Logs go to
# ${OUT:-/tmp/gpu_out}.
#   bash bench/gpu_check.sh            # NCCL checks, then scaling on a ~5 GB checkpoint
#   SCALING=0 bash bench/gpu_check.sh  # NCCL checks only
#   NCCL=0 bash bench/gpu_check.sh     # scaling only
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; W=/tmp/gpu_work; rm -rf "$W"; mkdir -p "$OUT" "$W"
python3 -c "import xxhash" 2>/dev/null || python3 -m pip install -q --no-index --find-links bench/work/wheels xxhash
run() { python3 -m torch.distributed.run --nproc-per-node "$1" --master-addr 127.0.0.1 --master-port $((29600 + RANDOM % 1000)) "${@:2}"; }
now() { python3 -c "import time; print(time.time())"; }
since() { python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 2))" "$1"; }
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'cores', __import__('os').cpu_count())"
if [ "${NCCL:-1}" = 1 ]; then
run 2 tests/make_fsdp_checkpoint.py --out "$W/fsdp2" --optim-step > "$OUT/fixture.log" 2>&1 || { echo fixture failed; tail -20 "$OUT/fixture.log"; }
run 4 tests/make_fsdp_checkpoint.py --out "$W/tp" --layout tp --model qwen2 >> "$OUT/fixture.log" 2>&1 || { echo tp fixture failed; tail -20 "$OUT/fixture.log"; }
for fx in fsdp2 tp; do
  for n in 1 2; do  # NCCL needs a GPU per rank: with one GPU, 2 ranks are refused (nccl) or use gloo (auto)
    for backend in nccl auto; do
      echo "== backend $backend, collective: $fx with $n rank(s)"
      run "$n" -m distmerge merge --source "$W/$fx" --target "$W/out_${fx}_${n}_$backend" --backend $backend \
        --transport collective --max-shard-size 60KB --no-progress --verify > "$OUT/log_${fx}_${n}_$backend.log" 2>&1; rc=$?
      grep -h "distmerge\|Error\|result:" "$OUT/log_${fx}_${n}_$backend.log" | grep -v "^W\|^\[W" | tail -4
      [ $rc = 0 ] && python3 tests/compare_reference.py "$W/$fx" "$W/out_${fx}_${n}_$backend"
    done
  done
done
fi
[ "${SCALING:-1}" = 0 ] && exit 0

echo "== scaling on $(nproc) cores: ~5 GB fp32 FSDP2 checkpoint (40 layers of hidden 2048)"
t=$(now)
run 2 tests/make_fsdp_checkpoint.py --out "$W/big" --hidden 2048 --layers 40 --heads 16 --kv-heads 4 \
  --intermediate 2816 --vocab 32000 --meta-init --no-reference > "$OUT/big.log" 2>&1 || tail -5 "$OUT/big.log"
echo "generated in $(since "$t") s: $(du -sh "$W/big" | cut -f1)"
sync; t=$(now); cat "$W"/big/*.pt > /dev/null; echo "floor: cat of the sources $(since "$t") s"
sync; t=$(now); dd if=/dev/zero of="$W/dd.out" bs=1M count=4750 status=none; echo "floor: dd of 4.98 GB $(since "$t") s"
rm -f "$W/dd.out"
t=$(now); python3 -c "import torch"; echo "floor: import torch $(since "$t") s"
t=$(now); run 8 bench/pg_only.py > /dev/null 2>&1; echo "floor: torchrun 8 ranks, process group only $(since "$t") s"
for spec in ${SPECS:-"1:direct:auto" "2:direct:auto" "4:direct:auto" "8:direct:auto" "16:direct:auto" \
             "4:collective:auto" "8:collective:auto" "1:direct:bf16" "8:direct:bf16"}; do
  spec=${spec//:/ }
  set -- $spec; n=$1 transport=$2 dtype=$3; out="$W/big_out"; rm -rf "$out"; sync
  t=$(now)
  if [ "$n" = 1 ]; then python3 -m distmerge merge --source "$W/big" --target "$out" --dtype "$dtype" --no-progress > "$OUT/scale.log" 2>&1
  else run "$n" -m distmerge merge --source "$W/big" --target "$out" --transport "$transport" --dtype "$dtype" --no-progress --backend gloo > "$OUT/scale.log" 2>&1; fi
  echo "$n rank(s) $transport $dtype: $(since "$t") s wall"
  grep -h "merged" "$OUT/scale.log" | sed 's/^\[distmerge[^]]*\] /   /'
  grep -h "rank 0:" "$OUT/scale.log" | sed 's/^\[distmerge[^]]*\] /   /' | tail -1
done
