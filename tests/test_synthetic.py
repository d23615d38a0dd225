import math

import pytest
import torch

from saelab.studies.synthetic import (
    cosine_matrix,
    firing_probabilities,
    fraction_recovered,
    hungarian_mean_cos,
    make_synthetic,
    mmcs,
    random_directions,
    recovery_scores,
)

# ------------------------------------------------------------------ generator


def test_probabilities_decay_by_the_ratio_and_sum_to_mean_active():
    p = firing_probabilities(n_features=11, mean_active=2.0, decay_ratio=10.0)
    assert torch.all(p[1:] < p[:-1])
    assert p[0] / p[-1] == pytest.approx(10.0, rel=1e-5)
    assert p.sum().item() == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(firing_probabilities(4, 1.0, 1.0), torch.full((4,), 0.25))


def test_impossible_probabilities_say_what_to_change():
    with pytest.raises(ValueError, match="lower mean_active or decay_ratio"):
        firing_probabilities(n_features=4, mean_active=3.5, decay_ratio=10.0)


@pytest.mark.parametrize("correlation", [0.0, 0.6])
def test_empirical_firing_rates_match_probabilities(correlation):
    n = 20_000
    data = make_synthetic(n, d=8, n_features=16, mean_active=2.0, correlation=correlation, seed=1)
    rate = (data.codes > 0).float().mean(dim=0)
    p = data.probabilities
    # each rate is a mean of n Bernoulli(p_i) draws (independent across samples): std sqrt(p(1-p)/n).
    # 5 std per feature: a false alarm somewhere among 16 features has probability ~1e-5.
    std = torch.sqrt(p * (1 - p) / n)
    assert torch.all((rate - p).abs() < 5 * std), (rate - p) / std


def test_correlation_makes_features_fire_together():
    """Independent firing leaves only sampling noise (~1/sqrt(n) = 0.007) between features' firing."""
    def mean_abs_offdiagonal_correlation(correlation: float) -> float:
        fires = (make_synthetic(20_000, d=8, n_features=16, mean_active=2.0, correlation=correlation,
                                seed=2).codes > 0).float()
        corr = torch.corrcoef(fires.T)  # (16, 16)
        return corr[~torch.eye(16, dtype=torch.bool)].abs().mean().item()

    independent, correlated = mean_abs_offdiagonal_correlation(0.0), mean_abs_offdiagonal_correlation(0.8)
    assert independent < 0.02
    assert correlated > 3 * independent


def test_activations_are_the_codes_on_unit_features():
    data = make_synthetic(500, d=8, n_features=16, mean_active=2.0, seed=3)
    assert data.activations.shape == (500, 8) and data.features.shape == (16, 8)
    assert torch.allclose(data.features.norm(dim=1), torch.ones(16))
    assert data.codes.min() >= 0 and data.codes.max() <= 1  # magnitudes U[0, 1] or 0
    assert torch.allclose(data.activations, data.codes @ data.features)


def test_noise_has_the_requested_std():
    clean = make_synthetic(5_000, d=16, n_features=32, mean_active=2.0, seed=4)
    noisy = make_synthetic(5_000, d=16, n_features=32, mean_active=2.0, noise_std=0.1, seed=4)
    assert torch.equal(clean.codes, noisy.codes)  # noise is drawn last: same features and codes
    assert (noisy.activations - clean.activations).std().item() == pytest.approx(0.1, rel=0.05)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (make_synthetic(100, d=8, n_features=16, mean_active=2.0, seed=s) for s in (5, 5, 6))
    assert torch.equal(a.activations, b.activations) and torch.equal(a.features, b.features)
    assert not torch.equal(a.features, c.features)


@pytest.mark.parametrize("kwargs", [{"correlation": 1.0}, {"noise_std": -1.0}, {"n_samples": 0}])
def test_bad_generator_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        make_synthetic(**{"n_samples": 10, "d": 4, "n_features": 8, "mean_active": 1.0, **kwargs})


# ------------------------------------------------------------------ metrics


def test_true_directions_score_one_and_random_ones_clearly_less():
    true, random = random_directions(128, 64, generator=7), random_directions(128, 64, generator=8)
    assert recovery_scores(true, true) == pytest.approx(
        {"mmcs": 1.0, "mmcs_learned": 1.0, "hungarian": 1.0, "recovered": 1.0})
    # max |cos| of one random unit vector with 128 others in 64 dims is ~sqrt(2 ln 128 / 64) ≈ 0.39
    chance = recovery_scores(true, random)
    assert chance["mmcs"] < 0.6 and chance["hungarian"] < 0.6 and chance["recovered"] == 0.0


def test_permuted_and_rescaled_directions_score_one():
    true = random_directions(12, 8, generator=9)
    learned = 3.0 * true[torch.randperm(12)]  # decoder rows need not be unit norm
    assert hungarian_mean_cos(true, learned) == pytest.approx(1.0)
    assert mmcs(true, learned) == pytest.approx(1.0) and mmcs(learned, true) == pytest.approx(1.0)


def test_hungarian_counts_each_learned_direction_once():
    """Both true features' best match is the same diagonal direction: MMCS counts it twice."""
    true = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    learned = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # diagonal, and an unrelated axis
    assert mmcs(true, learned) == pytest.approx(1 / math.sqrt(2))  # both pick the diagonal
    assert hungarian_mean_cos(true, learned) == pytest.approx(1 / math.sqrt(2) / 2)  # one gets e3: 0
    assert mmcs(learned, true) == pytest.approx(1 / math.sqrt(2) / 2)  # e3 matches nothing


def test_hungarian_scores_unmatched_true_features_zero_and_ignores_sign():
    true = torch.eye(4)
    assert hungarian_mean_cos(true, -true[:2]) == pytest.approx(0.5)  # |cos| = 1 twice, 2 left over


def test_every_score_uses_absolute_cosines():
    """A negated dictionary spans the same features: one |cos| convention, every score 1."""
    true = random_directions(6, 5, generator=3)
    assert recovery_scores(true, -true) == pytest.approx(
        {"mmcs": 1.0, "mmcs_learned": 1.0, "hungarian": 1.0, "recovered": 1.0})


def test_fraction_recovered_uses_the_threshold():
    true = torch.eye(2)
    learned = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # cos with e2: 0.6
    assert fraction_recovered(true, learned, threshold=0.9) == 0.5
    assert fraction_recovered(true, learned, threshold=0.5) == 1.0


def test_cosine_matrix_refuses_mismatched_widths():
    with pytest.raises(ValueError, match="same d"):
        cosine_matrix(torch.ones(3, 4), torch.ones(3, 5))
