import pandas as pd
import pytest
import torch

from saelab.config import apply_threads, load_profile
from saelab.ground_truth import (
    best_per_recipe,
    fit_and_score,
    recipe_sae,
    sweep,
)
from saelab.synthetic import make_synthetic, recovery_scores


@pytest.fixture(autouse=True)
def offline_threads():
    """The offline profile's thread count, as notebook 05 sets it (tiny SAEs: one thread is fastest)."""
    before = torch.get_num_threads()
    apply_threads(load_profile("offline"))
    yield
    torch.set_num_threads(before)


def test_the_seed_recipe_recovers_easy_ground_truth():
    """Mild superposition (48 features in 32 dims, ~1.5 active, equally frequent), a 2x dictionary."""
    data = make_synthetic(4096, d=32, n_features=48, mean_active=1.5, decay_ratio=1.0, seed=0)
    scores = fit_and_score(data, "tied_l1", d_sae=96, knob=5e-3, epochs=40, lr=1e-2, batch_size=128)
    assert scores["recovered"] > 0.95  # share of true features with a learned direction at cos > 0.9
    assert scores["mmcs"] > 0.95


def test_an_untrained_sae_does_not_recover_them():
    data = make_synthetic(256, d=32, n_features=48, mean_active=1.5, decay_ratio=1.0, seed=0)
    torch.manual_seed(0)
    sae, _ = recipe_sae("tied_l1", 32, 96, 5e-3)
    assert recovery_scores(data.features, sae.decoder_weight)["recovered"] == 0.0


def test_recipes_map_to_the_sae_that_carries_them():
    tied, l1_tied = recipe_sae("tied_l1", 4, 8, 1e-3)
    untied, l1_untied = recipe_sae("l1", 4, 8, 1e-3)
    topk, l1_topk = recipe_sae("topk", 4, 8, 3)
    assert (tied.tied, tied.k, l1_tied) == (True, None, 1e-3)
    assert (untied.tied, untied.k, l1_untied) == (False, None, 1e-3)
    assert (topk.tied, topk.k, l1_topk) == (False, 3, 0.0)
    with pytest.raises(ValueError, match="unknown recipe 'relu'"):
        recipe_sae("relu", 4, 8, 1e-3)


def test_sweep_trains_every_point_once():
    data = make_synthetic(256, d=4, n_features=8, mean_active=1.0)
    results = sweep(data, l1_coefficients=(1e-3, 1e-2), ks=(1,), dict_sizes=(8, 16), epochs=1, progress=False)
    assert len(results) == 2 * (2 * 2 + 1)  # sizes x (two L1 recipes x two λ + topk x one k)
    assert set(results.columns) >= {"recipe", "d_sae", "knob", "knob_value", "mmcs", "mmcs_learned",
                                    "hungarian", "recovered", "l0", "fvu"}
    assert (results.loc[results.recipe == "topk", "knob"] == "k").all()
    assert results.loc[results.recipe == "topk", "l0"].le(1).all()  # TopK keeps at most k latents


@pytest.mark.parametrize("kwargs, message", [
    ({"recipes": ("tied_l1", "relu")}, "unknown recipe"),
    ({"dict_sizes": ()}, "sweep is empty"),
])
def test_bad_sweeps_are_refused(kwargs, message):
    data = make_synthetic(16, d=4, n_features=8, mean_active=1.0)
    with pytest.raises(ValueError, match=message):
        sweep(data, **{"l1_coefficients": (1e-3,), "ks": (1,), "dict_sizes": (8,), "progress": False, **kwargs})


def test_best_per_recipe_picks_the_highest_mmcs():
    results = pd.DataFrame({"recipe": ["topk", "topk", "l1"], "knob_value": [2, 4, 1e-3], "mmcs": [0.5, 0.9, 0.7]})
    best = best_per_recipe(results)
    assert list(best.recipe) == ["topk", "l1"] and list(best.knob_value) == [4, 1e-3]
