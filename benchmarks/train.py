"""Training throughput side by side: saelab, the seed article's plain loop, SAELens and sparsify, same data and shapes.

    .venv/bin/python benchmarks/train.py                          # CPU: 768 -> 6144, batch 512, 5 rounds
    python benchmarks/train.py --device cuda --rows 2540000       # a GPU, on the seed's 2.54M rows
    python benchmarks/train.py --smoke                            # seconds: checks the script runs (make test)
    python benchmarks/train.py --trainers saelab-topk,sparsify,saelab --rounds 3   # TopK beside sparsify
    python benchmarks/train.py --trainers saelab-topk --d-sae 98304 --steps 4      # a wide dictionary
    python benchmarks/train.py --interleaved --trainers saelab-topk,sparsify,saelab --steps 3 --rounds 10

Trainers (each measured in a fresh process, so each peak memory is its own):
  saelab        `train_sae` on the seed's tied SAE, float32 (TF32 matmuls on CUDA), its step a CUDA graph on CUDA;
                the weight gradient is one GEMM (TiedSAE.weight_gradient = "one_gemm")
  saelab-two-gemms  the same with the earlier weight gradient, two GEMMs (x^T q, then g^T h accumulated)
  saelab-bf16   dtype="bfloat16", written out: float32 master weights and Adam, a bfloat16 copy of W each step,
                bfloat16 codes, float32-accumulated weight gradient
  saelab-bf16-autocast  the earlier bfloat16: two GEMMs' step under autocast (weights and Adam float32)
  saelab-eager  CUDA only: cuda_graph=False, to show what the graph buys
  saelab-host   CUDA only: the activations left in host memory, streamed through pinned chunks
  saelab-compile CUDA only: the eager step under torch.compile(mode="reduce-overhead") instead of saelab's graph
  seed          the seed article's loop: nn.Linear encoder, x_hat = F.linear(h, W.t(), b_dec), autograd,
                torch.optim.Adam, loss mse + 1e-3 E||h||_1, batches gathered on the device
  saelens       SAELens' SAETrainer.fit on a StandardTrainingSAE (its defaults, λ scaled to the same
                objective), fed the same data as an iterator of device tensors
  saelab-topk   `train_sae` on sae_for("topk", k=--k): its sparse step (decode and gradients through the kept
                entries only)
  saelab-topk-dense  the same SAE on its dense reference step (sparse_backward=False), what saelab did before
  saelab-batchtopk   `train_sae` on sae_for("batchtopk", k=--k), sparse step
  sparsify      EleutherAI sparsify's SparseCoder (k=--k, its fused encoder: top-k backward by index_add_, decode
                by embedding_bag, or its Triton kernels on CUDA) in the loop of its Trainer: fvu + AuxK
                (auxk_alpha 1/32, dead after 10M tokens), gradient along decoder rows removed, torch.optim.Adam,
                rows renormalised. Optional: `pip install eai-sparsify`; the table says when it is absent.
Every trainer runs with TF32 matmuls allowed on CUDA (the precision saelab trains in), after a warm-up.
tokens/s is steady state: each trainer runs `--steps` and `2 x --steps` steps, and the difference of the
two times (per-run setup cancels) gives the time per step. The projected 100 epochs are 100 x the
training rows (90% of --rows) / tokens/s. MFU = 12 d_in d_sae tokens/s / --peak-tflops (the card's dense
TF32 peak; 12 d_in d_sae counts six d_in x d_sae products per token at 2 FLOPs, the step does five).
Rounds alternate the trainers' order; medians are printed, because a shared CPU drifts over minutes.
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

TRAINERS = ("saelab", "saelab-two-gemms", "saelab-bf16", "saelab-bf16-autocast", "saelab-eager", "saelab-host",
            "saelab-compile", "seed", "saelens", "saelab-topk", "saelab-topk-dense", "saelab-batchtopk", "sparsify")
TWO_GEMMS = ("saelab-two-gemms", "saelab-bf16-autocast")  # the earlier tied step, kept to compare
K_SPARSE = ("saelab-topk", "saelab-topk-dense", "saelab-batchtopk", "sparsify")  # trained at k = --k
CUDA_ONLY = ("saelab-eager", "saelab-host", "saelab-compile")


@torch.no_grad()
def activations(args) -> torch.Tensor:
    """Seeded activations with known sparse structure (so FVU and L0 mean something): each row sums ~16 of
    4,096 random unit directions with U[0, 1] weights, plus a little noise, scaled by 25 to GPT-2's residual
    norm at layer 6 (~65; the seed's λ = 1e-3 is meant for that scale). Made on args.device in chunks;
    moved to host memory for saelab-host."""
    generator = torch.Generator(device=args.device).manual_seed(0)
    features = torch.randn(4096, args.d_in, generator=generator, device=args.device)
    features /= features.norm(dim=1, keepdim=True)
    out = torch.empty(args.rows, args.d_in, device=args.device)
    for first in range(0, args.rows, 8_192):
        rows = min(8_192, args.rows - first)
        codes = torch.rand(rows, 4096, generator=generator, device=args.device)
        codes *= torch.rand(rows, 4096, generator=generator, device=args.device) < 16 / 4096
        noise = 0.05 * torch.randn(rows, args.d_in, generator=generator, device=args.device)
        out[first:first + rows] = 25 * (codes @ features + noise)
    return out.cpu() if args.worker == "saelab-host" else out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run, steps: int, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    run(steps)
    sync(device)
    return time.perf_counter() - start


def saelab_runner(args, data: torch.Tensor):
    from saelab.sae import SAE, sae_for
    from saelab.train import batching
    from saelab.train.loop import train_sae

    if args.worker == "saelab-host":  # as if the data were larger than the GPU: it stays in host memory
        batching.fits_on_device = lambda *a, **k: False
    options = {"dtype": "bfloat16"} if args.worker.startswith("saelab-bf16") else {}
    if args.worker in ("saelab-eager", "saelab-compile"):
        options["cuda_graph"] = False
    if args.worker == "saelab-compile":
        from saelab.train import step

        plain_init = step.Stepper.__init__

        def compiled_init(self, *a, **k):
            plain_init(self, *a, **k)
            self.body = torch.compile(self.body, mode="reduce-overhead")
        step.Stepper.__init__ = compiled_init

    def run(steps: int) -> None:
        if args.worker in K_SPARSE:
            architecture = args.worker.removeprefix("saelab-").removesuffix("-dense")
            run.sae = sae_for(architecture, args.d_in, args.d_sae, k=args.k).to(args.device)
            run.sae.sparse_backward = not args.worker.endswith("-dense")
        else:
            run.sae = SAE(args.d_in, args.d_sae).to(args.device)
            run.sae.weight_gradient = "two_gemms" if args.worker in TWO_GEMMS else "one_gemm"
        train_sae(run.sae, data[:-args.held_out], device=args.device, epochs=1, batch_size=args.batch, max_steps=steps,
                  progress=False, **options)
    return run


def seed_runner(args, data: torch.Tensor):
    """The seed article's SimpleSAE and loop, as written there (batches drawn on the device)."""
    import torch.nn.functional as F
    from torch import nn

    encoder = nn.Linear(args.d_in, args.d_sae).to(args.device)
    decoder_bias = nn.Parameter(torch.zeros(args.d_in, device=args.device))
    optimizer = torch.optim.Adam([*encoder.parameters(), decoder_bias], lr=1e-3)

    def run(steps: int) -> None:
        order = torch.randperm(data.shape[0], device=data.device)
        for i in range(steps):
            x = data[order[i * args.batch:(i + 1) * args.batch]]
            h = F.relu(encoder(x))
            x_recon = F.linear(h, encoder.weight.t(), decoder_bias)
            loss = F.mse_loss(x_recon, x) + 1e-3 * h.abs().sum(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return run


def saelens_runner(args, data: torch.Tensor):
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def run(steps: int) -> None:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=args.d_in, d_sae=args.d_sae, l1_coefficient=args.d_in * 1e-3, device=args.device))
        cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                               lr=1e-3, lr_end=1e-3, device=args.device, logger=LoggingConfig(log_to_wandb=False))
        SAETrainer(cfg, sae, iter(data[:steps * args.batch].split(args.batch))).fit()
    return run


def sparsify_runner(args, data: torch.Tensor):
    """sparsify's SparseCoder trained as its Trainer's step does (sparsify/trainer.py, 1.3): forward with the
    dead mask, fvu + auxk_alpha * AuxK, backward, gradient along decoder rows removed, Adam, rows renormalised,
    tokens since each latent fired. Its default lr for this width."""
    def run(steps: int) -> None:
        step = sparsify_step(args)
        for i in range(steps):
            step(data[i * args.batch:(i + 1) * args.batch])
        run.sae = step.sae
    return run


def sparsify_step(args):
    """One step of sparsify's Trainer on a batch x, as a function (see sparsify_runner)."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as err:
        sys.exit(f"sparsify is not installed ({err}); pip install eai-sparsify (an optional benchmark dependency)")
    sae = SparseCoder(args.d_in, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device=args.device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (args.d_sae / 2**14) ** 0.5)
    since_fired = torch.zeros(args.d_sae, dtype=torch.long, device=args.device)

    def step(x: torch.Tensor) -> None:
        out = sae(x, dead_mask=since_fired > 10_000_000)
        (out.fvu + out.auxk_loss / 32).backward()
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
    step.sae = sae
    return step


def interleaved(args) -> None:
    """The steps alone, in one process, taking turns: each round runs --steps steps of every trainer (order
    alternating), so a shared CPU's drift reaches all of them alike. saelab's is its Stepper (the step
    train_sae calls: gradients, constraint, Adam, statistics), sparsify's the step of sparsify_runner."""
    from saelab.sae import SAE, sae_for
    from saelab.train.step import RunningStats, Stepper, make_adam

    torch.set_num_threads(args.threads)
    device, x = torch.device(args.device), activations(args)[:args.batch]
    steps = {}
    for name in args.trainers.split(","):
        if name == "sparsify":
            steps[name] = sparsify_step(args)
            continue
        if name not in ("saelab",) + K_SPARSE:
            sys.exit(f"--interleaved compares saelab, {', '.join(K_SPARSE)}; not {name}")
        sae = (SAE(args.d_in, args.d_sae) if name == "saelab" else
               sae_for(name.removeprefix("saelab-").removesuffix("-dense"), args.d_in, args.d_sae, k=args.k))
        sae.sparse_backward = not name.endswith("-dense")
        stepper = Stepper(sae.to(device), make_adam(sae, 1e-3, device), RunningStats(args.d_sae, device, 10**9), device)
        stepper.set_lr(1e-3)
        stepper.set_sparsity(1e-3 if name == "saelab" else 0.0)
        steps[name] = lambda x, stepper=stepper: stepper(x, args.batch)
    times = {name: [] for name in steps}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in steps if round_ % 2 else list(steps)[::-1]:
            steps[name](x)
            sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[name](x)
            sync(args.device)
            if round_:
                times[name].append(args.batch * args.steps / (time.perf_counter() - start))
    print(f"interleaved steps, SAE {args.d_in}->{args.d_sae}, k={args.k}, batch {args.batch}, {args.rounds} rounds of "
          f"{args.steps} steps; torch {torch.__version__}, {machine(args.device)}")
    print("\n| trainer | tokens/s (median) | per round |\n| --- | ---: | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):,.0f} | {' · '.join(f'{v:,.0f}' for v in values)} |")
    first = next(iter(times))
    for name in list(times)[1:]:  # the ratio round by round: both ran within the same minute
        ratios = [a / b for a, b in zip(times[first], times[name], strict=True)]
        print(f"\n{first} / {name}: {statistics.median(ratios):.2f}x (median of per-round ratios; "
              f"{min(ratios):.2f}-{max(ratios):.2f})")


@torch.no_grad()
def sparsify_quality(sae, x: torch.Tensor) -> dict:
    """FVU and L0 as saelab.metrics defines them, on held-out rows."""
    top = sae.encode(x)
    x_hat = sae.decode(top.top_acts, top.top_indices)
    fvu = (x - x_hat).pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
    return {"fvu": fvu.item(), "l0": (top.top_acts > 0).sum(-1).float().mean().item()}


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    data = activations(args)
    make = {"seed": seed_runner, "saelens": saelens_runner, "sparsify": sparsify_runner}.get(args.worker, saelab_runner)
    run = make(args, data)
    run(args.warmup)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    short, long = timed(run, args.steps, args.device), timed(run, 2 * args.steps, args.device)
    per_step = max(long - short, 1e-9) / args.steps
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
    result = {"tokens_per_s": args.batch / per_step, "peak_mib": peak}
    if args.worker == "sparsify":
        result |= sparsify_quality(run.sae, data[-args.held_out:].to(args.device))
    elif hasattr(run, "sae"):  # the SAE of the longer run, on rows it never saw
        from saelab.metrics import evaluate_sae

        quality = evaluate_sae(run.sae, data[-args.held_out:].to(args.device))
        result |= {"fvu": quality["fvu"], "l0": quality["l0"]}
    print(json.dumps(result))


def profile_kernels(args) -> None:
    """The kernels of 20 saelab steps at these shapes, by GPU time, for the one-GEMM and two-GEMM weight
    gradients in float32/TF32 and the written-out bfloat16 step: every GEMM should run on a Hopper (sm90)
    kernel on an H100. Eager steps, so each kernel is listed; the kernels per step are what the graph replays."""
    from torch.profiler import ProfilerActivity, profile

    from saelab.sae import SAE
    from saelab.train.step import RunningStats, Stepper, make_adam

    torch.backends.cuda.matmul.allow_tf32 = True
    device, x = torch.device(args.device), torch.randn(args.batch, args.d_in, device=args.device)
    for gradient, dtype in (("one_gemm", torch.float32), ("two_gemms", torch.float32), ("one_gemm", torch.bfloat16)):
        sae = SAE(args.d_in, args.d_sae).to(device)
        sae.weight_gradient = gradient
        stepper = Stepper(sae, make_adam(sae, 1e-3, device), RunningStats(args.d_sae, device, 10**9), device, dtype)
        stepper.set_lr(1e-3)
        stepper.set_sparsity(1e-3)
        for _ in range(5):
            stepper(x, args.batch)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                stepper(x, args.batch)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
        kernels = sum(e.count for e in events if e.device_time_total > 0) / 20
        busy = sum(e.device_time_total for e in events) / 20
        print(f"\n{gradient}, {dtype}: {kernels:.0f} kernels and {busy:.0f} us of GPU time per step; "
              "by GPU time over 20 steps (ms total, calls, name)")
        for e in events[:16]:
            gemm = any(word in e.key.lower() for word in ("gemm", "matmul", "sm80", "sm90", "cutlass"))
            mark = (" <- GEMM, sm90" if "sm90" in e.key else " <- GEMM, NOT sm90") if gemm else ""
            print(f"{e.device_time_total / 1e3:8.2f} {e.count:5d}  {e.key[:110]}{mark}")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(args) -> dict:
    trainers = [t for t in args.trainers.split(",") if args.device.startswith("cuda") or t not in CUDA_ONLY]
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        sys.exit(f"unknown trainer(s) {sorted(unknown)}; choose from {TRAINERS}")
    sparse = ", ".join(t for t in trainers if t in K_SPARSE) or "none"
    print(f"SAE {args.d_in}->{args.d_sae} (k={args.k} for {sparse}), "
          f"batch {args.batch}, {args.rows:,} rows; {args.steps} and {2 * args.steps} "
          f"timed steps after {args.warmup} warm-up, {args.rounds} round(s); torch {torch.__version__}, "
          f"{machine(args.device)}", flush=True)
    runs: dict[str, list[dict]] = {t: [] for t in trainers}
    failed: dict[str, str] = {}
    for round_ in range(args.rounds):
        for name in trainers if round_ % 2 == 0 else trainers[::-1]:
            if name in failed:
                continue
            cmd = [sys.executable, __file__, "--worker", name, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0 and name == "sparsify" and "not installed" in out.stderr:
                failed[name] = "absent: pip install eai-sparsify to compare"
                print("  sparsify is not installed: its row is skipped (pip install eai-sparsify)", flush=True)
                continue
            if out.returncode != 0:  # reported in the table; the other trainers still run
                failed[name] = (out.stderr.strip().splitlines() or ["no output"])[-1][:150]
                print(f"  round {round_ + 1} {name:20s} FAILED:\n{out.stderr[-2000:]}", flush=True)
                continue
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1} {name:20s} {runs[name][-1]['tokens_per_s']:12,.0f} tokens/s", flush=True)
    train_rows = round(args.rows * 0.9)
    memory = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"\n| trainer | tokens/s | 100 epochs of {train_rows:,} rows | MFU | {memory} | FVU | L0 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    table = {}
    for name, results in runs.items():
        if not results:
            print(f"| {name} | failed: {failed[name]} | | | | | |")
            continue
        tps = statistics.median(r["tokens_per_s"] for r in results)
        mfu = 12 * args.d_in * args.d_sae * tps / (args.peak_tflops * 1e12) if args.peak_tflops else None
        table[name] = {"tokens_per_s": tps, "epochs_100_s": 100 * train_rows / tps, "mfu": mfu,
                       "peak_mib": max(r["peak_mib"] for r in results), "fvu": results[-1].get("fvu"),
                       "l0": results[-1].get("l0")}
        row = table[name]
        quality = (f"{row['fvu']:.3f} | {row['l0']:.1f}" if row["fvu"] is not None else "- | -")
        print(f"| {name} | {tps:,.0f} | {row['epochs_100_s']:,.0f} s | {f'{mfu:.1%}' if mfu else '-'} | "
              f"{row['peak_mib']:,.0f} | {quality} |")
    for ours, theirs in (("saelab", "saelens"), ("saelab-topk", "sparsify"), ("saelab-topk", "saelab"),
                         ("saelab-topk", "saelab-topk-dense")):
        if ours in table and theirs in table:
            print(f"\n{ours} / {theirs}: {table[ours]['tokens_per_s'] / table[theirs]['tokens_per_s']:.2f}x "
                  "(ratio of medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(args.device), "args": vars(args), "table": table, "failed": failed},
                      f, indent=1)
    if set(failed) - {"sparsify"} or "absent" not in failed.get("sparsify", "absent"):
        sys.exit(f"failed: {sorted(failed)}")
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-sae", type=int, default=6144)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--k", type=int, default=32, help="latents per token of the k-sparse trainers")
    parser.add_argument("--rows", type=int, default=None, help="activation rows (default: 2x the steps' rows)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (and twice as many); "
                        "default 60 on CPU, 1000 on CUDA")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=None, help="default 5 on CPU, 1 on CUDA")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense TF32 peak, for MFU "
                        "(H100 SXM: 494.7)")
    parser.add_argument("--json", help="also write the results table to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks the script runs")
    parser.add_argument("--profile-kernels", action="store_true", help="CUDA: list the step's kernels instead")
    parser.add_argument("--interleaved", action="store_true", help="the steps alone, taking turns in one process "
                        "(--trainers among saelab, the k-sparse ones and sparsify; the first is the reference)")
    parser.add_argument("--worker", choices=TRAINERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if args.smoke:
        args.d_in, args.d_sae, args.batch, args.steps, args.rounds, args.warmup, args.k = 16, 64, 32, 4, 1, 1, 4
        if args.trainers == ",".join(TRAINERS):  # one row of each kind: each row is a process
            args.trainers = "saelab,seed,saelens,saelab-topk,sparsify"
    args.held_out = 256 if args.smoke else 16_384  # final rows, never trained on: FVU and L0 are measured there
    args.steps = args.steps or (1000 if cuda else 60)
    args.rounds = args.rounds or (1 if cuda else 5)
    args.rows = args.rows or (3 * args.steps + args.warmup + 2) * args.batch * 10 // 9 + args.held_out
    if args.profile_kernels:
        profile_kernels(args)
    elif args.interleaved:
        interleaved(args)
    else:
        worker(args) if args.worker else main(args)
