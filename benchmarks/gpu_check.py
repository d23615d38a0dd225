"""The GPU check: one command that measures every GPU figure saelab publishes, on the card it names.

    python benchmarks/gpu_check.py                  # on a CUDA machine, after `make setup`: ~5 minutes
    python benchmarks/gpu_check.py --out gpu_logs   # also keep every step's full log there
    python benchmarks/gpu_check.py --smoke          # CPU, seconds: checks the command itself (make test)

In order: (1) the test suite on this machine, CUDA cases included (`pytest tests`; `-m device` selects
the CPU-vs-CUDA comparisons alone); (2) training throughput at the seed's scale, 768 -> 6144, batch 512,
2.54M rows: saelab float32/TF32 and bfloat16, eager and with host-streamed data, the seed article's own
loop and SAELens, side by side (benchmarks/train.py); (3) max-activating examples over the seed's 635k
MAE tokens (benchmarks/mae.py); (4) capture throughput of a GPT-2-small-shape model (benchmarks/capture.py).
Each step runs in its own process with a time limit, so one failure does not hide the rest; the last
thing printed is one summary table. Exit status 0 only if every step passed.
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
    tail = "\n".join(text.strip().splitlines()[-40:])
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
    python, results = sys.executable, {}
    print(f"saelab GPU check on {name} (dense TF32 peak {peak or '?'} TFLOP/s)\n", flush=True)
    if args.smoke:
        results["tests"] = {"status": "skipped (smoke)", "seconds": 0.0, "tail": ""}
    else:
        # test_benchmarks runs this very command in smoke mode on the CPU: the steps below run it for real
        results["tests"] = run_step("tests", [python, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider",
                                              "--deselect", "tests/test_benchmarks.py"], args.test_timeout, out)
    train = [python, str(HERE / "train.py"), "--device", device, "--json", str(out / "train.json")]
    train += ["--smoke"] if args.smoke else ["--rows", str(SEED_ROWS), "--steps", "2000", "--peak-tflops", str(peak),
                                             "--trainers", "saelab,saelab-bf16,saelab-eager,saelab-host,seed,saelens"]
    results["train"] = run_step("train", train, 600, out)
    if not args.smoke:  # TopK at the seed's shape, k = 32: saelab's sparse step beside sparsify's Triton kernels
        results["train-topk"] = run_step("train-topk", [
            python, str(HERE / "train.py"), "--device", device, "--rows", str(SEED_ROWS), "--steps", "2000",
            "--trainers", "saelab-topk,saelab-topk-dense,saelab-batchtopk,sparsify", "--json",
            str(out / "train_topk.json")], 600, out)
    if not args.smoke:  # which kernel each GEMM of the step runs on (Hopper: sm90)
        results["kernels"] = run_step("kernels", [python, str(HERE / "train.py"), "--device", device,
                                                  "--profile-kernels"], 180, out)
    mae = [python, str(HERE / "mae.py"), "--device", device]
    mae += ["--smoke"] if args.smoke else ["--scale", "gpt2", "--tokens", str(SEED_MAE_TOKENS)]
    results["mae"] = run_step("mae", mae, 300, out)
    capture = [python, str(HERE / "capture.py"), "--device", device]  # saelab's CUDA batch next to the seed's 32
    capture += ["--smoke"] if args.smoke else ["--case", "gpt2-small-shape", "--batch-size", "32", "0"]
    results["capture"] = run_step("capture", capture, 300, out)
    if not args.smoke:  # last, as it may take long: torch.compile(mode="reduce-overhead") instead of saelab's graph
        results["compile"] = run_step("compile", [python, str(HERE / "train.py"), "--device", device, "--rows",
                                                  str(SEED_ROWS), "--steps", "500", "--trainers", "saelab-compile",
                                                  "--json", str(out / "compile.json")], args.compile_timeout, out)
    summary(results, out, name)
    return 0 if all(r["status"] in ("ok", "skipped (smoke)") for r in results.values()) else 1


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
    for step in ("tests", "kernels", "mae", "capture", "compile"):
        if step in results and results[step]["tail"]:
            keep = 32 if step == "kernels" else 8
            lines += ["", f"{step} (last lines):", "```", *results[step]["tail"].splitlines()[-keep:], "```"]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="folder for the logs")
    parser.add_argument("--test-timeout", type=int, default=240, help="seconds allowed for the test suite")
    parser.add_argument("--compile-timeout", type=int, default=240, help="seconds allowed for the compile step")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, no test suite: checks the command")
    sys.exit(main(parser.parse_args()))
