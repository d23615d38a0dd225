"""Directions to compare with SAE features (notebook 06), all read from the same training store.

Cunningham et al. 2023 (§3) score SAE features against four other ways to pick directions in the
residual stream; each "method" here turns activations x (rows, d_in) into one activation per token
per direction, (rows, n):

    residual basis   x_i - mean_i, each dimension                        d_in directions
    random           (x - mean) · r, r a seeded random unit vector        interp_random_directions (0 = d_sae)
    PCA              (x - mean) · u, u an eigenvector of the covariance   d_in directions
                     (the covariance is exact: one streamed pass, float64)
    ICA              scikit-learn FastICA's sources                       interp_ica_components (0 = d_in)
                     fitted on a seeded sample of interp_ica_fit_rows rows
    SAE              sae.encode(x), the features as trained (notebook 03) d_sae each

Signs are handled the same way for every method, so no method gets its directions twice: probing
picks directions by the absolute mean difference and lets the probe's weight carry the sign
(SAEBench's rule), and simulation scoring ranks examples by |activation| and scores a correlation,
which a sign flip leaves unchanged.
Centring at the training mean changes no ranking; it puts a linear direction's zero at its mean.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from saelab import paths
from saelab.devices import accumulator_dtype, module_on
from saelab.features.analysis import check_matches
from saelab.sae import SAE
from saelab.store import ActivationStore


@dataclass
class LinearDirections:
    """(x - centre) @ weight: (rows, n) activations, one per direction."""

    name: str
    weight: torch.Tensor  # (d_in, k) read-out directions, one per column
    centre: torch.Tensor  # (d_in,)
    prefix: str = "dim"  # how a direction is labelled: "dim 3"
    note: str = ""

    @property
    def n(self) -> int:
        return self.weight.shape[1]

    def to(self, device) -> LinearDirections:
        """These directions on `device` (a new object; tensors are copied only when they move)."""
        return replace(self, weight=self.weight.to(device), centre=self.centre.to(device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.centre) @ self.weight  # (rows, n)

    def label(self, j: int) -> str:
        return f"{self.prefix} {j}"


@dataclass
class SAEDirections:
    """The features of a trained SAE: sae.encode(x), (rows, d_sae)."""

    name: str
    sae: SAE
    note: str = ""
    folder: Path | None = field(default=None, repr=False)

    n = property(lambda self: self.sae.d_sae)

    def to(self, device) -> SAEDirections:
        """These features on `device`: the SAE itself if it lives there, else a copy (`devices.module_on`),
        so the caller's SAE never moves (nn.Module.to moves in place)."""
        return replace(self, sae=module_on(self.sae, device).eval())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def label(self, j: int) -> str:
        return f"f {j}"


@torch.no_grad()
def moments_and_sample(store: ActivationStore, n_sample: int, seed: int, device="cpu", chunk_rows: int = 4096):
    """One pass: mean (d_in,) and covariance (d_in, d_in) of every row (float64; float32 on MPS, which
    has none), and a seeded sample of n_sample rows (n_sample, d_in) float32 on the CPU, for ICA."""
    acc = accumulator_dtype(device)
    picked = torch.zeros(store.n_rows, dtype=torch.bool)
    picked[torch.randperm(store.n_rows, generator=torch.Generator().manual_seed(seed))[:n_sample]] = True
    total, outer, shift, sample = None, None, None, []
    for chunk in store.chunks(chunk_rows):
        x = chunk.activations  # (rows, d_in) float32 on the CPU
        sample.append(x[picked[chunk.first_row:chunk.first_row + len(x)]])
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
    return LinearDirections("random", weight / weight.norm(dim=0), mean.float(), prefix="rand",
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
    residual = LinearDirections("residual basis", torch.eye(d_in), mean.float(), note=f"all {d_in} dimensions")
    n_random = profile.interp_random_directions or profile.d_sae
    n_ica = min(profile.interp_ica_components or d_in, d_in, len(sample))
    return [residual, random_directions(d_in, n_random, profile.seed, mean), pca_directions(mean, covariance),
            ica_directions(sample, n_ica, profile.interp_ica_max_iter, profile.seed)]


def trained_saes(profile, store: ActivationStore, device="cpu") -> tuple[list[SAEDirections], dict[str, str]]:
    """Notebook 03's SAE (folder "sae", first) and every other run folder under the same parent (the
    architecture comparison: "standard", "topk", ...), each checked against the store. Returns the SAEs
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
        check_matches(sae, store, f"the SAE at {folder}")
        name = f"SAE {sae.architecture}"
        if any(d.name == name for d in found):  # e.g. a second run of the profile's architecture
            name = f"{name} ({folder.name})"
        note = "notebook 03's SAE, analysed in notebook 04" if folder == main else "a notebook 03 comparison run"
        found.append(SAEDirections(name, sae, note, folder))
    return found, skipped
