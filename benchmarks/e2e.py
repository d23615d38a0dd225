"""The seed article end to end on one machine: notebooks 01-04's work in the gpt2 profile from a local
GPT-2-shaped model folder and a local text file (no hub), each stage timed.

    python benchmarks/e2e.py --device cuda                 # a random-weight GPT-2-small-shape folder, synthetic texts
    python benchmarks/e2e.py --device cuda --model /data/gpt2 --text /data/owt.txt --notebooks
                                                           # real GPT-2 (save_pretrained): the notebooks themselves
    python benchmarks/e2e.py --smoke                       # seconds on the CPU: the script still works

Prepared first, not timed ("with the data prepared"): without --model, a GPT-2-small-shape folder with random
weights (12 layers, d_model 768, vocab 50257) and a byte-level BPE trained on the texts (GPT-2's own tokenizer
needs the hub); without --text, seeded synthetic documents (Zipf-distributed pseudo-words, 150-300 each).
Timed, the calls notebooks 01-04 make, with the gpt2 profile's settings (20,000 + 5,000 texts of 128 tokens,
tied SAE 768 -> 6144, 100 epochs, batch 512):
  01  tokens.build_tokens                     02  load_lm, capture of the train and mae splits
  03  train_profile, held-out FVU/L0          04  analysis.max_activating over the mae store, top features
Figures, the LM's quality checks and notebook 04's random-weight twin are not in these stages; with
--notebooks (for a folder holding real GPT-2 weights: a random-weight model fails notebook 02's quality
checks, by design) the notebooks themselves run through saelab.workbook, each timed. Everything is written
under --out (SAELAB_ROOT). Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_data", "02_activations", "03_train", "04_mae_analysis")
SMOKE = dict(hook="blocks.1.hook_resid_pre", d_in=16, n_texts=48, mae_texts=16, context_size=16, epochs=1,
             batch_size=64, capture_batch_size=8, shard_rows=256, mae_top_features=5, ce_eval_contexts=4)


def synthetic_texts(path: Path, n_docs: int, seed: int = 0) -> Path:
    """n_docs lines of pseudo-words with Zipf frequencies: text a BPE and an LM process like prose."""
    generator = torch.Generator().manual_seed(seed)
    letters = "etaoinshrdlucmfwypvbgkqjxz"
    words = ["".join(letters[i] for i in torch.randint(0, 26, (int(n),), generator=generator).tolist())
             for n in torch.randint(1, 9, (5000,), generator=generator)]
    zipf = 1 / torch.arange(1, len(words) + 1, dtype=torch.float64)
    with path.open("w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(150, 300, (), generator=generator))
            f.write(" ".join(words[i] for i in torch.multinomial(zipf, n, True, generator=generator).tolist()) + "\n")
    return path


def random_gpt2_folder(path: Path, text: Path, smoke: bool) -> Path:
    """A GPT-2-small-shape model with seeded random weights and a BPE trained on `text`, saved locally."""
    from itertools import islice

    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from saelab.config import EOT
    from saelab.data.tokens import train_bpe

    with text.open() as f:
        documents = list(islice(f, 2000))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(documents, 512 if smoke else 8192),
                                        bos_token=EOT, eos_token=EOT)
    shape = dict(n_embd=16, n_layer=2, n_head=2, n_positions=16) if smoke else dict(n_embd=768, n_layer=12, n_head=12)
    torch.manual_seed(0)
    vocab = len(tokenizer) if smoke else max(len(tokenizer), 50257)  # GPT-2's embedding and unembedding size
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, **shape)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Clock:
    """Stage times, tokens/s and peak memory, printed as each stage ends."""

    def __init__(self, device: str):
        self.device, self.rows = device, []

    def stage(self, notebook: str, what: str, tokens: int, run):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = run()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None
        self.rows.append({"notebook": notebook, "stage": what, "seconds": seconds, "tokens": tokens,
                          "tokens_per_s": tokens / seconds if seconds > 0 and tokens else None, "peak_gpu_mib": peak})
        print(f"  {notebook} {what}: {seconds:.1f} s", flush=True)
        return result


def stages(profile, device: str, random_weights: bool) -> Clock:
    """The calls of notebooks 01-04 (see the module docstring), timed."""
    import saelab
    from saelab.data import tokens
    from saelab.features import analysis
    from saelab.metrics import evaluate_sae

    clock = Clock(device)
    texts = profile.n_texts + profile.mae_texts
    clock.stage("01", "tokenize and pack", texts * profile.context_size, lambda: tokens.build_tokens(profile))
    lm = clock.stage("02", "load the LM", 0, lambda: saelab.load_lm(profile, device, progress=False))
    stores = {}
    for split in ("train", "mae"):
        contexts = len(tokens.load_tokens(profile, split))
        stores[split] = clock.stage("02", f"capture {split}", contexts * profile.context_size,
                                    lambda s=split, model=lm: saelab.capture_activations(profile, s, device, lm=model,
                                                                                          progress=False))
    del lm  # notebook 03 trains without the LM on the GPU
    activations = stores["train"].activations()
    result = clock.stage("03", f"train {profile.epochs} epochs", profile.epochs * activations.shape[0],
                         lambda: saelab.train_profile(profile, activations, device=device, progress=False))
    held_out = stores["mae"].activations()
    quality = clock.stage("03", "held-out FVU, L0", held_out.shape[0],
                          lambda: evaluate_sae(result.sae, held_out.to(device)))
    note = " (a random-weight LM: says nothing about GPT-2)" if random_weights else ""
    print(f"  held-out FVU {quality['fvu']:.3f}, L0 {quality['l0']:.1f}{note}")
    sae = analysis.load_sae(profile, device)
    mae = clock.stage("04", "max-activating examples", stores["mae"].n_rows,
                      lambda: analysis.max_activating(sae, stores["mae"], profile.mae_top_k, device=device))
    clock.stage("04", "top features", 0,
                lambda: analysis.top_features(mae.stats, "total_activation", profile.mae_top_features))
    return clock


def notebooks(profile, out: Path) -> Clock:
    """Notebooks 01-04 themselves, through saelab.workbook, each timed."""
    from saelab.workbook import run_notebooks

    clock = Clock("cpu")  # the notebooks run in their own kernels: wall time only
    path = out / "profile.json"
    path.write_text(profile.to_json())
    os.environ["SAELAB_PROFILE"] = str(path)
    for name in NOTEBOOKS:
        clock.stage(name, "notebook", 0, lambda n=name: run_notebooks([ROOT / "notebooks" / f"{n}.ipynb"]))
    return clock


def main(args) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["SAELAB_ROOT"] = str(out)
    from saelab.config import load_profile

    prepared = time.perf_counter()
    text = Path(args.text) if args.text else synthetic_texts(out / "texts.txt", 80 if args.smoke else 26_000)
    model = Path(args.model) if args.model else random_gpt2_folder(out / "gpt2-shape", text, args.smoke)
    print(f"prepared in {time.perf_counter() - prepared:.0f} s: model {model}, texts {text}", flush=True)
    overrides = SMOKE if args.smoke else {}
    if args.epochs:
        overrides = overrides | {"epochs": args.epochs}
    profile = load_profile("gpt2", name="gpt2-e2e", model_name=str(model), dataset_id=str(text), **overrides)
    device = args.device
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}; "
          f"{profile.n_texts:,} + {profile.mae_texts:,} texts x {profile.context_size} tokens, SAE {profile.d_in} -> "
          f"{profile.d_sae}, {profile.epochs} epochs", flush=True)
    started = time.perf_counter()
    clock = notebooks(profile, out) if args.notebooks else stages(profile, device, random_weights=not args.model)
    total = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("\n| notebook | stage | seconds | tokens/s | peak GPU MiB |\n| --- | --- | ---: | ---: | ---: |")
    for r in clock.rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        peak = f"{r['peak_gpu_mib']:,.0f}" if r["peak_gpu_mib"] is not None else "-"
        print(f"| {r['notebook']} | {r['stage']} | {r['seconds']:.1f} | {tps} | {peak} |")
    what = "themselves" if args.notebooks else "stages"
    print(f"\nnotebooks 01-04 {what}: {total:.0f} s in all; peak RSS {rss:,.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": clock.rows, "total_s": total, "peak_rss_mib": rss}, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", help="a local GPT-2 folder (save_pretrained); default: random GPT-2-small shape")
    parser.add_argument("--text", help="a local text file, one document per line; default: synthetic")
    parser.add_argument("--epochs", type=int, help="SAE epochs (default: the profile's, 100)")
    parser.add_argument("--notebooks", action="store_true", help="run notebooks 01-04 themselves (real GPT-2 only)")
    parser.add_argument("--out", default="runs/e2e", help="SAELAB_ROOT for the run: tokens, stores, SAE")
    parser.add_argument("--json", help="also write the stage table to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model and corpus: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.device = "cpu"
    sys.exit(main(args))
