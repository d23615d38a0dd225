"""Probing and token concentration on hand-built data where the answer is known."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from planted import PROFILE, write_store
from sklearn.metrics import roc_auc_score

from saelab.sae import SAE
from saelab.studies.baselines import LinearDirections, SAEDirections
from saelab.studies.concepts import CONCEPTS
from saelab.studies.probing import (
    Comparison,
    bootstrap_mean,
    compare,
    describe,
    separation,
    summarise,
    token_entropy,
    train_separation,
)

C = len(CONCEPTS)


def basis(d: int, both_signs: bool = False, name: str = "residual basis") -> LinearDirections:
    return LinearDirections(name, torch.eye(d), torch.zeros(d), both_signs=both_signs)


def random_labels(rows: int) -> torch.Tensor:
    return torch.rand(rows, C) < 0.5  # (rows, C), independent of everything else


def run(tmp_path, methods, x_train, y_train, x_mae, y_mae, token_ids=None, profile=PROFILE):
    stores = {"train": write_store(tmp_path / "train", x_train), "mae": write_store(tmp_path / "mae", x_mae, token_ids)}
    return compare(methods, stores, {"train": y_train, "mae": y_mae}, profile, progress=False)


def test_a_planted_direction_is_a_perfect_probe(tmp_path):
    x_train, x_mae = torch.randn(200, 4), torch.randn(150, 4)
    y_train, y_mae = random_labels(200), random_labels(150)
    for x, y in ((x_train, y_train), (x_mae, y_mae)):
        x[:, 2] = 2.0 * y[:, 0] + torch.rand(len(x))  # positives in [2, 3), negatives in [0, 1)
    result = run(tmp_path, [basis(4)], x_train, y_train, x_mae, y_mae)
    digit = result.probing.set_index("concept").loc[list(CONCEPTS)[0]]
    assert (digit["label"], digit["auc"]) == ("dim 2", 1.0)


def test_a_random_direction_probes_at_chance(tmp_path):
    x_mae, y_mae = torch.randn(4000, 1), random_labels(4000)
    result = run(tmp_path, [basis(1)], torch.randn(100, 1), random_labels(100), x_mae, y_mae)
    # Under independence the AUC's standard deviation is sqrt((n1 + n0 + 1) / (12 n1 n0)) ~ 0.009 at
    # n1 ~ n0 ~ 2000: 0.04 is over 4 standard deviations for every one of the 8 concepts
    assert result.probing["auc"].sub(0.5).abs().max() < 0.04


def test_the_direction_is_chosen_on_train_and_scored_on_held_out(tmp_path):
    y_train, y_mae = random_labels(300), random_labels(300)
    x_train, x_mae = torch.randn(300, 2), torch.randn(300, 2)
    x_train[:, 0] = y_train[:, 0] * 5.0 + torch.rand(300)  # perfect on train only: noise on held-out text
    x_train[:, 1] += y_train[:, 0] * 1.0  # informative on both
    x_mae[:, 1] += y_mae[:, 0] * 1.0
    result = run(tmp_path, [basis(2)], x_train, y_train, x_mae, y_mae)
    chosen = result.probing.set_index("concept").loc[list(CONCEPTS)[0]]
    assert chosen["label"] == "dim 0" and abs(chosen["auc"] - 0.5) < 0.1  # no peeking at held-out text
    assert roc_auc_score(y_mae[:, 0].numpy(), x_mae[:, 1].numpy()) > 0.7  # what peeking would have picked


@pytest.mark.parametrize("chunk_rows", [3, 7, 1000])
def test_streaming_equals_brute_force(tmp_path, chunk_rows):
    x_train, x_mae = torch.randn(60, 3), torch.randn(45, 3)
    y_train, y_mae = random_labels(60), random_labels(45)
    sae = SAE(3, 6)
    methods = [basis(3, both_signs=True), SAEDirections("SAE", sae)]
    profile = PROFILE.replace(interp_chunk_rows=chunk_rows, interp_top_directions=100)
    result = run(tmp_path, methods, x_train, y_train, x_mae, y_mae, profile=profile)
    scores = train_separation(methods, write_store(tmp_path / "t", x_train), y_train, chunk_rows=chunk_rows,
                              progress=False)
    for method in methods:
        a = method.encode(x_train).detach().double()  # (rows, D): brute force holds all of it
        pos, neg = (a[y_train[:, c]] for c in range(C)), (a[~y_train[:, c]] for c in range(C))
        expected = torch.stack([(p.mean(0) - q.mean(0)) / (p.var(0, correction=0) + q.var(0, correction=0)).sqrt()
                                for p, q in zip(pos, neg, strict=True)])
        assert torch.allclose(scores[method.name], expected, atol=1e-5)  # chunk sums are float32
        held = method.encode(x_mae).detach()
        for row in result.probing[result.probing["method"] == method.name].itertuples():
            c = list(CONCEPTS).index(row.concept)
            assert row.direction == int(expected[c].argmax())
            assert row.auc == pytest.approx(roc_auc_score(y_mae[:, c].numpy(), held[:, row.direction].numpy()))
        top = held.clamp(min=0).topk(3, dim=0)  # continuous random data: no ties
        full = (top.values > 0).all(dim=0)
        activity = held.clamp(min=0).sum(0).double()
        order = torch.where(full, activity, -math.inf).argsort(descending=True)[:int(full.sum())]
        rows = result.concentration[result.concentration["method"] == method.name]
        assert rows["direction"].tolist() == order.tolist()
        assert rows["activity"].to_numpy() == pytest.approx(activity[order].numpy())
        ids = torch.arange(45) % 11  # the store's token ids (planted.write_store)
        assert rows["token_ids"].tolist() == [ids[top.indices[:, j]].tolist() for j in order.tolist()]


def test_token_entropy_by_hand():
    assert token_entropy([5, 5, 5]) == 0.0
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert token_entropy([1, 1, 2, 2]) == pytest.approx(1.0)


def test_a_one_token_direction_has_zero_token_entropy(tmp_path):
    token_ids = torch.arange(100) % 10
    x_mae = torch.zeros(100, 2)
    x_mae[token_ids == 7, 0] = torch.rand(10) + 1.0  # fires on token 7 only
    x_mae[:, 1] = torch.rand(100) * 0.1  # fires everywhere, most on rows 0, 1, 2: tokens 0, 1, 2
    x_mae[:3, 1] = torch.tensor([2.0, 3.0, 4.0])
    result = run(tmp_path, [basis(2)], torch.randn(50, 2), random_labels(50), x_mae, random_labels(100), token_ids)
    entropy = result.concentration.set_index("label")["entropy"]
    assert entropy["dim 0"] == 0.0 and entropy["dim 1"] == pytest.approx(math.log2(3))


def test_directions_with_fewer_active_examples_than_k_are_not_scored(tmp_path):
    x_mae = torch.zeros(40, 2)
    x_mae[:2, 0] = 1.0  # 2 active examples < k = 3
    x_mae[:, 1] = torch.rand(40)
    result = run(tmp_path, [basis(2)], torch.randn(50, 2), random_labels(50), x_mae, random_labels(40))
    assert result.concentration["label"].tolist() == ["dim 1"]


def test_a_concept_without_held_out_positives_is_skipped_with_its_reason(tmp_path):
    y_mae = random_labels(60)
    y_mae[:, 3] = False
    result = run(tmp_path, [basis(2)], torch.randn(60, 2), random_labels(60), torch.randn(60, 2), y_mae)
    concept = list(CONCEPTS)[3]
    assert result.concepts.at[concept, "skipped"] == "no positive token in the mae split (0 of 60)"
    assert concept not in set(result.probing["concept"]) and result.probing["concept"].nunique() == C - 1
    assert summarise(result, 100, 0).at["residual basis", "concepts"] == C - 1


def test_separation_by_hand():
    # positives 1, 3 (mean 2, var 1); negatives 0, 0 (mean 0, var 0): d' = 2 / sqrt(1)
    s1, q1, n1 = torch.tensor([[4.0]]), torch.tensor([[10.0]]), torch.tensor([2.0])
    assert separation(s1, q1, n1, torch.tensor([4.0]), torch.tensor([10.0]), 4).item() == pytest.approx(2.0)
    assert separation(torch.zeros(1, 1), torch.zeros(1, 1), n1, torch.zeros(1), torch.zeros(1), 4).item() == 0.0


def test_bootstrap_mean():
    assert bootstrap_mean([0.7] * 5, 100, seed=0) == pytest.approx((0.7, 0.7, 0.7))
    values = np.random.default_rng(1).normal(size=30)
    mean, low, high = bootstrap_mean(values, 500, seed=0)
    assert low < mean < high and (mean, low, high) == bootstrap_mean(values, 500, seed=0)
    assert all(math.isnan(v) for v in bootstrap_mean([], 10, seed=0))


def hand_comparison(sae_auc: list[float], base_auc: list[float], sae_entropy: list[float],
                    base_entropy: list[float]) -> Comparison:
    concepts = list(CONCEPTS)[:len(sae_auc)]
    probing = pd.DataFrame({"method": ["SAE x"] * len(sae_auc) + ["PCA"] * len(base_auc),
                            "concept": concepts * 2, "auc": sae_auc + base_auc})
    concentration = pd.DataFrame({"method": ["SAE x"] * len(sae_entropy) + ["PCA"] * len(base_entropy),
                                  "rank": list(range(len(sae_entropy))) + list(range(len(base_entropy))),
                                  "entropy": sae_entropy + base_entropy})
    methods = pd.DataFrame({"kind": ["baseline", "SAE"]}, index=pd.Index(["PCA", "SAE x"], name="method"))
    return Comparison(probing, concentration, pd.DataFrame(), methods)


def test_describe_with_nothing_to_compare_claims_no_win():
    comparison = hand_comparison([0.9, 0.95], [0.7, 0.75], [0.5, 0.0], [1.5, 1.6])
    comparison.concentration = comparison.concentration[comparison.concentration["method"] == "SAE x"]
    text = describe(comparison, summarise(comparison, 100, seed=0), PROFILE, 100, seed=0)
    assert "token concentration (" in text and "nothing to compare" in text
    assert "on 1-sparse probing only" in text and "both scores" not in text


@pytest.mark.parametrize("sae_auc, sae_entropy, expected", [
    ([0.9, 0.95, 0.85, 0.92], [0.5, 0.0, 1.0, 0.4], "SAE x beats every baseline on both scores"),
    ([0.6, 0.65, 0.55, 0.62], [2.5, 3.0, 2.8, 2.9], "On neither score does SAE x beat every baseline"),
    ([0.9, 0.95, 0.85, 0.92], [2.5, 3.0, 2.8, 2.9], "on 1-sparse probing only"),
])
def test_describe_says_who_wins_whichever_way_the_numbers_fall(sae_auc, sae_entropy, expected):
    comparison = hand_comparison(sae_auc, [0.7, 0.75, 0.72, 0.71], sae_entropy, [1.5, 1.6, 1.4, 1.7])
    summary = summarise(comparison, 200, seed=0)
    text = describe(comparison, summary, PROFILE, 200, seed=0)
    assert expected in text and "profile planted" in text
    assert f"Highest mean AUC: {'SAE x' if sae_auc[0] == 0.9 else 'PCA'}" in text
    assert ("better than it" in text) == (sae_auc[0] == 0.9)


def test_train_and_held_out_stores_of_different_widths_are_an_error(tmp_path):
    stores = {"train": write_store(tmp_path / "train", torch.randn(10, 3)),
              "mae": write_store(tmp_path / "mae", torch.randn(10, 2))}
    with pytest.raises(ValueError, match="d_in=3.*d_in=2.*one hook"):
        compare([basis(3)], stores, {"train": random_labels(10), "mae": random_labels(10)}, PROFILE, progress=False)
