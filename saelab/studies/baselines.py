"""Directions to compare with SAE features (notebook 06), all read from the same training store.

Cunningham et al. 2023 (§3) score SAE features against four other ways to pick directions in the
residual stream; each "method" here turns activations x (rows, d_in) into one activation per token
per direction, (rows, n):

    residual basis   x_i - mean_i, each dimension and its negation        2·d_in directions
    random           (x - mean) · r, r a seeded random unit vector        interp_random_directions (0 = d_sae)
    PCA              (x - mean) · u, u an eigenvector of the covariance,  2·d_in directions
                     and its negation (the covariance is exact: one streamed pass, float64)
    ICA              scikit-learn FastICA's sources and their negations,   2·interp_ica_components
                     fitted on a seeded sample of interp_ica_fit_rows rows
    SAE              sae.encode(x), the features as trained (notebook 03) d_sae each

Why negations: a linear direction's sign is arbitrary (PCA, ICA) or means nothing special (a residual
dimension), while an SAE feature fires one way; with both signs, "high activation = concept present"
is fair to each. A random direction's negation is as random as it, so random directions stay one-signed.
Centring at the training mean changes no ranking (probing and top examples are ranks); it only makes
"activity", the total positive activation, comparable with an SAE feature's total activation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from saelab import paths
from saelab.features.analysis import check_matches
from saelab.sae import SAE
from saelab.store import ActivationStore


@dataclass
class LinearDirections:
    """(x - centre) @ weight, and its negation when both_signs: (rows, n) activations."""

    name: str
    weight: torch.Tensor  # (d_in, k) read-out directions, one per column
    centre: torch.Tensor  # (d_in,)
    both_signs: bool = True
    prefix: str = "dim"  # how a direction is labelled: "dim 3", "-dim 3"
    note: str = ""

    @property
    def n(self) -> int:
        return self.weight.shape[1] * (2 if self.both_signs else 1)

    def to(self, device) -> LinearDirections:
        self.weight, self.centre = self.weight.to(device), self.centre.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        a = (x - self.centre) @ self.weight  # (rows, k)
        return torch.cat([a, -a], dim=1) if self.both_signs else a

    def label(self, j: int) -> str:
        k = self.weight.shape[1]
        return f"-{self.prefix} {j - k}" if j >= k else f"{self.prefix} {j}"


@dataclass
class SAEDirections:
    """The features of a trained SAE: sae.encode(x), (rows, d_sae)."""

    name: str
    sae: SAE
    note: str = ""
    folder: Path | None = field(default=None, repr=False)

    n = property(lambda self: self.sae.d_sae)

    def to(self, device) -> SAEDirections:
        self.sae = self.sae.to(device).eval()
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def label(self, j: int) -> str:
        return f"f {j}"


@torch.no_grad()
def moments_and_sample(store: ActivationStore, n_sample: int, seed: int, device="cpu", chunk_rows: int = 4096):
    """One pass: mean (d_in,) and covariance (d_in, d_in) of every row (float64; float32 on MPS, which
    has none), and a seeded sample of n_sample rows (n_sample, d_in) float32 on the CPU, for ICA."""
    device = torch.device(device)
    acc = torch.float32 if device.type == "mps" else torch.float64
    picked = torch.zeros(store.n_rows, dtype=torch.bool)
    picked[torch.randperm(store.n_rows, generator=torch.Generator().manual_seed(seed))[:n_sample]] = True
    total, outer, shift, sample, first = None, None, None, [], 0
    for shard in store.iter_shards():
        for start in range(0, shard["activations"].shape[0], chunk_rows):
            x = shard["activations"][start:start + chunk_rows].to(torch.float32)  # (rows, d_in)
            sample.append(x[picked[first:first + len(x)]])
            first += len(x)
            x = x.to(device, acc)
            if shift is None:  # subtract a first guess of the mean: E[xx^T] - mm^T cancels less
                shift, total, outer = x.mean(0), x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])
            x = x - shift
            total += x.sum(0)
            outer += x.T @ x
    if shift is None:
        raise ValueError(f"the store at {store.directory} holds no rows; rerun notebook 02")
    mean = total / store.n_rows
    covariance = outer / store.n_rows - torch.outer(mean, mean)
    return (mean + shift).double().cpu(), covariance.double().cpu(), torch.cat(sample)


def random_directions(d_in: int, n: int, seed: int, mean: torch.Tensor) -> LinearDirections:
    weight = torch.randn(d_in, n, generator=torch.Generator().manual_seed(seed))
    return LinearDirections("random", weight / weight.norm(dim=0), mean.float(), both_signs=False, prefix="rand",
                            note=f"{n} seeded random unit directions")


def pca_directions(mean: torch.Tensor, covariance: torch.Tensor) -> LinearDirections:
    variance, vectors = torch.linalg.eigh(covariance)  # ascending
    order = variance.argsort(descending=True)
    explained = variance[order[:10]].sum() / variance.sum()
    return LinearDirections("PCA", vectors[:, order].float(), mean.float(), prefix="PC",
                            note=f"all {len(order)} components; the first 10 explain {explained:.0%} of the variance")


def ica_directions(sample: torch.Tensor, n_components: int, max_iter: int, seed: int) -> LinearDirections:
    """scikit-learn FastICA on the sample; its sources are (x - mean_) @ components_.T. BLAS gets as
    many threads as torch has (`config.apply_threads`): on a shared 2-core CPU, two threads made the
    offline fit ~15x slower than one."""
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    ica = FastICA(n_components=n_components, whiten="unit-variance", whiten_solver="eigh", max_iter=max_iter,
                  random_state=seed)
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(torch.get_num_threads()):
        warnings.simplefilter("always", ConvergenceWarning)  # reported in the note instead of a warning
        ica.fit(sample.numpy())
    unconverged = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    for other in (w for w in caught if not issubclass(w.category, ConvergenceWarning)):
        warnings.warn(other.message, other.category, stacklevel=2)
    converged = "NOT converged (raise interp_ica_max_iter)" if unconverged else "converged"
    return LinearDirections("ICA", torch.from_numpy(ica.components_.T.copy()).float(),
                            torch.from_numpy(ica.mean_).float(), prefix="IC",
                            note=f"FastICA, {n_components} components on {len(sample):,} sampled rows, "
                                 f"{ica.n_iter_} iterations, {converged}")


def fit_baselines(profile, store: ActivationStore, device="cpu") -> list[LinearDirections]:
    """Residual basis, random, PCA and ICA directions of the training store (one streamed pass)."""
    mean, covariance, sample = moments_and_sample(store, profile.interp_ica_fit_rows, profile.seed, device,
                                                  profile.interp_chunk_rows)
    d_in = store.d_in
    residual = LinearDirections("residual basis", torch.eye(d_in), mean.float(), note=f"{d_in} dimensions, ± each")
    n_random = profile.interp_random_directions or profile.d_sae
    n_ica = min(profile.interp_ica_components or d_in, d_in, len(sample))
    return [residual, random_directions(d_in, n_random, profile.seed, mean), pca_directions(mean, covariance),
            ica_directions(sample, n_ica, profile.interp_ica_max_iter, profile.seed)]


def trained_saes(profile, store: ActivationStore, device="cpu", *,
                 allow_stale: bool = False) -> tuple[list[SAEDirections], dict[str, str]]:
    """Notebook 03's SAE (folder "sae", first) and every other run folder under the same parent (the
    architecture comparison: "standard", "topk", ...), each checked against the store (one trained on a
    store of other settings is refused, naming each; allow_stale=True warns instead). Returns the SAEs
    and {folder: why it was not loaded} for folders without a finished SAE."""
    main = paths.sae_dir(profile)
    folders = [main] + sorted(p for p in main.parent.glob("*") if p.is_dir() and p != main)
    found, skipped = [], {}
    for folder in folders:
        try:
            sae = SAE.load(folder, device=device)
        except (FileNotFoundError, ValueError) as err:
            if folder == main:
                raise FileNotFoundError(f"no SAE at {main} ({err}); run notebook 03 first") from err
            skipped[folder.name] = str(err).split(";")[0]
            continue
        check_matches(sae, store, f"the SAE at {folder}", allow_stale=allow_stale)
        name = f"SAE {sae.architecture}"
        if any(d.name == name for d in found):  # e.g. a second run of the profile's architecture
            name = f"{name} ({folder.name})"
        note = "notebook 03's SAE, analysed in notebook 04" if folder == main else "a notebook 03 comparison run"
        found.append(SAEDirections(name, sae, note, folder))
    return found, skipped
