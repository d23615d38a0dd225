"""Synthetic activations with known features in superposition, and how well an SAE recovers them.

After Sharkey, Braun & Millidge 2022, "Taking features out of superposition with sparse
autoencoders" (the toy setup Cunningham et al. 2023 build on):

    x = sum_i  c_i f_i  (+ noise)     f_i: n_features random unit directions in d < n_features dims
                                      c_i = fires_i * U[0, 1],  P(fires_i) = p_i, decaying with i

A working SAE's decoder rows line up with the f_i: mean max |cosine similarity| (MMCS) near 1.
Pure tensors: no files, no model.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

N_FACTORS = 8  # shared Gaussian factors behind correlated firing: few factors -> strong co-firing


class SyntheticData(NamedTuple):
    activations: torch.Tensor  # (n_samples, d) what the SAE is trained on
    features: torch.Tensor  # (n_features, d) the true directions, unit norm
    codes: torch.Tensor  # (n_samples, n_features) true coefficients, >= 0, zero when not firing
    probabilities: torch.Tensor  # (n_features,) P(feature i fires), decaying with i


def firing_probabilities(n_features: int, mean_active: float, decay_ratio: float) -> torch.Tensor:
    """p_i = p_0 * decay_ratio^(-i / (n_features - 1)), scaled so sum_i p_i = mean_active.

    decay_ratio = p_first / p_last (1 = all features equally frequent). -> (n_features,)
    """
    if n_features < 1 or mean_active <= 0 or decay_ratio < 1:
        raise ValueError(f"need n_features >= 1, mean_active > 0, decay_ratio >= 1; got {n_features}, "
                         f"{mean_active}, {decay_ratio}")
    steps = torch.arange(n_features, dtype=torch.float64) / max(n_features - 1, 1)
    p = decay_ratio ** (-steps)
    p = p * mean_active / p.sum()
    if p.max() > 1:
        raise ValueError(f"mean_active={mean_active} with decay_ratio={decay_ratio} needs the first feature to "
                         f"fire with probability {p.max():.2f} > 1; lower mean_active or decay_ratio")
    return p.float()


def random_directions(n: int, d: int, generator: torch.Generator | int = 0) -> torch.Tensor:
    """n random unit vectors in d dims (uniform on the sphere), seeded. -> (n, d)"""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    directions = torch.randn(n, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def _fires(n_samples: int, p: torch.Tensor, correlation: float, gen: torch.Generator) -> torch.Tensor:
    """(n_samples, n_features) bool; P(fires_i) = p_i exactly, correlated through a Gaussian copula.

    z_i = sqrt(correlation) * <a_i, g> + sqrt(1 - correlation) * eps_i ~ N(0, 1), and feature i
    fires when z_i < Phi^-1(p_i). Features whose unit factor loadings a_i point the same way co-fire.
    """
    n_features = p.shape[0]
    if correlation == 0:
        return torch.rand(n_samples, n_features, generator=gen) < p
    loadings = torch.randn(n_features, N_FACTORS, generator=gen)
    loadings = loadings / loadings.norm(dim=1, keepdim=True)  # (n_features, N_FACTORS)
    g = torch.randn(n_samples, N_FACTORS, generator=gen)
    eps = torch.randn(n_samples, n_features, generator=gen)
    z = math.sqrt(correlation) * g @ loadings.T + math.sqrt(1 - correlation) * eps
    return z < torch.special.ndtri(p)


def make_synthetic(n_samples: int, d: int = 256, n_features: int = 512, mean_active: float = 5.0,
                   decay_ratio: float = 10.0, correlation: float = 0.0, noise_std: float = 0.0,
                   seed: int = 0) -> SyntheticData:
    """Seeded synthetic activations: defaults are Sharkey et al.'s 512 features in 256 dims, ~5 active.

    correlation in [0, 1): share of each feature's firing variable that comes from common factors.
    noise_std: standard deviation of isotropic Gaussian noise added to every coordinate.
    """
    if n_samples < 1 or d < 1:
        raise ValueError(f"need n_samples >= 1 and d >= 1, got {n_samples}, {d}")
    if not 0 <= correlation < 1 or noise_std < 0:
        raise ValueError(f"need 0 <= correlation < 1 and noise_std >= 0, got {correlation}, {noise_std}")
    gen = torch.Generator().manual_seed(seed)
    p = firing_probabilities(n_features, mean_active, decay_ratio)
    features = random_directions(n_features, d, gen)
    fires = _fires(n_samples, p, correlation, gen)
    codes = fires * torch.rand(n_samples, n_features, generator=gen)  # magnitudes U[0, 1]
    activations = codes @ features  # (n_samples, d)
    if noise_std > 0:
        activations = activations + noise_std * torch.randn(n_samples, d, generator=gen)
    return SyntheticData(activations=activations, features=features, codes=codes, probabilities=p)


# ------------------------------------------------------------------ recovery metrics


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_j) for rows a (n, d) and b (m, d) -> (n, m). Zero rows give cosine 0."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (rows, d) matrices with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a.detach().float().cpu()
    b = b.detach().float().cpu()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def mmcs(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of a of the max over rows of b of |cos(a_i, b_j)| (Sharkey et al.'s MMCS).

    mmcs(true, learned) asks "is every true feature found?" (recall);
    mmcs(learned, true) asks "is every learned direction a true feature?" (precision).
    |cos|, as every score here (Hungarian, recovered): a direction and its negation span the same
    feature, and one convention keeps the scores comparable with one another and with chance.
    """
    return cosine_matrix(a, b).abs().max(dim=1).values.mean().item()


def hungarian_mean_cos(true: torch.Tensor, learned: torch.Tensor) -> float:
    """One-to-one matching: mean over true features of |cos| with the learned direction paired to it.

    Pairs maximise the total |cos| (scipy's linear_sum_assignment); a true feature left without a
    partner (fewer learned directions than true ones) scores 0, so one learned direction cannot
    stand in for two features as it can in MMCS.
    """
    similarity = cosine_matrix(true, learned).abs().numpy()
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return float(np.sum(similarity[rows, cols]) / true.shape[0])


def fraction_recovered(true: torch.Tensor, learned: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true features with some learned direction at |cos| > threshold."""
    return (cosine_matrix(true, learned).abs().max(dim=1).values > threshold).float().mean().item()


def recovery_scores(true: torch.Tensor, learned: torch.Tensor, threshold: float = 0.9) -> dict[str, float]:
    """All recovery metrics for true (n_features, d) and learned decoder rows (d_sae, d)."""
    return {"mmcs": mmcs(true, learned), "mmcs_learned": mmcs(learned, true),
            "hungarian": hungarian_mean_cos(true, learned),
            "recovered": fraction_recovered(true, learned, threshold)}
