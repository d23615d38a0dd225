"""Reading an activation store with and without its checksums: what verifying every shard costs.

    .venv/bin/python benchmarks/store_read.py               # GPT-2's shape: d_in 768, float16, 20 shards of 16k rows
    .venv/bin/python benchmarks/store_read.py --rows 200000 # another size
    .venv/bin/python benchmarks/store_read.py --smoke       # seconds: the script still works

Writes a store of random activations with saelab's StoreWriter into a temp folder, then reads it
whole (best of --repeats, after one warm-up pass, so the files sit in the page cache and the read,
not the disk, is timed), each read as saelab does it now (each shard's XXH3-64 checked over a memory
map, its tensors views of that map) and as it did before checksums (safetensors' `load_file`, no hash):
- `activations()`: every row as one float32 tensor (notebook 03);
- `chunks()`: float32 chunks of 4096 rows (MAE, dashboards, probing: notebooks 04 and 06);
- `raw`: each shard's fp16 activations summed: the cheapest use, where a hash weighs most;
- the hash alone over the memory-mapped files: XXH3-64 (saelab's), and the standard library's
  CRC-32 and blake2b, which saelab does not use: they cost several times more.
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import resource
import tempfile
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from saelab.store import ActivationStore, StoreWriter, checksum


def make_store(directory: Path, rows: int, shard_rows: int, d_in: int, dtype: str) -> ActivationStore:
    generator = torch.Generator().manual_seed(0)
    writer = StoreWriter(directory, model_name="random", hook="blocks.6.hook_resid_pre", d_in=d_in, dtype=dtype)
    for start in range(0, rows, shard_rows):
        n = min(shard_rows, rows - start)
        index = {"context": torch.arange(start, start + n) // 128, "position": torch.arange(n) % 128,
                 "token_id": torch.zeros(n, dtype=torch.int64)}
        writer.add_shard(torch.randn(n, d_in, generator=generator), index, contexts=-(-n // 128))
    return writer.finish()


def best_of(readers: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """(CPU seconds, wall seconds) per reader, each the least of `repeats` passes, after one warm-up pass (the
    page cache then holds the files). Rounds interleave the readers, so other work on the machine hits all
    alike. A read from the page cache is CPU work, so CPU time (time.process_time: this process's user +
    system time, page faults included) is its cost; wall time also counts the neighbours on a shared machine."""
    for read in readers.values():
        read()
    times = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            cpu, wall = time.process_time(), time.perf_counter()
            read()
            times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {name: (min(c for c, _ in t), min(w for _, w in t)) for name, t in times.items()}


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", args.rows, args.shard_rows, args.d_in, args.dtype)
        paths, size = store.shard_paths(), store.size_bytes()

        old = ActivationStore(store.directory)  # the same store, read as before checksums: no hash, load_file
        old.iter_shards = lambda device="cpu": (load_file(path, device=str(device)) for path in old.shard_paths())

        def hashed(digest):
            def read():
                for path in paths:
                    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        digest(mapped)
            return read

        readers = {"activations(), before": old.activations, "activations(), checked": store.activations,
                   "chunks(), before": lambda: list(old.chunks()), "chunks(), checked": lambda: list(store.chunks()),
                   "raw, before": lambda: [torch.sum(s["activations"]) for s in old.iter_shards()],
                   "raw, checked": lambda: [torch.sum(s["activations"]) for s in store.iter_shards()],
                   "xxh3_64 only": hashed(checksum), "crc32 only": hashed(zlib.crc32),
                   "blake2b only": hashed(lambda m: hashlib.blake2b(m).digest())}
        seconds = best_of(readers, args.repeats)
    print(f"store: {args.rows:,} rows x d_in {args.d_in} ({args.dtype}), {len(paths)} shards, {size / 2**20:,.0f} MiB; "
          f"best of {args.repeats}, warm page cache, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs\n")
    print("| read | tokens/s (CPU time) | MiB/s (CPU time) | CPU time vs before | tokens/s (wall) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (cpu, wall) in seconds.items():
        kind = name.split(",")[0]
        versus = f"{cpu / seconds[kind + ', before'][0]:.2f}x" if name.endswith("checked") else ""
        print(f"| {name} | {args.rows / cpu:,.0f} | {size / 2**20 / cpu:,.0f} | {versus} | {args.rows / wall:,.0f} |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=327_680, help="activation rows (tokens) in the store")
    parser.add_argument("--shard-rows", type=int, default=16_384, help="rows per shard")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="a tiny store, one repeat")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.rows, arguments.shard_rows, arguments.d_in, arguments.repeats = 2_000, 500, 16, 1
    main(arguments)
