"""MAE throughput: one streaming pass (encode + running top-k + stats) over a store of random activations.

    python benchmarks/mae.py                      # offline scale, then the gpt2 shape (768 -> 6144)
    python benchmarks/mae.py --scale gpt2 --tokens 635000 --device cuda   # the seed's full MAE sample
    python benchmarks/mae.py --smoke              # seconds on the CPU: the script still works (make test)

Prints a table: tokens/s and peak memory (CPU: the process's peak RSS; CUDA: peak allocated during
the timed pass). Each scale runs in its own process so one scale's peak does not hide the next.
Random activations and a random-init SAE: the work per token is the same as for a trained SAE
(dense encode + top-k); only the number of non-zero activations differs, which costs nothing here.
A short pass over the first shard warms the device up before the timed pass.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from saelab.features.analysis import max_activating
from saelab.sae import SAE
from saelab.store import ActivationStore, StoreWriter

SCALES = {  # name: (d_in, d_sae, default tokens, k)
    # offline profile: 100 MAE texts x 63 stored positions, SAE 64 -> 512
    "offline": (64, 512, 100 * 63, 5),
    # gpt2 shape; the seed's full sample is 5,000 texts x 127 = 635,000 tokens (use --tokens on a GPU)
    "gpt2": (768, 6144, 32_768, 5),
    "smoke": (16, 64, 1_000, 5),  # --smoke only
}
SHARD_ROWS = 65_536  # as the gpt2 profile's store


def make_store(directory: str, tokens: int, d_in: int, shard_rows: int = SHARD_ROWS) -> ActivationStore:
    writer = StoreWriter(directory, model_name="random", hook="blocks.6.hook_resid_pre", d_in=d_in,
                         dtype="float16")
    generator = torch.Generator().manual_seed(0)
    for start in range(0, tokens, shard_rows):
        rows = min(shard_rows, tokens - start)
        index = {"context": torch.arange(start, start + rows) // 127, "position": torch.arange(rows) % 127 + 1,
                 "token_id": torch.randint(0, 50_257, (rows,), generator=generator)}
        writer.add_shard(torch.randn(rows, d_in, generator=generator), index, contexts=rows // 127)
    return writer.finish()


def run(scale: str, tokens: int | None, device: str, chunk_rows: int) -> dict:
    d_in, d_sae, default_tokens, k = SCALES[scale]
    tokens = tokens or default_tokens
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(f"{tmp}/store", tokens, d_in)
        warm_up = make_store(f"{tmp}/warm_up", min(tokens, (4 if cuda else 1) * chunk_rows), d_in)
        sae = SAE(d_in, d_sae).to(device)
        max_activating(sae, warm_up, k, chunk_rows=chunk_rows, progress=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        mae = max_activating(sae, store, k, chunk_rows=chunk_rows, progress=False)  # results on the CPU: synced
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"scale": scale, "shape": f"{d_in}->{d_sae}", "k": k, "device": device, "threads": torch.get_num_threads(),
            "tokens": mae.n_tokens, "seconds": round(seconds, 2), "tokens_per_s": round(mae.n_tokens / seconds),
            "peak_mib": round(peak / 2**20), "peak_of": "CUDA allocated" if cuda else "process RSS",
            "dense_mib": round(tokens * d_sae * 4 / 2**20)}


COLUMNS = [("scale", 8), ("shape", 10), ("k", 2), ("device", 6), ("threads", 7), ("tokens", 9), ("seconds", 8),
           ("tokens_per_s", 10), ("peak_mib", 9), ("peak_of", 14), ("dense_mib", 9)]
HEADERS = {"tokens_per_s": "tokens/s", "peak_mib": "peak MiB", "peak_of": "peak of", "dense_mib": "dense MiB"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=list(SCALES), help="one scale (default: offline, then gpt2)")
    parser.add_argument("--tokens", type=int, default=None, help="rows in the random store")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (--smoke: cpu)")
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny scale on the CPU (make test runs it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # child process: one scale, printed as JSON on the last line
        print(json.dumps(run(args.scale, args.tokens, args.device, args.chunk_rows)))
        return
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    scales = ["smoke"] if args.smoke else [args.scale] if args.scale else ["offline", "gpt2"]
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    print(f"MAE benchmark on {device} ({name}), torch {torch.__version__}; dense MiB = all feature activations "
          "at once, which the streaming pass never holds")
    print(" ".join(f"{HEADERS.get(c, c):>{w}}" for c, w in COLUMNS))
    for scale in scales:  # one process each, so peak memory is per scale
        command = [sys.executable, __file__, "--worker", "--scale", scale, "--device", device,
                   "--chunk-rows", str(args.chunk_rows), *(["--tokens", str(args.tokens)] if args.tokens else [])]
        child = subprocess.run(command, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"scale {scale} failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(" ".join(f"{row[c]:>{w}}" for c, w in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
