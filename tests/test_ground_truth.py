import pandas as pd
import pytest
import torch

from saelab import ground_truth
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


SMALL = {"l1_coefficients": (1e-3, 1e-2), "ks": (1,), "dict_sizes": (8,), "epochs": 1, "progress": False}


REAL_FIT = ground_truth.fit_and_score


class Interrupt(Exception):
    pass


def counting_fits(monkeypatch, fail_after: int | None = None) -> list:
    """fit_and_score, counted; it raises Interrupt once `fail_after` points have finished."""
    calls = []

    def fit(data, recipe, d_sae, knob, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append((recipe, d_sae, knob))
        return REAL_FIT(data, recipe, d_sae, knob, **kwargs)

    monkeypatch.setattr(ground_truth, "fit_and_score", fit)
    return calls


def test_an_interrupted_sweep_resumes_to_the_same_results(tmp_path, monkeypatch):
    data = make_synthetic(128, d=4, n_features=8, mean_active=1.0)
    whole = sweep(data, **SMALL)  # 5 points: tied_l1 x 2, l1 x 2, topk x 1
    csv = tmp_path / "sweep.csv"
    counting_fits(monkeypatch, fail_after=2)
    with pytest.raises(Interrupt):
        sweep(data, csv_path=csv, **SMALL)
    assert len(pd.read_csv(csv)) == 2  # the two finished points were saved as they finished
    calls = counting_fits(monkeypatch)
    resumed = sweep(data, csv_path=csv, **SMALL)
    assert calls == [("l1", 8, 1e-3), ("l1", 8, 1e-2), ("topk", 8, 1)]  # only the missing points
    pd.testing.assert_frame_equal(resumed, whole)
    assert counting_fits(monkeypatch) == [] and sweep(data, csv_path=csv, **SMALL).equals(resumed)


def test_saved_points_of_other_settings_or_data_are_trained_again(tmp_path, monkeypatch):
    data = make_synthetic(128, d=4, n_features=8, mean_active=1.0)
    csv = tmp_path / "sweep.csv"
    sweep(data, csv_path=csv, **SMALL)
    calls = counting_fits(monkeypatch)
    sweep(data, csv_path=csv, **{**SMALL, "epochs": 2})
    sweep(make_synthetic(128, d=4, n_features=8, mean_active=1.0, seed=1), csv_path=csv, **SMALL)
    assert len(calls) == 2 * 5 and len(pd.read_csv(csv)) == 3 * 5  # earlier rows are kept, not overwritten


def test_an_unreadable_results_file_says_delete_it(tmp_path):
    csv = tmp_path / "sweep.csv"
    csv.write_bytes(b"\x00\xff\"unterminated")
    with pytest.raises(ValueError, match="delete it to rerun the sweep"):
        sweep(make_synthetic(16, d=4, n_features=8, mean_active=1.0), csv_path=csv, **SMALL)


def test_fvu_is_the_fits_own(monkeypatch):
    """FVU = SSE / sum ||x - mean||^2 (population), by hand on 4 samples for an untrained SAE."""
    data = make_synthetic(4, d=4, n_features=8, mean_active=2.0)
    monkeypatch.setattr(ground_truth, "train_sae", lambda *args, **kwargs: None)
    fvu = fit_and_score(data, "l1", d_sae=8, knob=1e-3)["fvu"]
    torch.manual_seed(0)
    sae, _ = recipe_sae("l1", 4, 8, 1e-3)
    x = data.activations
    with torch.no_grad():
        expected = (sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu == pytest.approx(expected.item(), rel=1e-5)
