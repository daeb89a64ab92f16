"""python tests/compare_reference.py CHECKPOINT MERGED: exit 0 when every merged tensor equals the
checkpoint's reference/model.safetensors bit for bit (used by launch/gpu_check.sh)."""
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

reference = load_file(Path(sys.argv[1]) / "reference" / "model.safetensors")
merged = {}
for f in sorted(Path(sys.argv[2]).glob("*.safetensors")):
    merged.update(load_file(f))
bad = sorted(set(reference) ^ set(merged))
bad += [k for k in reference if k in merged and not (merged[k].dtype == reference[k].dtype
        and merged[k].shape == reference[k].shape and torch.equal(merged[k], reference[k]))]
print(f"{sys.argv[2]}: {len(reference) - len(bad)}/{len(reference)} tensors bit-exact" + (f"; differ: {bad[:5]}" if bad else ""))
sys.exit(1 if bad else 0)
