"""Training throughput: saelab's `train_sae` vs SAELens' `SAETrainer`, side by side, same shapes.

    .venv/bin/python benchmarks/train.py                      # 768 -> 6144, batch 512, CPU
    .venv/bin/python benchmarks/train.py --device cuda --peak-tflops 494.7   # H100 SXM dense TF32

Both train on the same random activations (seeded), with the same thread count, from their
public entry points: saelab `train_sae` (tied SAE, the seed's recipe, one epoch of `--steps`
batches plus one validation batch) and SAELens `SAETrainer.fit` (StandardTrainingSAE, its
defaults, λ scaled to the same objective, fed by an iterator of tensors). Each measurement runs
in a fresh subprocess after a warm-up call, so peak RSS is per trainer; 100 steps per call
amortise each call's setup (split, validation pass) as a real run of thousands of steps does; rounds alternate the two
trainers, and medians are reported, because the CPU may be shared with other work: the ratio within
each round (two runs back to back) is the least sensitive to load that changes over minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def activations(rows: int, d_in: int) -> torch.Tensor:
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(0))


def time_saelab(args) -> float:
    from saelab.sae import SAE
    from saelab.train import train_sae

    def run(steps: int) -> float:
        data = activations((steps + 1) * args.batch, args.d_in).to(args.device)  # one batch held out
        sae = SAE(args.d_in, args.d_sae, tied=True).to(args.device)
        _sync(args.device)
        start = time.perf_counter()
        train_sae(sae, data, epochs=1, batch_size=args.batch, val_fraction=1 / (steps + 1),
                  device=args.device, progress=False)
        _sync(args.device)
        return time.perf_counter() - start

    run(args.warmup)
    return run(args.steps)


def time_saelens(args) -> float:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def run(steps: int) -> float:
        data = activations(steps * args.batch, args.d_in).to(args.device)
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.d_sae, l1_coefficient=args.d_in * 1e-3, device=args.device))
        cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                               lr=1e-3, lr_end=1e-3, device=args.device, logger=LoggingConfig(log_to_wandb=False))
        trainer = SAETrainer(cfg, sae, iter(data.split(args.batch)))
        _sync(args.device)
        start = time.perf_counter()
        trainer.fit()
        _sync(args.device)
        return time.perf_counter() - start

    run(args.warmup)
    return run(args.steps)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    seconds = {"saelab": time_saelab, "saelens": time_saelens}[args.worker](args)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"tokens_per_s": args.steps * args.batch / seconds, "peak_rss_mib": peak_mib}))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(args) -> None:
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name()
    print(f"SAE {args.d_in}->{args.d_sae}, batch {args.batch}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, {args.rounds} rounds; torch {torch.__version__}, {args.threads} threads, {device}")
    results: dict[str, list[dict]] = {"saelab": [], "saelens": []}
    for round_ in range(args.rounds):
        order = ["saelab", "saelens"] if round_ % 2 == 0 else ["saelens", "saelab"]
        for name in order:
            cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} worker failed:\n{out.stderr[-3000:]}")
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1} {name:8s} {results[name][-1]['tokens_per_s']:10,.0f} tokens/s", flush=True)
    flops_per_token = 12 * args.d_in * args.d_sae  # the convention; saelab's tied step does 10x
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["tokens_per_s"] for r in runs)
        peak = max(r["peak_rss_mib"] for r in runs)
        mfu = (f", MFU {flops_per_token * medians[name] / (args.peak_tflops * 1e12):.1%}"
               if args.peak_tflops else "")
        print(f"{name:8s} median {medians[name]:10,.0f} tokens/s, peak RSS {peak:,.0f} MiB{mfu}")
    paired = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["saelab"], results["saelens"], strict=True)]
    print(f"ratio saelab / SAELens: {medians['saelab'] / medians['saelens']:.2f}x (ratio of medians); "
          f"per round (back-to-back pairs): {', '.join(f'{r:.2f}' for r in paired)}; "
          f"median {statistics.median(paired):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="card's dense TF32 peak, for MFU")
    parser.add_argument("--worker", choices=["saelab", "saelens"], help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny sizes, 1 round (make test runs it)")
    args = parser.parse_args()
    if args.smoke:
        args.d_in, args.d_sae, args.batch, args.steps, args.warmup, args.rounds = 16, 64, 32, 3, 1, 1
    worker(args) if args.worker else main(args)
