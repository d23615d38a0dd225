"""Baseline directions on data whose answer is known, and the SAE folders notebook 06 finds."""

import json

import pytest
import torch
from planted import HOOK, PROFILE, write_store

from saelab import paths
from saelab.sae import SAE, sae_for
from saelab.studies.baselines import (
    LinearDirections,
    fit_baselines,
    ica_directions,
    moments_and_sample,
    pca_directions,
    random_directions,
    trained_saes,
)


@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_streamed_moments_equal_brute_force(tmp_path, chunk_rows):
    x = torch.randn(60, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) + 100.0  # a large mean: no cancellation allowed
    store = write_store(tmp_path / "s", x, shard_rows=25)
    mean, covariance, sample = moments_and_sample(store, 10, seed=0, chunk_rows=chunk_rows)
    x64 = x.double()
    assert torch.allclose(mean, x64.mean(0), atol=1e-9)
    assert torch.allclose(covariance, torch.cov(x64.T, correction=0), atol=1e-9)
    # the sample is 10 distinct rows of the store, the same for the same seed
    assert sample.shape == (10, 4) and len({tuple(r) for r in sample.tolist()}) == 10
    assert all((x == row).all(dim=1).any() for row in sample)
    assert torch.equal(sample, moments_and_sample(store, 10, seed=0, chunk_rows=5)[2])


def test_residual_basis_reads_each_dimension_once():
    basis = LinearDirections("residual basis", torch.eye(2), torch.tensor([1.0, -1.0]))
    x = torch.tensor([[3.0, 0.0], [1.0, -1.0]])
    assert torch.equal(basis.encode(x), torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    assert basis.n == 2 and [basis.label(j) for j in range(2)] == ["dim 0", "dim 1"]


def test_moving_linear_directions_leaves_the_callers_object_alone():
    basis = LinearDirections("residual basis", torch.eye(2), torch.zeros(2))
    moved = basis.to("meta")
    assert moved.weight.device.type == "meta" and basis.weight.device.type == "cpu"


def test_random_directions_are_seeded_unit_vectors():
    first = random_directions(5, 7, seed=3, mean=torch.zeros(5, dtype=torch.float64))
    assert first.n == 7
    assert torch.allclose(first.weight.norm(dim=0), torch.ones(7))
    assert torch.equal(first.weight, random_directions(5, 7, seed=3, mean=torch.zeros(5)).weight)


def test_pca_orders_components_by_variance():
    covariance = torch.diag(torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64))
    pca = pca_directions(torch.zeros(3, dtype=torch.float64), covariance)
    assert torch.allclose(pca.weight.abs(), torch.eye(3)[:, [1, 2, 0]])  # axes 1, 2, 0: variance 9, 4, 1
    assert pca.n == 3 and pca.label(0) == "PC 0"


def test_ica_unmixes_independent_sources():
    generator = torch.Generator().manual_seed(0)
    sources = torch.distributions.Laplace(0.0, 1.0).sample((4000, 2))  # non-Gaussian, independent
    sources = torch.stack([sources[:, 0], torch.rand(4000, generator=generator) * 2 - 1], dim=1)
    x = sources @ torch.tensor([[1.0, 0.5], [0.3, 1.0]]) + 5.0  # mixed and shifted
    ica = ica_directions(x, n_components=2, max_iter=200, seed=0)
    recovered = ica.encode(x)  # (rows, 2)
    correlation = torch.corrcoef(torch.cat([recovered, sources], dim=1).T)[:2, 2:].abs()
    assert (correlation.max(dim=1).values > 0.98).all()  # each component is one source, up to sign and scale
    assert "converged" in ica.note and ica.n == 2


def test_fit_baselines_gives_the_four_methods(tmp_path):
    store = write_store(tmp_path / "s", torch.randn(400, 4), shard_rows=150)
    methods = fit_baselines(PROFILE, store)
    assert [(m.name, m.n) for m in methods] == [("residual basis", 4), ("random", PROFILE.d_sae), ("PCA", 4),
                                                ("ICA", 4)]
    assert all(m.encode(torch.randn(3, 4)).shape == (3, m.n) for m in methods)


def save_sae(name: str, d_in: int = 4, hook: str = HOOK, architecture: str = "tied", **options) -> SAE:
    sae = sae_for(architecture, d_in, 8, metadata={"hook_name": hook}, **options)
    sae.save(paths.sae_dir(PROFILE, name))
    return sae


def test_trained_saes_lists_run_folders_and_says_why_one_is_not_loaded(tmp_path):
    store = write_store(tmp_path / "s", torch.randn(10, 4))
    with pytest.raises(FileNotFoundError, match="run notebook 03"):
        trained_saes(PROFILE, store)
    save_sae("sae")
    save_sae("topk", architecture="topk", k=2)
    save_sae("tied")  # a second run of the profile's architecture: a distinct name
    gated = save_sae("gated").cfg_dict()  # an architecture saelab does not implement
    del gated["saelab"]
    (paths.sae_dir(PROFILE, "gated") / "cfg.json").write_text(json.dumps(gated | {"architecture": "gated"}))
    paths.sae_dir(PROFILE, "running").mkdir()  # training, nothing saved yet
    found, skipped = trained_saes(PROFILE, store)
    assert [s.name for s in found] == ["SAE tied", "SAE tied (tied)", "SAE topk"]
    assert found[0].folder.name == "sae" and found[2].encode(torch.randn(5, 4)).shape == (5, 8)
    assert set(skipped) == {"gated", "running"}
    assert "'gated' is not one saelab implements" in skipped["gated"]
    assert "cfg.json is missing" in skipped["running"]


@pytest.mark.parametrize("d_in, hook, message", [
    (3, HOOK, "expects d_in=3 but the store .* has d_in=4"),
    (4, "blocks.5.hook_resid_pre", "trained on 'blocks.5.hook_resid_pre' but the store holds 'blocks.0"),
])
def test_an_sae_that_does_not_match_the_store_is_an_error(tmp_path, d_in, hook, message):
    store = write_store(tmp_path / "s", torch.randn(10, 4))
    save_sae("sae", d_in=d_in, hook=hook)
    with pytest.raises(ValueError, match=message):
        trained_saes(PROFILE, store)
