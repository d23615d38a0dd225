"""The GPU check: one command that measures every GPU figure saelab publishes, on the card it names.

    python benchmarks/gpu_check.py                  # on a CUDA machine, after `make setup`: at most 8 minutes
    python benchmarks/gpu_check.py --out gpu_logs   # also keep every step's full log there
    python benchmarks/gpu_check.py --smoke          # CPU, seconds: checks the command itself (make test)

In order, within one time budget (--budget, 480 s; a step gets at most what is left, and steps left with
under a minute are skipped and say so): (1) the CUDA tests (`pytest -m device`: CPU-vs-CUDA comparisons, the
captured step against the eager one, bfloat16, resume); (2) training throughput at the seed's scale, 768 -> 6144,
batch 512, 2.54M rows: saelab's step with the one-GEMM and the two-GEMM weight gradient, bfloat16 written out and
under autocast, the seed article's loop and SAELens, side by side (benchmarks/train.py); (3) the step's kernels
and which GEMMs run on Hopper kernels; (4) max-activating examples over the seed's 635k MAE tokens
(benchmarks/mae.py); (5) capture throughput of a GPT-2-small-shape model with the background shard writer
(benchmarks/capture.py), then reading a store with and without its checksums (benchmarks/store_read.py);
(6) the seed article end to end, notebooks 01-04's work in the gpt2 profile from a
local GPT-2-shape folder and text file (benchmarks/e2e.py); (7) TopK/BatchTopK, sparse and dense step, beside
EleutherAI sparsify, with the time left (raise --budget to be sure of it); (8, --compile) torch.compile in place
of saelab's graph; (9, --notebooks) the six notebooks on CUDA under nbmake, offline profile.
Each step runs in its own process, so one failure does not hide the rest; the last thing printed is one
summary table. Exit status 0 only if every step that ran passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED_ROWS = 2_540_000  # the seed's 20,000 texts x 127 stored positions
SEED_MAE_TOKENS = 635_000  # 5,000 MAE texts x 127
TF32_PEAK = {"H100": 494.7, "H200": 494.7, "A100": 156.0, "L4": 60.0, "4090": 82.6}  # dense TF32 TFLOP/s


def run_step(name: str, cmd: list[str], timeout_s: int, out: Path) -> dict:
    """Run one step; its output goes to out/<name>.log; returns status, seconds and the output's tail."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), "PYTHONUNBUFFERED": "1"}
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        text, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
    except subprocess.TimeoutExpired as err:
        text, status = (err.stdout or b"").decode() + (err.stderr or b"").decode(), f"timed out ({timeout_s} s)"
    (out / f"{name}.log").write_text(text)
    seconds = time.perf_counter() - started
    tail = "\n".join(text.strip().splitlines()[-70:])
    print(f"{tail}\n-- {name}: {status} in {seconds:.0f} s\n", flush=True)
    return {"status": status, "seconds": seconds, "tail": tail}


def card() -> tuple[str, float]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return name, next((peak for key, peak in TF32_PEAK.items() if key in name), 0.0)


def main(args) -> int:
    out = Path(args.out).resolve()  # the steps run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    name, peak = card()
    if device == "cuda" and name == "CPU":
        sys.exit("no CUDA device here: the GPU check measures a GPU (use --smoke to check the command on CPU)")
    python, results, deadline = sys.executable, {}, time.perf_counter() + args.budget
    print(f"saelab GPU check on {name} (dense TF32 peak {peak or '?'} TFLOP/s), budget {args.budget} s\n", flush=True)

    def step(key: str, cmd: list[str], cap_s: int) -> None:
        left = int(deadline - time.perf_counter())
        if left < 60 and not args.smoke:
            results[key] = {"status": f"skipped (budget: {max(left, 0)} s left)", "seconds": 0.0, "tail": ""}
            return
        results[key] = run_step(key, cmd, 600 if args.smoke else min(cap_s, left), out)  # smoke: a loaded CPU

    if args.smoke:
        results["tests"] = {"status": "skipped (smoke)", "seconds": 0.0, "tail": ""}
    else:  # test_benchmarks runs this very command in smoke mode on the CPU: the steps below run it for real
        step("tests", [python, "-m", "pytest", "tests", "-q", "-m", "device", "-p", "no:cacheprovider"], 110)
    train = [python, str(HERE / "train.py"), "--device", device, "--json", str(out / "train.json")]
    train += ["--smoke"] if args.smoke else [
        "--rows", str(SEED_ROWS), "--steps", "600", "--peak-tflops", str(peak),
        "--trainers", "saelab,saelab-two-gemms,saelab-bf16,saelab-bf16-autocast,seed,saelens"]
    step("train", train, 150)
    if not args.smoke:  # which kernel each GEMM of the step runs on (Hopper: sm90), and kernels per step
        step("kernels", [python, str(HERE / "train.py"), "--device", device, "--profile-kernels"], 60)
    mae = [python, str(HERE / "mae.py"), "--device", device]
    mae += ["--smoke"] if args.smoke else ["--scale", "gpt2", "--tokens", str(SEED_MAE_TOKENS)]
    step("mae", mae, 60)
    capture = [python, str(HERE / "capture.py"), "--device", device]  # saelab's CUDA batch (the seed's 32: earlier)
    capture += ["--smoke"] if args.smoke else ["--case", "gpt2-small-shape", "--batch-size", "0"]
    step("capture", capture, 90)
    step("store_read", [python, str(HERE / "store_read.py")] + (["--smoke"] if args.smoke else []), 60)
    # last: it takes what is left (about 3 minutes at the target speed); stage times print as each ends
    e2e = [python, str(HERE / "e2e.py"), "--device", device, "--json", str(out / "e2e.json"),
           "--out", str(out / "e2e" if args.smoke else ROOT / "runs" / "e2e")]  # ~5 GB of stores: not in the logs
    step("e2e", e2e + (["--smoke"] if args.smoke else []), 300)
    if not args.smoke:  # TopK at the seed's shape, k = 32: saelab's sparse step beside sparsify's Triton kernels
        step("train-topk", [python, str(HERE / "train.py"), "--device", device, "--rows", str(SEED_ROWS), "--steps",
                            "600", "--trainers", "saelab-topk,saelab-topk-dense,saelab-batchtopk,sparsify", "--json",
                            str(out / "train_topk.json")], 150)
    if args.notebooks and not args.smoke:  # beyond the budget: the six notebooks on CUDA, offline profile, nbmake
        notebooks = sorted(str(p) for p in (ROOT / "notebooks").glob("0*.ipynb"))
        env = ["env", "SAELAB_PROFILE=offline", f"SAELAB_ROOT={ROOT / 'runs' / 'gpu_notebooks'}"]
        results["notebooks"] = run_step("notebooks", [*env, python, "-m", "pytest", "-q", "--nbmake", *notebooks],
                                        900, out)
    if args.compile and not args.smoke:  # torch.compile(mode="reduce-overhead") instead of saelab's graph
        step("compile", [python, str(HERE / "train.py"), "--device", device, "--rows", str(SEED_ROWS), "--steps",
                         "500", "--trainers", "saelab-compile", "--json", str(out / "compile.json")], 240)
    summary(results, out, name)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in results.values()) else 1


def summary(results: dict, out: Path, name: str) -> None:
    lines = [f"## saelab GPU check: {name}", "", "| step | status | seconds |", "| --- | --- | ---: |"]
    lines += [f"| {step} | {r['status']} | {r['seconds']:.0f} |" for step, r in results.items()]
    if (out / "train.json").is_file():
        table = json.loads((out / "train.json").read_text())["table"]
        lines += ["", "| trainer | tokens/s | seed's 100 epochs | MFU (TF32 peak) | peak GPU MiB |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for trainer, r in table.items():
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"| {trainer} | {r['tokens_per_s']:,.0f} | {r['epochs_100_s']:,.0f} s | {mfu} | "
                         f"{r['peak_mib']:,.0f} |")
        if "saelab" in table and "saelens" in table:
            ratio = table["saelab"]["tokens_per_s"] / table["saelens"]["tokens_per_s"]
            lines.append(f"\nsaelab / SAELens on the same card: {ratio:.1f}x")
    if (out / "e2e.json").is_file():
        e2e = json.loads((out / "e2e.json").read_text())
        lines += ["", "| notebook | stage (gpt2 profile, local GPT-2-shape folder) | seconds | tokens/s |",
                  "| --- | --- | ---: | ---: |"]
        lines += [f"| {r['notebook']} | {r['stage']} | {r['seconds']:.1f} | "
                  f"{'-' if not r['tokens_per_s'] else format(r['tokens_per_s'], ',.0f')} |" for r in e2e["rows"]]
        lines.append(f"\nnotebooks 01-04 end to end: {e2e['total_s']:.0f} s")
    for step in ("tests", "kernels", "mae", "capture", "store_read", "compile"):
        if step in results and results[step]["tail"]:
            keep = 60 if step == "kernels" else 8
            lines += ["", f"{step} (last lines):", "```", *results[step]["tail"].splitlines()[-keep:], "```"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="folder for the logs")
    parser.add_argument("--budget", type=int, default=480, help="seconds for all steps together (default 8 minutes)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in place of the graph (last)")
    parser.add_argument("--notebooks", action="store_true", help="also run the six notebooks on CUDA under nbmake "
                        "(offline profile; beyond the budget, ~5 minutes)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, no test suite: checks the command")
    sys.exit(main(parser.parse_args()))
