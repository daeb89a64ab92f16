"""How fast bytes move from a source file to an output file here, and why distmerge copies the way
it does (see docs/performance.md "Where the time goes").

    python bench/copy_speed.py [--size-gb 1.4] [--runs 3] [--dir bench/work/copy]

Moves the same bytes, 16 MiB at a time (distmerge's band), four ways, and prints the median seconds:
- buffer: pread into a fresh buffer, then pwrite (distmerge's path for bands it must cast or assemble);
- kernel: copy_file_range, file to file (distmerge's path for bands stored as they go out);
each by one process, and by two processes that each move half: into one output file (each its own
byte range, as two ranks sharing a file) or into a file each. Every run starts with the output
deleted and the source read once into the page cache.
"""
import argparse
import multiprocessing
import os
import statistics
import subprocess
import time

BAND = 16 * 2**20
IO_CHUNK = 8 * 2**20


def move(src: str, dst: str, start: int, stop: int, dst_base: int, way: str) -> None:
    """Bytes [start, stop) of src to dst at dst_base + (offset - start)."""
    fi, fo = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT, 0o644)
    for off in range(start, stop, BAND):
        n, at = min(BAND, stop - off), 0
        if way == "kernel":
            while at < n:
                at += os.copy_file_range(fi, fo, n - at, off + at, dst_base + off - start + at)
            continue
        view = memoryview(bytearray(n))  # fresh, as distmerge's read buffers are
        while at < n:
            at += os.preadv(fi, [view[at:at + IO_CHUNK]], off + at)
        at = 0
        while at < n:
            at += os.pwrite(fo, view[at:at + IO_CHUNK], dst_base + off - start + at)
    os.close(fi)
    os.close(fo)


def timed(src: str, out: str, size: int, way: str, procs: int, shared: bool) -> float:
    for name in os.listdir(out):
        os.remove(os.path.join(out, name))
    subprocess.run(["sync"], check=True)
    subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)
    half = size // procs
    jobs = []
    for p in range(procs):
        start, stop = p * half, size if p == procs - 1 else (p + 1) * half
        dst = os.path.join(out, "out" if shared else f"out{p}")
        jobs.append(multiprocessing.Process(target=move, args=(src, dst, start, stop, start if shared else 0, way)))
    begin = time.perf_counter()
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    return time.perf_counter() - begin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "work", "copy"))
    args = ap.parse_args()
    size = int(args.size_gb * 1e9) // 4096 * 4096
    os.makedirs(os.path.join(args.dir, "out"), exist_ok=True)
    src, out = os.path.join(args.dir, "source.bin"), os.path.join(args.dir, "out")
    if not os.path.exists(src) or os.path.getsize(src) != size:
        with open(src, "wb") as f:
            block = os.urandom(BAND)
            for off in range(0, size, BAND):
                f.write(block[:min(BAND, size - off)])
    cases = [("buffer", 1, False), ("kernel", 1, False), ("buffer", 2, True), ("kernel", 2, True),
             ("buffer", 2, False), ("kernel", 2, False)]
    seconds = {case: [] for case in cases}
    for _ in range(args.runs):  # interleaved, so that the machine's slow spells hit every case
        for case in cases:
            seconds[case].append(timed(src, out, size, *case))
    print(f"{size / 1e9:.2f} GB, 16 MiB bands, median of {args.runs} (min..max) seconds")
    for (way, procs, shared), runs in seconds.items():
        where = "one output file" if procs == 1 else ("one shared output file" if shared else "a file each")
        print(f"  {way:6s} {procs} process(es), {where:22s} {statistics.median(runs):6.2f}  "
              f"({min(runs):.2f}..{max(runs):.2f})  {size / 1e9 / statistics.median(runs):5.2f} GB/s")


if __name__ == "__main__":
    main()
