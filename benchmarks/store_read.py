"""Reading an activation store with and without its checksums: what verifying every shard costs.

    .venv/bin/python benchmarks/store_read.py               # GPT-2's shape: d_in 768, float16, 40 shards of 16k rows
    .venv/bin/python benchmarks/store_read.py --rows 200000 # another size
    .venv/bin/python benchmarks/store_read.py --smoke       # seconds: the script still works

Writes a store of random activations with saelab's StoreWriter into a temp folder, then reads it
whole, shard by shard, three ways (best of --repeats, after one warm-up pass, so the files sit in
the page cache and the read, not the disk, is timed):
- `unchecked`: what every read did before checksums: safetensors' `load_file` (mmap), no hash;
- `iter_shards`: saelab's read: the file's XXH3-64 checked over a memory map, then `load_file`;
- the hash alone over the memory-mapped file: XXH3-64 (saelab's), and the standard library's
  CRC-32 and blake2b, which saelab does not use because they cost a quarter or more of a read.
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
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


def best_of(read, repeats: int) -> float:
    read()  # warm-up: the page cache holds the files from here on
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", args.rows, args.shard_rows, args.d_in, args.dtype)
        paths, size = store.shard_paths(), store.size_bytes()

        def unchecked():
            for path in paths:
                load_file(path)["activations"].sum()  # touch the data: mmap reads lazily

        def checked():
            for shard in store.iter_shards():
                shard["activations"].sum()

        def hashed(digest):
            def read():
                for path in paths:
                    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                        digest(mapped)
            return read

        readers = {"unchecked (load_file, mmap)": unchecked, "iter_shards (XXH3 checked)": checked,
                   "xxh3_64 only": hashed(checksum), "crc32 only": hashed(zlib.crc32),
                   "blake2b only": hashed(lambda m: hashlib.blake2b(m).digest())}
        seconds = {name: best_of(read, args.repeats) for name, read in readers.items()}
    base = seconds["unchecked (load_file, mmap)"]
    print(f"store: {args.rows:,} rows x d_in {args.d_in} ({args.dtype}), {len(paths)} shards, {size / 2**20:,.0f} MiB; "
          f"best of {args.repeats}, warm page cache\n")
    print("| read | tokens/s | MiB/s | vs unchecked |")
    print("| --- | ---: | ---: | ---: |")
    for name, s in seconds.items():
        print(f"| {name} | {args.rows / s:,.0f} | {size / 2**20 / s:,.0f} | {s / base:.2f}x |")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=655_360, help="activation rows (tokens) in the store")
    parser.add_argument("--shard-rows", type=int, default=16_384, help="rows per shard")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny store, one repeat")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.rows, arguments.shard_rows, arguments.d_in, arguments.repeats = 2_000, 500, 16, 1
    main(arguments)
