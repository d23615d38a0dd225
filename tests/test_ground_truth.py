import pandas as pd
import pytest
import torch

from saelab.config import apply_threads, load_profile
from saelab.studies import ground_truth
from saelab.studies.ground_truth import (
    best_per_architecture,
    fit_and_score,
    knob_of,
    sweep,
    sweep_sae,
)
from saelab.studies.synthetic import make_synthetic, recovery_scores


@pytest.fixture(autouse=True)
def offline_threads():
    """The offline profile's thread count, as notebook 05 sets it (tiny SAEs: one thread is fastest)."""
    before = torch.get_num_threads()
    apply_threads(load_profile("offline"))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("architecture, knob", [("tied", 5e-3), ("standard", 5e-3), ("topk", 2), ("batchtopk", 1),
                                                ("jumprelu", 1e-3)])
def test_every_architecture_recovers_easy_ground_truth(architecture, knob):
    """Mild superposition (48 features in 32 dims, ~1.5 active, equally frequent), a 2x dictionary."""
    data = make_synthetic(4096, d=32, n_features=48, mean_active=1.5, decay_ratio=1.0, seed=0)
    scores = fit_and_score(data, architecture, d_sae=96, knob=knob, epochs=40, lr=1e-2, batch_size=128)
    assert scores["recovered"] > 0.95  # share of true features with a learned direction at cos > 0.9
    assert scores["mmcs"] > 0.95


def test_an_untrained_sae_does_not_recover_them():
    data = make_synthetic(256, d=32, n_features=48, mean_active=1.5, decay_ratio=1.0, seed=0)
    torch.manual_seed(0)
    sae, _ = sweep_sae("tied", 32, 96, 5e-3)
    assert recovery_scores(data.features, sae.decoder_weight)["recovered"] == 0.0


def test_each_architecture_is_swept_over_its_own_knob():
    assert [knob_of(a) for a in ("tied", "standard", "topk", "batchtopk", "jumprelu")] == [
        "l1_coefficient", "l1_coefficient", "k", "k", "l0_coefficient"]
    tied, tied_options = sweep_sae("tied", 4, 8, 1e-3)
    topk, topk_options = sweep_sae("topk", 4, 8, 3)
    jumprelu, jumprelu_options = sweep_sae("jumprelu", 4, 8, 1e-4)
    assert (tied.architecture, tied_options) == ("tied", {"l1_coefficient": 1e-3})
    assert (topk.k, topk_options) == (3, {})
    assert jumprelu_options == {"l0_coefficient": 1e-4}
    with pytest.raises(ValueError, match="unknown architecture 'relu'"):
        sweep_sae("relu", 4, 8, 1e-3)


def test_sweep_trains_every_point_once():
    data = make_synthetic(256, d=4, n_features=8, mean_active=1.0)
    results = sweep(data, knobs={"l1_coefficient": (1e-3, 1e-2), "k": (1,), "l0_coefficient": (1e-3,)},
                    dict_sizes=(8, 16), epochs=1, progress=False)
    assert len(results) == 2 * (2 * 2 + 2 * 1 + 1)  # sizes x (two L1 architectures x 2 λ + two k ones + λ0)
    two_seeds = sweep(data, knobs={"k": (1,)}, architectures=("topk",), dict_sizes=(8,), epochs=1, seeds=(0, 1),
                      progress=False)
    assert two_seeds.seed.tolist() == [0, 1] and two_seeds.mmcs.nunique() == 2  # another initialisation
    assert set(results.columns) >= {"architecture", "d_sae", "knob", "knob_value", "mmcs", "mmcs_learned",
                                    "hungarian", "recovered", "l0", "fvu"}
    assert (results.loc[results.architecture == "topk", "knob"] == "k").all()
    assert (results.loc[results.architecture == "jumprelu", "knob"] == "λ0").all()
    assert results.loc[results.architecture == "topk", "l0"].le(1).all()  # TopK keeps at most k latents


@pytest.mark.parametrize("kwargs, message", [
    ({"architectures": ("tied", "relu")}, "unknown architecture"),
    ({"dict_sizes": ()}, "sweep is empty"),
    ({"knobs": {"k": (1,)}, "architectures": ("tied",)}, r"sweep is empty.*\['l1_coefficient'\]"),
])
def test_bad_sweeps_are_refused(kwargs, message):
    data = make_synthetic(16, d=4, n_features=8, mean_active=1.0)
    with pytest.raises(ValueError, match=message):
        sweep(data, **{"knobs": {"l1_coefficient": (1e-3,), "k": (1,)}, "dict_sizes": (8,), "progress": False,
                       **kwargs})


def hand_results() -> pd.DataFrame:
    """Two seeds per setting. topk k=4 has the best MMCS (the oracle's) but L0 4 > budget 2 x 1.15; among
    settings within the budget, k=2 has the lower held-out FVU. standard: only λ 1e-2 is sparse enough."""
    rows = [("topk", 1, 1, 0.5, 1.0, 0.6), ("topk", 2, 2, 0.7, 2.0, 0.3), ("topk", 4, 4, 0.9, 4.0, 0.1),
            ("standard", 1e-3, None, 0.8, 6.0, 0.05), ("standard", 1e-2, None, 0.6, 2.2, 0.2)]
    return pd.DataFrame([{"architecture": a, "d_sae": 16, "knob": "k" if a == "topk" else "λ", "knob_value": v,
                          "seed": seed, "mmcs": m + 0.02 * seed, "mmcs_learned": m, "hungarian": m,
                          "recovered": m, "l0": l0, "fvu": fvu + 0.01 * seed}
                         for a, v, _, m, l0, fvu in rows for seed in (0, 1)])


def test_best_per_architecture_is_the_oracle_by_mean_mmcs_over_seeds():
    best = best_per_architecture(hand_results())
    assert list(best.architecture) == ["topk", "standard"] and list(best.knob_value) == [4, 1e-3]
    assert best.mmcs.tolist() == pytest.approx([0.91, 0.81]) and best.seeds.tolist() == [2, 2]
    assert best.mmcs_sd.tolist() == pytest.approx([0.02 / 2 ** 0.5] * 2)  # sd over the two seeds


def test_user_choice_never_looks_at_the_true_features():
    results = hand_results()
    chosen = ground_truth.user_choice(results, target_l0=2.0).set_index("architecture")
    assert chosen.knob_value.to_dict() == {"topk": 2, "standard": 1e-2}  # lowest FVU within L0 <= 2.3
    shuffled = results.assign(mmcs=results.mmcs.sample(frac=1, random_state=0).to_numpy(), recovered=0.0)
    assert ground_truth.user_choice(shuffled, 2.0).knob_value.tolist() == chosen.knob_value.tolist()
    # no setting that sparse: the sparsest one
    assert ground_truth.user_choice(results, target_l0=0.5).knob_value.tolist() == [1, 1e-2]


def test_chance_is_measured_at_the_dictionary_size():
    features = make_synthetic(16, d=8, n_features=16, mean_active=1.0).features
    small, large = (ground_truth.chance_scores(features, n, seeds=(0, 1, 2))["mmcs"] for n in (16, 256))
    assert 0 < small < large < 1  # more random candidates: a closer best match for every feature


def test_report_puts_choice_oracle_and_chance_side_by_side():
    features = make_synthetic(16, d=4, n_features=8, mean_active=1.0).features
    table = ground_truth.report(hand_results(), features, target_l0=2.0)
    assert table.loc["topk", "knob_value"] == 2 and table.loc["topk", "oracle_knob_value"] == 4
    assert table.loc["topk", "oracle_mmcs"] > table.loc["topk", "mmcs"] and table.seeds.eq(2).all()
    expected = ground_truth.chance_scores(features, 16, seeds=(0, 1))["mmcs"]
    assert table.chance_mmcs.tolist() == pytest.approx([expected, expected])


SMALL = {"knobs": {"l1_coefficient": (1e-3, 1e-2), "k": (1,)}, "architectures": ("tied", "standard", "topk"),
         "dict_sizes": (8,), "epochs": 1, "progress": False}


REAL_FIT = ground_truth.fit_and_score


class Interrupt(Exception):
    pass


def counting_fits(monkeypatch, fail_after: int | None = None) -> list:
    """fit_and_score, counted; it raises Interrupt once `fail_after` points have finished."""
    calls = []

    def fit(data, architecture, d_sae, knob, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupt
        calls.append((architecture, d_sae, knob))
        return REAL_FIT(data, architecture, d_sae, knob, **kwargs)

    monkeypatch.setattr(ground_truth, "fit_and_score", fit)
    return calls


def test_an_interrupted_sweep_resumes_to_the_same_results(tmp_path, monkeypatch):
    data = make_synthetic(128, d=4, n_features=8, mean_active=1.0)
    whole = sweep(data, **SMALL)  # 5 points: tied x 2, standard x 2, topk x 1
    csv = tmp_path / "sweep.csv"
    counting_fits(monkeypatch, fail_after=2)
    with pytest.raises(Interrupt):
        sweep(data, csv_path=csv, **SMALL)
    assert len(pd.read_csv(csv)) == 2  # the two finished points were saved as they finished
    calls = counting_fits(monkeypatch)
    resumed = sweep(data, csv_path=csv, **SMALL)
    assert calls == [("standard", 8, 1e-3), ("standard", 8, 1e-2), ("topk", 8, 1)]  # only the missing points
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


def test_fvu_is_the_fits_own_on_the_held_out_rows(monkeypatch):
    """FVU = SSE / sum ||x - mean||^2 (population) over the held-out fifth, by hand for an untrained SAE."""
    data = make_synthetic(10, d=4, n_features=8, mean_active=2.0)
    monkeypatch.setattr(ground_truth, "train_sae", lambda *args, **kwargs: None)
    fvu = fit_and_score(data, "standard", d_sae=8, knob=1e-3)["fvu"]
    torch.manual_seed(0)
    sae, _ = sweep_sae("standard", 4, 8, 1e-3)
    train, held_out = ground_truth.held_out_split(10)
    assert (train, held_out) == (slice(0, 8), slice(8, 10))
    x = data.activations[held_out]
    with torch.no_grad():
        expected = (sae(x).x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu == pytest.approx(expected.item(), rel=1e-5)


def test_readme_line_names_each_choice_its_oracle_and_chance():
    table = pd.DataFrame([{"architecture": "tied", "d_sae": 128, "mmcs": 0.9322, "recovered": 0.836,
                           "oracle_mmcs": 0.9363, "chance_mmcs": 0.4757, "chance_recovered": 0.0},
                          {"architecture": "topk", "d_sae": 128, "mmcs": 0.9936, "recovered": 1.0,
                           "oracle_mmcs": 0.9936, "chance_mmcs": 0.4757, "chance_recovered": 0.0}])
    table = table.set_index("architecture")
    assert ground_truth.readme_line(table) == ("tied 0.932 (84%; oracle 0.936), topk 0.994 (100%; oracle 0.994). "
                                  "Chance, 128 random directions: 0.476 (0%)")
