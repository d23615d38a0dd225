"""Capture throughput (tokens/s) and peak memory, for two corpus sizes and two random-weight models.

    .venv/bin/python benchmarks/capture.py                  # on the GPU if there is one, else the CPU
    .venv/bin/python benchmarks/capture.py --quick          # quarter-size corpora
    .venv/bin/python benchmarks/capture.py --device cuda --case gpt2-small-shape --batch-size 32 0
                                                            # batch 32 next to saelab's CUDA batch (0)
    .venv/bin/python benchmarks/capture.py --smoke          # seconds on the CPU: the script still works

Models: the offline profile's random model (d_model 64, 8 layers), and a random-weight model of
GPT-2 small's exact shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257, n_ctx 1024,
gelu_new; 128-token contexts, fp16 store), so the cost of the real `gpt2` capture is known without
the hub. Token ids are random (BOS first): a forward pass costs the same whatever the tokens.
The batch is saelab's (`capture.capture_batch`: capture_batch_size on the CPU, larger on CUDA)
unless --batch-size names others. On CUDA a short capture of the "mae" split warms the GPU up first.

Shards are written by capture's background thread (`saelab.data.capture.ShardBuffer`), so the GPU does not
wait for the disk. Each case runs in its own process, because peak RSS (ru_maxrss) never goes down within one.
If memory is bounded by one shard plus one batch, the capture's peak is the same for both sizes.
Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

CASES = {  # name: (profile overrides, model n_ctx, contexts of the two corpora on the CPU, on CUDA)
    "offline-tiny": (dict(), 64, (512, 2048), (8192, 32768)),
    "gpt2-small-shape": (dict(d_in=768, context_size=128, capture_batch_size=32, store_dtype="float16",
                              offline_vocab_size=50257, offline_n_layers=12, offline_n_heads=12), 1024,
                         (64, 256), (4096, 16384)),
}
SMOKE = ("offline-tiny", 24)  # --smoke: one case, 24 contexts
SHARD_ROWS = 4096  # small shards, so both corpus sizes span several and the buffer bound is visible


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """Samples the current RSS every 20 ms: the peak *during* capture, after the model is built."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = current_rss_mib(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, current_rss_mib())
            time.sleep(0.02)


def write_random_tokens(profile, contexts: dict[str, int], bos: int) -> None:
    """Token datasets in saelab.data.tokens's layout (one per split), of random ids with BOS at position 0."""
    import datasets
    import torch

    from saelab import paths
    from saelab.data import tokens

    out = paths.tokens_dir(profile)
    generator = torch.Generator().manual_seed(0)
    for split, n in contexts.items():
        ids = torch.randint(0, profile.offline_vocab_size, (n, profile.context_size), generator=generator)
        ids[:, 0] = bos
        datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(out / split))
    (out / tokens.INFO).write_text(json.dumps({"settings": tokens.token_settings(profile), "profile": profile.name,
                                             "splits": {}}))


def run_case(name: str, contexts: int, device: str, batch_size: int | None) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab.config import OFFLINE
    from saelab.data import capture, lm

    overrides, n_ctx, _, _ = CASES[name]
    profile = OFFLINE.replace(name=f"bench-{name}", shard_rows=SHARD_ROWS, n_texts=contexts, **overrides)
    config = GPT2Config(vocab_size=profile.offline_vocab_size, n_positions=n_ctx, n_embd=profile.d_in,
                        n_layer=profile.offline_n_layers, n_head=profile.offline_n_heads,
                        activation_function="gelu_new")
    with torch.device(device):  # weights made (and initialised) where they will run
        model = lm.hooked_from_hf(GPT2LMHeadModel(config).eval())  # the HF copy is freed here
    cuda = model.cfg.device.startswith("cuda")
    batch = batch_size or capture.capture_batch(profile, model, torch.device(model.cfg.device))
    splits = {"train": contexts, **({"mae": 2 * batch} if cuda else {})}  # mae: the warm-up
    write_random_tokens(profile, splits, bos=profile.offline_vocab_size - 1)
    gc.collect()
    if cuda:  # cuBLAS handles, kernels and the allocator's pool, outside the timed capture
        capture.capture_activations(profile, "mae", lm=model, batch_size=batch, progress=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = RssSampler()
    rss_before = sampler.peak
    sampler.start()
    started = time.perf_counter()
    store = capture.capture_activations(profile, "train", lm=model, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started  # the store is on disk: capture waited for every copy
    sampler.running = False
    stats = capture.read_stats(profile, "train")
    return {"case": name, "device": stats["device"], "batch": stats["batch_size"], "contexts": contexts,
            "tokens": contexts * profile.context_size, "tokens_per_s": round(contexts * profile.context_size / seconds),
            "seconds": round(seconds, 2), "shards": len(store.shard_paths()),
            "store_mib": round(store.size_bytes() / 2**20, 1),
            "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else "-",
            "rss_before_mib": round(rss_before), "rss_peak_capture_mib": round(sampler.peak),
            "rss_peak_process_mib": round(peak_rss_mib())}


COLUMNS = [("case", 18), ("device", 7), ("batch", 6), ("contexts", 8), ("tokens", 9), ("tokens_per_s", 9),
           ("seconds", 8), ("shards", 6), ("store_mib", 9), ("gpu_peak_mib", 12), ("rss_before_mib", 10),
           ("rss_peak_capture_mib", 11), ("rss_peak_process_mib", 11)]
HEADERS = {"tokens_per_s": "tokens/s", "store_mib": "store MiB", "gpu_peak_mib": "peak GPU MiB",
           "rss_before_mib": "RSS before", "rss_peak_capture_mib": "RSS capture", "rss_peak_process_mib": "RSS process"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quarter-size corpora")
    parser.add_argument("--smoke", action="store_true", help="seconds: one tiny case on the CPU (make test runs it)")
    parser.add_argument("--device", help="cpu | cuda (default: cuda if available; --smoke: cpu)")
    parser.add_argument("--case", choices=list(CASES), help="one case only (default: all)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[0],
                        help="contexts per forward pass, one row each; 0 = saelab's rule (default)")
    parser.add_argument("--contexts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # child process: one measurement, printed as JSON on the last line
        print(json.dumps(run_case(args.case, args.contexts, args.device, args.batch_size[0] or None)))
        return
    import torch

    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    cuda = device.startswith("cuda")
    if args.smoke:
        runs = [(SMOKE[0], SMOKE[1], b) for b in args.batch_size]
    else:
        cases = [args.case] if args.case else list(CASES)
        runs = [(name, n // 4 if args.quick else n, b) for name in cases
                for n in CASES[name][3 if cuda else 2] for b in args.batch_size]
    name = torch.cuda.get_device_name(torch.device(device)) if cuda else f"{os.cpu_count()}-core CPU"
    print(f"capture on {device} ({name}), torch {torch.__version__}. RSS in MiB: before = model built, before "
          "capture; capture = peak while capturing (sampled); process = ru_maxrss, model building included; "
          "peak GPU = torch.cuda.max_memory_allocated during the timed capture")
    print(" ".join(f"{HEADERS.get(c, c):>{w}}" for c, w in COLUMNS))
    for case, contexts, batch in runs:
        with tempfile.TemporaryDirectory() as root:
            command = [sys.executable, __file__, "--worker", "--case", case, "--contexts", str(contexts),
                       "--device", device, "--batch-size", str(batch)]
            child = subprocess.run(command, env={**os.environ, "SAELAB_ROOT": root}, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{case} ({contexts} contexts) failed:\n{child.stderr[-3000:]}")
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(" ".join(f"{row[c]:>{w}}" for c, w in COLUMNS), flush=True)


if __name__ == "__main__":
    main()
