"""MAE throughput: one streaming pass (encode + running top-k + stats) over a store of random activations.

    python benchmarks/mae.py                      # offline scale, then the gpt2 shape (768 -> 6144)
    python benchmarks/mae.py --scale gpt2 --tokens 640000 --device cuda   # the seed's full MAE sample

Prints tokens/s and peak memory (CPU: the process's peak RSS; CUDA: peak allocated). Each scale
runs in its own process so one scale's peak does not hide the next. Random activations and a
random-init SAE: the work per token is the same as for a trained SAE (dense encode + top-k); only
the number of non-zero activations differs, which costs nothing here.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

import torch

from saelab.analysis import max_activating
from saelab.sae import SAE
from saelab.store import StoreWriter

SCALES = {  # name: (d_in, d_sae, default tokens on CPU, k)
    # offline profile: 100 MAE texts x 63 stored positions, SAE 64 -> 512
    "offline": (64, 512, 100 * 63, 5),
    # gpt2 shape; the seed's full sample is 5,000 texts x 127 = 635,000 tokens (use --tokens on a GPU)
    "gpt2": (768, 6144, 32_768, 5),
}


def make_store(directory: str, tokens: int, d_in: int, shard_rows: int = 65_536):
    writer = StoreWriter(directory, model_name="random", hook="blocks.6.hook_resid_pre", d_in=d_in,
                         dtype="float16")
    generator = torch.Generator().manual_seed(0)
    for start in range(0, tokens, shard_rows):
        rows = min(shard_rows, tokens - start)
        index = {"context": torch.arange(start, start + rows) // 127, "position": torch.arange(rows) % 127 + 1,
                 "token_id": torch.randint(0, 50_257, (rows,), generator=generator)}
        writer.add_shard(torch.randn(rows, d_in, generator=generator), index, contexts=rows // 127)
    return writer.finish()


def run(scale: str, tokens: int | None, device: str, chunk_rows: int) -> None:
    d_in, d_sae, default_tokens, k = SCALES[scale]
    tokens = tokens or default_tokens
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(tmp, tokens, d_in)
        sae = SAE(d_in, d_sae)
        max_activating(sae, store, k, device=device, chunk_rows=chunk_rows, progress=False)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        mae = max_activating(sae, store, k, device=device, chunk_rows=chunk_rows, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    if device.startswith("cuda"):
        peak = f"peak CUDA allocated {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    else:
        peak = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB"
    dense = tokens * d_sae * 4 / 2**20
    print(f"{scale:8s} {d_in}->{d_sae} k={k} on {device} ({torch.get_num_threads()} threads): "
          f"{mae.n_tokens:,} tokens in {seconds:.2f} s = {mae.n_tokens / seconds:,.0f} tokens/s; {peak} "
          f"(all feature activations at once would be {dense:,.0f} MiB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=[*SCALES, "all"], default="all")
    parser.add_argument("--tokens", type=int, default=None, help="rows in the random store")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.scale == "all":
        print(f"MAE benchmark on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
        for scale in SCALES:  # one process each, so peak memory is per scale
            cmd = [sys.executable, __file__, "--scale", scale, "--device", device, "--chunk-rows", str(args.chunk_rows)]
            subprocess.run(cmd + (["--tokens", str(args.tokens)] if args.tokens else []), check=True)
    else:
        run(args.scale, args.tokens, device, args.chunk_rows)


if __name__ == "__main__":
    main()
