"""Hash speed on this machine: why distmerge records xxh3-128 (see docs/reliability.md "Integrity and the manifest").
python bench/hash_speed.py  ->  GB/s per algorithm on 256 MiB of random bytes, fed in 16 MiB calls."""
import hashlib
import os
import time

import xxhash

data = memoryview(os.urandom(256 * 2**20))
CHUNK = 16 * 2**20
for name, make in [("xxh3_128", xxhash.xxh3_128), ("xxh64", xxhash.xxh64), ("blake2b", hashlib.blake2b),
                   ("sha256", hashlib.sha256)]:
    best = float("inf")
    for _ in range(3):
        h, start = make(), time.perf_counter()
        for i in range(0, len(data), CHUNK):
            h.update(data[i:i + CHUNK])
        h.digest()
        best = min(best, time.perf_counter() - start)
    print(f"{name:10s} {len(data) / best / 1e9:6.2f} GB/s")
