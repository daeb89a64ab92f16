#!/usr/bin/env bash
# Demo: install, write a small verl-style FSDP2 checkpoint with 2 ranks, merge it with 2 ranks,
# load the result with transformers and check its logits against the original model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEMO=${DEMO:-demo}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[test]"
rm -rf "$DEMO"
echo "== writing a sample verl FSDP2 checkpoint (2 ranks) to $DEMO/actor"
"$VENV/bin/torchrun" --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${PORT:-29517}" \
  tests/make_fsdp_checkpoint.py --out "$DEMO/actor" --hidden 128 --layers 4 --intermediate 256 --vocab 32001
echo "== distmerge inspect"
"$VENV/bin/distmerge" inspect "$DEMO/actor" --nproc 2 --max-shard-size 2MB
echo "== merging with torchrun --nproc-per-node 2 -m distmerge"
"$VENV/bin/torchrun" --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${PORT2:-29518}" \
  -m distmerge merge --source "$DEMO/actor" --target "$DEMO/hf" --max-shard-size 2MB --verify
ls -l "$DEMO/hf"
echo "== distmerge verify against the live model's tensors"
"$VENV/bin/distmerge" verify "$DEMO/hf" --reference "$DEMO/actor/reference" | tail -3
echo "== loading $DEMO/hf with transformers"
"$VENV/bin/python" - "$DEMO" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
demo = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(f"{demo}/hf")
tok = AutoTokenizer.from_pretrained(f"{demo}/hf")
with torch.no_grad():
    logits = model(input_ids=torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])).logits
ref = torch.load(f"{demo}/actor/reference/logits.pt")
diff = (logits - ref).abs().max().item()
print(f"loaded {type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters; "
      f"tokenizer vocab {tok.vocab_size}; max |logits - original| = {diff:.2e}")
assert diff < 1e-5, "merged model differs from the original"
print("OK: the merged checkpoint reproduces the original model")
PY
