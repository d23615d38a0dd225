"""Notebook 03's comparison: the L0 search on a known power law and on real training, its cache, and the
convergence rule on hand-made histories."""

import json
import math

import pandas as pd
import pytest
import torch

from saelab import paths
from saelab.config import OFFLINE
from saelab.studies.synthetic import make_synthetic
from saelab.train import comparison

PROFILE = OFFLINE.replace(name="cmp", d_in=8, expansion_factor=4, epochs=10, batch_size=64, lr=1e-2,
                          l1_coefficient=0.01, l0_coefficient=0.01, target_l0=4.0, k=2)


def test_next_probe_follows_the_power_law_through_two_probes():
    law = lambda c: 50 * c ** -0.5  # noqa: E731  L0 = 50 c^-1/2: L0 = 10 at c = 25
    probes = [(1.0, law(1.0)), (4.0, law(4.0))]
    assert comparison.next_probe(probes, 10.0) == pytest.approx(25.0)
    # one probe: the slope guess; a step is capped at 10x
    assert comparison.next_probe([(1.0, 20.0)], 10.0, slope=-1.0) == pytest.approx(2.0)
    assert comparison.next_probe([(1.0, 1e6)], 10.0) == pytest.approx(10.0)


def test_search_reaches_the_target_and_caches_it(monkeypatch):
    calls = []

    def fake_probe(profile, activations, architecture, value, progress=False):  # L0 = 8 c^-0.7, no training
        calls.append((architecture, value))
        return 8 * value ** -0.7

    monkeypatch.setattr(comparison, "probe_l0", fake_probe)
    x = torch.randn(200, 8)
    matched = comparison.match_l0(PROFILE, x, architectures=("tied", "jumprelu", "topk"), progress=False)
    assert matched["topk"] == {"k": 4}  # k is the target itself: no search
    for architecture, field in (("tied", "l1_coefficient"), ("jumprelu", "l0_coefficient")):
        value = matched[architecture][field]
        assert abs(8 * value ** -0.7 / 4.0 - 1) <= comparison.SEARCH_TOLERANCE
    assert {a for a, _ in calls} == {"tied", "jumprelu"}
    cache = json.loads((paths.run_dir(PROFILE) / comparison.SEARCH_FILE).read_text())
    assert cache["tied"]["value"] == matched["tied"]["l1_coefficient"]
    table = comparison.search_table(PROFILE)  # notebook 03's table of probes
    assert table.groupby("architecture").chosen.sum().to_dict() == {"jumprelu": 1, "tied": 1}
    assert table[table.chosen].set_index("architecture").value.to_dict() == {
        "tied": matched["tied"]["l1_coefficient"], "jumprelu": matched["jumprelu"]["l0_coefficient"]}
    calls.clear()  # a rerun with the same settings and data reads the cache
    assert comparison.match_l0(PROFILE, x, architectures=("tied", "jumprelu"), progress=False) == {
        a: matched[a] for a in ("tied", "jumprelu")}
    assert calls == []
    comparison.match_l0(PROFILE.replace(epochs=4), x, architectures=("tied",), progress=False)
    assert calls and calls[0] == ("tied", 0.01)  # other settings: searched again, from the profile's value
    assert comparison.match_l0(PROFILE.replace(target_l0=0.0), x, progress=False)["tied"] == {}


def test_search_with_real_training_leaves_the_chosen_run_in_its_folder():
    x = 3 * make_synthetic(640, d=8, n_features=16, mean_active=2.0, seed=0).activations  # sparse codes to find
    result = comparison.search_coefficient(PROFILE.replace(l1_coefficient=0.05), x, "standard", target=6.0)
    assert abs(result["l0"] / 6.0 - 1) <= comparison.SEARCH_TOLERANCE
    history = pd.read_csv(paths.sae_dir(PROFILE, "standard") / "history.csv")
    assert history["val_l0"].iloc[-1] == pytest.approx(result["l0"])  # the folder holds the chosen probe's run
    # more λ, fewer active latents: the probes found L0 falling with the coefficient
    ordered = sorted(result["probes"])
    assert len(ordered) < 2 or ordered[0][1] >= ordered[-1][1]


def history(l0: list[float], fvu: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"step": [10 * (i + 1) for i in range(len(l0))], "val_l0": l0, "val_fvu": fvu})


def test_convergence_compares_the_last_fifth_of_the_steps():
    # steps 10..100: the last 20% starts after step 80, so epoch 8 (step 80) is compared with epoch 10
    flat = comparison.convergence(history([50, 40, 35, 33, 32, 31, 30.5, 30.0, 29.9, 29.8], [0.2] * 7 + [0.1] * 3))
    assert flat["l0_change_pct"] == pytest.approx(100 * 0.2 / 30) and flat["fvu_change_pct"] == 0
    assert flat["converged"]
    moving = comparison.convergence(history([50, 40, 35, 33, 32, 31, 30.5, 30.0, 29.0, 28.0], [0.1] * 10))
    assert moving["l0_change_pct"] == pytest.approx(100 * 2 / 30) and not moving["converged"]
    one = comparison.convergence(history([5.0], [0.1]))
    assert math.isnan(one["l0_change_pct"]) and not one["converged"]


def test_readme_rows_format_each_architecture_as_the_readme_table_quotes_it():

    table = pd.DataFrame([{"architecture": "jumprelu", "setting": "l0_coefficient", "value": 0.0258, "l0": 30.07,
                           "fvu": 0.03574, "ce_loss_recovered_pct": 99.81, "ce_loss_recovered_mean_pct": 99.23,
                           "delta_ce": 0.02904, "dead_pct": 0.977, "dense_pct": 17.58},
                          {"architecture": "topk", "setting": "k", "value": 32.0, "l0": 32.0, "fvu": 0.0304,
                           "ce_loss_recovered_pct": 99.86, "ce_loss_recovered_mean_pct": 99.45, "delta_ce": 0.0208,
                           "dead_pct": 0.0, "dense_pct": 19.34}])
    assert comparison.readme_rows(table) == {
        "jumprelu": "| jumprelu | λ0 0.026 | 30.1 | 0.036 | 99.8% / 99.2% | 0.029 | 1.0% | 17.6% |",
        "topk": "| topk | k 32 | 32.0 | 0.030 | 99.9% / 99.5% | 0.021 | 0.0% | 19.3% |"}
    assert comparison.readme_rows(table.set_index("architecture")) == comparison.readme_rows(table)  # as notebook 03
