"""Capture throughput (tokens/s) and peak host memory (RSS) for two corpus sizes.

    .venv/bin/python benchmarks/capture.py            # both models, both sizes (a few minutes on 2 CPU cores)
    .venv/bin/python benchmarks/capture.py --quick    # smaller sizes

Models: the offline profile's random model (d_model 64, 8 layers), and a random-weight model of
GPT-2 small's exact shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257, n_ctx 1024,
gelu_new), so the cost of the real `gpt2` capture is known without the hub. Token ids are random
(BOS first): the cost of a forward pass does not depend on which tokens it sees.

Each case runs in its own process, because peak RSS (ru_maxrss) never goes down within one.
If memory is bounded by one shard plus one batch, the peak is the same for both sizes.
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

CASES = {  # name: (profile overrides, model n_ctx, contexts in the small and the large corpus)
    "offline-tiny": (dict(), 64, (512, 2048)),
    "gpt2-small-shape": (dict(d_in=768, context_size=128, capture_batch_size=32, store_dtype="float16",
                              offline_vocab_size=50257, offline_n_layers=12, offline_n_heads=12), 1024, (64, 256)),
}
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


def write_random_tokens(profile, contexts: int, bos: int) -> None:
    """A token dataset in saelab.data's layout, of random ids with BOS at position 0."""
    import datasets
    import torch

    from saelab import data, paths

    shape = (contexts, profile.context_size)
    ids = torch.randint(0, profile.offline_vocab_size, shape, generator=torch.Generator().manual_seed(0))
    ids[:, 0] = bos
    out = paths.tokens_dir(profile)
    datasets.Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(out / "train"))
    (out / data.INFO).write_text(json.dumps({"settings": data._settings(profile), "profile": profile.name,
                                             "splits": {}}))


def run_case(name: str, contexts: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saelab import capture, lm
    from saelab.config import OFFLINE, default_device

    overrides, n_ctx, _ = CASES[name]
    profile = OFFLINE.replace(name=f"bench-{name}", shard_rows=SHARD_ROWS, n_texts=contexts, **overrides)
    write_random_tokens(profile, contexts, bos=profile.offline_vocab_size - 1)
    config = GPT2Config(vocab_size=profile.offline_vocab_size, n_positions=n_ctx, n_embd=profile.d_in,
                        n_layer=profile.offline_n_layers, n_head=profile.offline_n_heads,
                        activation_function="gelu_new")
    device = default_device()
    model = lm.hooked_from_hf(GPT2LMHeadModel(config).eval()).to(device)  # the HF copy is freed here
    gc.collect()
    sampler = RssSampler()
    rss_before = sampler.peak
    sampler.start()
    started = time.perf_counter()
    store = capture.capture_activations(profile, "train", device, lm=model, progress=False)
    seconds = time.perf_counter() - started
    sampler.running = False
    return {"case": name, "device": device, "contexts": contexts, "tokens": contexts * profile.context_size,
            "tokens_per_s": round(contexts * profile.context_size / seconds), "seconds": round(seconds, 1),
            "shards": len(store.shard_paths()), "store_mib": round(store.size_bytes() / 2**20, 1),
            "rss_before_mib": round(rss_before), "rss_peak_capture_mib": round(sampler.peak),
            "rss_peak_process_mib": round(peak_rss_mib())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quarter-size corpora")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--contexts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one measurement, printed as JSON on the last line
        print(json.dumps(run_case(args.case, args.contexts)))
        return
    print("RSS in MiB: before = model built, before capture; capture = peak while capturing (sampled);"
          " process = ru_maxrss, model building included")
    print(f"{'case':18} {'device':6} {'contexts':>8} {'tokens':>8} {'tokens/s':>9} {'shards':>6} "
          f"{'store MiB':>9} {'RSS before':>10} {'RSS capture':>11} {'RSS process':>11}")
    for name, (_, _, sizes) in CASES.items():
        for contexts in sizes:
            contexts = contexts // 4 if args.quick else contexts
            with tempfile.TemporaryDirectory() as root:
                env = {**os.environ, "SAELAB_ROOT": root}
                child = subprocess.run([sys.executable, __file__, "--case", name, "--contexts", str(contexts)],
                                       env=env, capture_output=True, text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{r['case']:18} {r['device']:6} {r['contexts']:>8} {r['tokens']:>8} {r['tokens_per_s']:>9} "
                  f"{r['shards']:>6} {r['store_mib']:>9} {r['rss_before_mib']:>10} {r['rss_peak_capture_mib']:>11} "
                  f"{r['rss_peak_process_mib']:>11}",
                  flush=True)


if __name__ == "__main__":
    main()
