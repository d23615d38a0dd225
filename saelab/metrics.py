"""Evaluation metrics as small pure functions; each docstring is the formula.

Shapes: x, x_hat (tokens, d_in); h (tokens, d_sae). `ce_loss_recovered` takes the language model
as an argument (it never imports one), so this module stays in the core. Devices follow
saelab.devices: each function runs where the module it is given lives.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from saelab.devices import accumulator_dtype, device_of, module_on


class Sums(NamedTuple):
    """Sums over tokens from which every reconstruction metric here is derived (`from_sums`): the
    evaluation, the training loop's logs and the tests all start from these. Add two with `+`."""

    sse: torch.Tensor  # () sum over tokens of ||x - x_hat||^2
    x_sq: torch.Tensor  # () sum of ||x||^2
    x_sum: torch.Tensor  # (d_in,) sum of x
    l1: torch.Tensor  # () sum of ||h||_1
    fired: torch.Tensor  # (d_sae,) int64: tokens on which each latent is non-zero
    tokens: torch.Tensor  # () how many tokens

    def __add__(self, other: Sums) -> Sums:  # type: ignore[override]
        return Sums(*(a + b for a, b in zip(self, other, strict=True)))


def sums_of(x: torch.Tensor, h: torch.Tensor, sse: torch.Tensor, dtype: torch.dtype = torch.float64) -> Sums:
    """The `Sums` of one batch: x (tokens, d_in), h (tokens, d_sae) or a sparse step's kept values alone
    (nnz,) (then `fired` is a count, and from_sums has no per-latent density), sse = sum ||x - x_hat||^2 (the caller
    has it: from x_hat, or from a loss). Per-row sums in x's dtype, then `dtype` across rows (float64;
    `devices.accumulator_dtype` where a device has none): exact enough, and no float64 copy of h."""
    return Sums(sse.to(dtype), x.pow(2).sum(-1).to(dtype).sum(), x.to(dtype).sum(0), h.abs().sum(-1).to(dtype).sum(),
                torch.count_nonzero(h, dim=0), torch.tensor(x.shape[0], dtype=dtype, device=x.device))


def fvu(sse: float, variance: float) -> float:
    """Fraction of variance unexplained  sum||x - x_hat||^2 / sum||x - E[x]||^2  (NaN when x is constant).

    Numerator and denominator are each summed over all tokens, then divided (not a per-token ratio
    averaged afterwards, which over-weights low-norm tokens). 1 - fvu = explained variance.
    """
    return sse / variance if variance > 0 else float("nan")


def dead_fraction(density: torch.Tensor) -> torch.Tensor:
    """Share of latents that never fired on the evaluated tokens (density == 0)."""
    return (density == 0).float().mean()


DENSE = 0.1  # a latent firing on more than this share of tokens is dense: too common to be interpretable


def dense_fraction(density: torch.Tensor, threshold: float = DENSE) -> torch.Tensor:
    """Share of latents firing on more than `threshold` of tokens (too dense to be interpretable)."""
    return (density > threshold).float().mean()


def from_sums(sums: Sums) -> dict:
    """The metrics, from `Sums` over the evaluated tokens (n of them, d_in wide, d_sae latents):

        l0 = E ||h||_0 = sum(fired) / n          fraction_active = l0 / d_sae
        mse = sse / (n d_in)  (as loss.reconstruction_mse)       l1 = E ||h||_1  (as loss.l1_penalty)
        fvu = sse / (x_sq - ||x_sum||^2 / n)     normalised_mse = sse / x_sq  (the error against predicting 0)
        density = fired / n per latent           dead_fraction, dense_fraction (> DENSE) of latents

    Returns floats, and "density" (d_sae,) float64 on the CPU for the histogram (not for a sparse step's
    kept values, whose latents are not known: l0, mse, l1, fvu and normalised_mse only). One host sync.
    """
    sse, x_sq, l1, n = torch.stack([sums.sse, sums.x_sq, sums.l1, sums.tokens]).tolist()
    if n == 0:
        raise ValueError("no activation rows to evaluate")
    d_in = sums.x_sum.shape[0]
    variance = x_sq - sums.x_sum.double().pow(2).sum().item() / n  # sum ||x - mean||^2
    out = {"l0": sums.fired.sum().item() / n, "mse": sse / (n * d_in), "l1": l1 / n, "fvu": fvu(sse, variance),
           "normalised_mse": sse / x_sq if x_sq > 0 else float("nan")}
    if sums.fired.dim() == 0:  # h was a sparse step's kept values: how many fired, not which
        return out
    density = sums.fired.cpu().double() / n
    return out | {"fraction_active": out["l0"] / sums.fired.shape[0], "dead_fraction": dead_fraction(density).item(),
                  "dense_fraction": dense_fraction(density).item(), "density": density}


@torch.no_grad()
def evaluate_sae(sae, activations: torch.Tensor, batch_size: int = 4096, rows: torch.Tensor | None = None) -> dict:
    """`from_sums` over `rows` of `activations` (all rows when None), batch by batch (never all of h at
    once, never a copy of the rows), one host sync at the end. The training loop's validation metrics
    come from here too."""
    device = device_of(sae)  # runs where the SAE lives; the activations come to it batch by batch
    acc = accumulator_dtype(device)  # float64, float32 on MPS
    total = None
    batches = activations.split(batch_size) if rows is None else (
        activations.index_select(0, part) for part in rows.to(activations.device).split(batch_size))
    for batch in batches:
        x = batch.to(device, torch.float32)  # (batch, d_in)
        x_hat, h = sae(x)  # (batch, d_in), (batch, d_sae)
        sums = sums_of(x, h, (x - x_hat).pow(2).sum(-1).to(acc).sum(), acc)
        total = sums if total is None else total + sums
    if total is None:
        raise ValueError("no activation rows to evaluate")
    return from_sums(total)


@torch.no_grad()
def hook_mean(lm, tokens: torch.Tensor, hook: str, batch_size: int = 8,
              skip_first_position: bool = True) -> torch.Tensor:
    """(d_in,) mean of the activation at `hook` over the positions of `tokens` that an SAE replaces (all
    but position 0 when skip_first_position): the mean-ablation baseline of `ce_loss_recovered`."""
    device, layer, start = device_of(lm), int(hook.split(".")[1]), 1 if skip_first_position else 0
    total, count = None, 0
    for batch in tokens.split(batch_size):
        _, cache = lm.run_with_cache(batch.to(device), names_filter=[hook], stop_at_layer=layer + 1)
        act = cache[hook][:, start:].double()  # (batch, pos, d_in)
        total = act.sum((0, 1)) if total is None else total + act.sum((0, 1))
        count += act.shape[0] * act.shape[1]
    if not count:
        raise ValueError("tokens must hold at least one context with a position to ablate")
    return (total / count).float()


@torch.no_grad()
def ce_loss_recovered(lm, sae, tokens: torch.Tensor, hook: str, batch_size: int = 8,
                      skip_first_position: bool = True, mean: torch.Tensor | None = None) -> dict[str, float]:
    """Splice the SAE's reconstruction into `lm` (a TransformerLens HookedTransformer) at `hook`:

        recovered      = (CE_zero - CE_sae) / (CE_zero - CE_clean)     zero-ablation floor (SAELens' metric)
        recovered_mean = (CE_mean - CE_sae) / (CE_mean - CE_clean)     mean-ablation floor
        delta_ce       = CE_sae - CE_clean                              nats per token the SAE costs

    CE is next-token cross-entropy averaged over all predicted tokens of `tokens` (contexts, pos);
    CE_zero replaces the activation by zeros, CE_mean by its mean over the same tokens (`mean`, (d_in,),
    else `hook_mean` of `tokens`). The zero floor can lie far above a unigram model's CE, which flatters
    the ratio; the mean floor keeps what the average residual carries (a harder, fairer baseline). Also
    KL(clean || spliced) per token, nats, for each: kl_sae is the SAE's damage to the clean predictions.
    With `skip_first_position`, position 0 (BOS) keeps its clean activation in every ablation,
    matching an SAE trained without position 0 (profile.exclude_first_position).
    Runs where `lm` lives: tokens go there, and so does a copy of the SAE if it lives elsewhere
    (the caller's SAE is not moved).
    """
    device = device_of(lm)
    sae = module_on(sae, device)
    start = 1 if skip_first_position else 0
    mean = (hook_mean(lm, tokens, hook, batch_size, skip_first_position) if mean is None else mean).to(device)
    replacements = {"sae": lambda v: sae(v.float()).x_hat.to(v.dtype), "zero": torch.zeros_like,
                    "mean": lambda v: mean.to(v.dtype).expand_as(v)}
    sums = {f"{kind}_{name}": 0.0 for kind in ("ce", "kl") for name in replacements} | {"ce_clean": 0.0}
    n_tokens = 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)

        def splice(act, hook, fn):  # act (batch, pos, d_in)
            act[:, start:] = fn(act[:, start:])
            return act

        clean = lm(batch).log_softmax(-1)  # (batch, pos, vocab)
        targets = batch[:, 1:, None]  # (batch, pos - 1, 1): next tokens
        sums["ce_clean"] += -clean[:, :-1].gather(-1, targets).sum().item()
        for name, fn in replacements.items():
            logp = lm.run_with_hooks(batch, fwd_hooks=[(hook, lambda a, hook, fn=fn: splice(a, hook, fn))]
                                     ).log_softmax(-1)
            sums[f"ce_{name}"] += -logp[:, :-1].gather(-1, targets).sum().item()
            sums[f"kl_{name}"] += (clean.exp() * (clean - logp)).sum(-1)[:, :-1].sum().item()
        n_tokens += targets.numel()
    if n_tokens == 0:
        raise ValueError("tokens must hold at least one context of 2 or more positions")
    out = {name: total / n_tokens for name, total in sums.items()}
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    out["ce_loss_recovered_mean"] = (out["ce_mean"] - out["ce_sae"]) / (out["ce_mean"] - out["ce_clean"])
    out["delta_ce"] = out["ce_sae"] - out["ce_clean"]
    return out


def evaluate(sae, data: torch.Tensor, coefficient: float = 0.0, batch_size: int = 4096,
             rows: torch.Tensor | None = None) -> dict[str, float]:
    """Validation metrics (`metrics.evaluate_sae` over `rows` of `data`) and the objective on them:
    loss = mse + coefficient · the architecture's penalty (l1 or l0; topk: mse, its AuxK needs the dead set)."""
    m = evaluate_sae(sae, data, batch_size, rows)
    penalty = {"l1_coefficient": m["l1"], "l0_coefficient": m["l0"]}.get(sae.sparsity_setting, 0.0)
    return {"mse": m["mse"], "l1": m["l1"], "l0": m["l0"], "loss": m["mse"] + coefficient * penalty,
            "fraction_active": m["fraction_active"], "fvu": m["fvu"]}


@torch.no_grad()
def total_variance(data: torch.Tensor, rows: torch.Tensor, chunk: int = 8_192) -> float:
    """sum over `rows` of data of ||x - mean||^2 (the denominator of `fvu`), in float64, chunk by chunk (no
    copy of the rows); two passes (mean, then deviations), so a large mean does not cancel the variance."""
    rows = rows.to(data.device)
    mean = sum(data.index_select(0, part).sum(0, dtype=torch.float64) for part in rows.split(chunk)) / rows.shape[0]
    return sum((data.index_select(0, part).double() - mean).pow(2).sum().item() for part in rows.split(chunk))


# nats: below this CE_zero - CE_clean, the ratio above divides by almost nothing (the same cut as
# comparison.describe_architectures uses; offline's random model zero-ablates to ~+0.01 nats)
ILL_CONDITIONED_GAP = 0.05


def describe_ce(ce: dict[str, float]) -> str:
    """One line to print next to the CE loss recovered number: which floor it uses, ΔCE in nats, the
    mean-ablation floor and KL beside it (when `ce` has them), and a caveat when the ratio misleads."""
    gap, recovered = ce["ce_zero"] - ce["ce_clean"], ce["ce_loss_recovered"]
    if gap < ILL_CONDITIONED_GAP:
        return (f"Caveat: zeroing the residual stream raises CE by only {gap:.3f} nats here, so CE loss recovered "
                f"({recovered:.0%}) divides by almost nothing and can leave 0-100%; read FVU and KL instead.")
    if not 0 <= recovered <= 1:
        side = "below the clean model's" if recovered > 1 else "above the zero-ablated model's"
        return (f"Caveat: CE loss recovered {recovered:.0%} is outside 0-100%: CE with the SAE spliced in "
                f"({ce['ce_sae']:.3f}) is {side}.")
    line = (f"CE loss recovered {recovered:.1%} against the zero-ablation floor: the SAE adds "
            f"ΔCE = {ce['ce_sae'] - ce['ce_clean']:.3f} nats of CE out of the {gap:.3f} that zeroing the residual "
            "stream costs")
    if "ce_mean" in ce and ce["ce_mean"] - ce["ce_clean"] >= ILL_CONDITIONED_GAP:
        line += (f"; against the mean-ablation floor (+{ce['ce_mean'] - ce['ce_clean']:.3f} nats) it recovers "
                 f"{ce['ce_loss_recovered_mean']:.1%}")
    if "kl_sae" in ce:
        line += f"; KL to the clean predictions {ce['kl_sae']:.4f} nats/token"
    return line + "."
