"""Notebook 06's scores on data where the answer is known, and against SAEBench's rule and probe."""

import math

import numpy as np
import pytest
import torch
from planted import PROFILE, write_store
from saebench_copy import top_k_mean_diff, train_sklearn_probe
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from saelab.sae import SAE
from saelab.studies import planted
from saelab.studies.baselines import LinearDirections, SAEDirections
from saelab.studies.probing import (
    DENSE,
    balanced_sample,
    bootstrap_auc,
    bootstrap_mean,
    correlation,
    decide,
    describe,
    differences,
    evaluate,
    logistic_regression,
    placement_sums,
    resample_weights,
    simulation_difference,
    simulation_summary,
    split_documents,
    summarise,
    token_entropy,
)

CONCEPTS3 = {f"c{i}": ("token", f"concept {i}") for i in range(3)}
SMALL = PROFILE.replace(interp_ks=(1, 2), interp_min_positives=5, interp_held_out_share=0.4, interp_probe_rows=40,
                        interp_top_directions=3, interp_document_groups=10, interp_bootstrap=100)


def basis(d: int, name: str = "residual basis") -> LinearDirections:
    return LinearDirections(name, torch.eye(d), torch.zeros(d))


def test_selection_and_probe_match_saebench_on_the_same_tensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=generator)
    y = torch.rand(400, 3, generator=generator) < torch.tensor([0.3, 0.2, 0.5])
    x[:, 1] += 1.5 * y[:, 0]  # concept 0 reads on dims 1 and 3, concept 1 on dim 4, concept 2 on nothing
    x[:, 3] -= 0.8 * y[:, 0]
    x[:, 4] += 2.0 * y[:, 1]
    store = write_store(tmp_path / "s", x, shard_rows=64)
    sae = SAE(5, 6)
    methods = [basis(5), SAEDirections("SAE", sae)]
    evaluation = evaluate(methods, {"s": store}, {"s": y}, SMALL, progress=False, concepts=CONCEPTS3)
    split = split_documents({"s": store}, SMALL.interp_held_out_share, SMALL.seed, SMALL.interp_document_groups)
    train, held = torch.nonzero(~split.held_out).squeeze(1), split.held_out
    samples = balanced_sample(y, train, SMALL.interp_probe_rows, SMALL.seed)
    checked = 0
    for method in methods:
        acts = method.encode(x).detach()
        for c, concept in enumerate(CONCEPTS3):
            for k in SMALL.interp_ks:
                keep = top_k_mean_diff(acts[train], y[train, c], k)  # SAEBench selects on the training rows
                probe = train_sklearn_probe(acts[samples[c]][:, keep], y[samples[c], c].numpy())
                expected = roc_auc_score(y[held, c].numpy(), probe.decision_function(acts[held][:, keep].numpy()))
                row = evaluation.probing.set_index(["method", "concept", "k"]).loc[(method.name, concept, k)]
                assert sorted(row["directions"].split(" ")[1::2]) == sorted(str(j) for j in keep.tolist())
                assert row["auc"] == pytest.approx(expected, abs=2e-3)  # lbfgs stops at tol 1e-4; Newton converges
                checked += 1
    assert checked == 12
    auc = evaluation.probing.set_index(["method", "concept", "k"])["auc"]
    assert auc["residual basis", "c1", 1] > 0.8 and abs(auc["residual basis", "c2", 2] - 0.5) < 0.15


def test_newton_probes_equal_scikit_learns_logistic_regression():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 200, 4, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0])  # unscaled, as SAEBench
    y = torch.rand(3, 200, generator=generator) < torch.sigmoid(x[:, :, 0] + 0.2 * x[:, :, 1])
    weight = torch.ones(3, 200)
    weight[2, 150:] = 0  # padding: problem 2 has 150 rows
    coef, intercept = logistic_regression(x, y, weight)
    for p, n in ((0, 200), (1, 200), (2, 150)):
        reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x[p, :n].double().numpy(),
                                                                            y[p, :n].numpy())
        assert coef[p].numpy() == pytest.approx(reference.coef_[0], abs=1e-5)
        assert float(intercept[p]) == pytest.approx(reference.intercept_[0], abs=1e-5)


def test_placements_give_the_auc_and_its_document_resamples():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 40, (3000,), generator=generator).float()  # many ties
    labels = torch.rand(3000, generator=generator) < 0.2 + 0.01 * scores  # informative: AUC ~0.7
    group = torch.randint(0, 30, (3000,), generator=generator)
    auc, parts = placement_sums(scores, labels, group, 30)
    assert auc == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert parts[1].sum() == labels.sum() and parts[3].sum() == (~labels).sum()
    assert float(bootstrap_auc(torch.tensor(auc), parts, torch.ones(1, 30))[0]) == pytest.approx(auc)  # no resampling
    weights = resample_weights(30, 5, seed=0)
    assert weights.sum(1).tolist() == [30.0] * 5
    for w, resampled in zip(weights, bootstrap_auc(torch.tensor(auc), parts, weights), strict=True):
        rows = torch.repeat_interleave(torch.arange(3000), w[group].long())  # each group's rows, w times over
        exact = roc_auc_score(labels[rows].numpy(), scores[rows].numpy())
        assert float(resampled) == pytest.approx(exact, abs=3e-3)  # first order: the rest is O(1 / rows)


def test_documents_are_held_out_whole_seeded_and_in_groups(tmp_path):
    stores = {"a": write_store(tmp_path / "a", torch.randn(100, 2)),
              "b": write_store(tmp_path / "b", torch.randn(50, 2))}
    split = split_documents(stores, 0.4, seed=3, groups=4)  # 20 + 10 documents of 5 rows
    assert (split.n_documents, split.n_held_out_documents, split.n_groups) == (30, 12, 4)
    held = split.held_out.view(-1, 5)
    assert ((held.all(1)) | (~held.any(1))).all() and int(held[:, 0].sum()) == 12  # a document is on one side
    assert (split.group[~split.held_out] == -1).all() and set(split.group[split.held_out].tolist()) == {0, 1, 2, 3}
    assert torch.equal(split.held_out, split_documents(stores, 0.4, seed=3).held_out)
    assert not torch.equal(split.held_out, split_documents(stores, 0.4, seed=4).held_out)
    with pytest.raises(ValueError, match="leaves one side empty"):
        split_documents(stores, 0.01, seed=0)


def test_balanced_samples_draw_equal_classes_from_the_rows_given():
    labels = torch.zeros(100, 2, dtype=torch.bool)
    labels[:10, 0] = True
    labels[:70, 1] = True
    rows = torch.arange(20, 100)  # concept 0 has no positive here, concept 1 has 50 of 80
    first, second = balanced_sample(labels, rows, per_class=40, seed=0)
    assert len(first) == 0
    assert len(second) == 60 and int(labels[second, 1].sum()) == 30 and set(second.tolist()) <= set(rows.tolist())


@pytest.fixture(scope="module")
def planted_runs(tmp_path_factory):
    sizes = PROFILE.replace(interp_bootstrap=200, interp_chunk_rows=500, interp_held_out_share=0.5)
    problem = planted.planted_problem(tmp_path_factory.mktemp("planted"), sizes)
    methods = planted.methods_for(problem)
    stores = {"planted": problem.store}
    run = {name: evaluate(methods, stores, {"planted": y}, problem.profile, progress=False,
                          concepts=planted.CONCEPTS)
           for name, y in (("true", problem.labels), ("shuffled", planted.shuffled(problem.labels, seed=1)))}
    return problem, run


def test_a_planted_sae_probes_perfectly_and_the_residual_basis_does_not(planted_runs):
    _, run = planted_runs
    auc = run["true"].probing.set_index(["method", "concept", "k"])["auc"]
    features = [f"feature {f}" for f in range(1, 5)]
    assert all(auc["SAE planted", c, 1] == 1.0 for c in features)
    assert min(auc["residual basis", c, 1] for c in features) < 0.99


def test_a_union_concept_is_found_by_a_dense_direction_and_split_by_the_sae(planted_runs):
    problem, run = planted_runs
    auc = run["true"].probing.set_index(["method", "concept", "k"])["auc"]
    assert auc[DENSE, "union 5|6", problem.profile.d_in] > 0.999
    assert auc["SAE planted", "union 5|6", 1] < 0.9 and auc["SAE planted", "union 5|6", 2] == 1.0
    picked = run["true"].probing.query("method == 'SAE planted' and concept == 'union 5|6' and k == 2")
    assert sorted(picked["directions"].iloc[0].split(" ")[1::2]) == ["4", "5"]  # features 5 and 6, 0-based


def test_a_planted_sae_simulates_perfectly_with_one_token_per_feature(planted_runs):
    _, run = planted_runs
    summary = simulation_summary(run["true"], 200, seed=0)
    assert summary.at["SAE planted", "score"] == pytest.approx(1.0) and summary.at["SAE planted", "entropy"] == 0.0
    assert summary.at["residual basis", "score"] < 0.95 and summary.at["residual basis", "entropy"] > 0.5
    d, low, high = simulation_difference(run["true"], "SAE planted", "random", 200, seed=0)
    assert low > 0


def test_intervals_separate_the_planted_sae_from_random_directions(planted_runs):
    _, run = planted_runs
    table = differences(run["true"], "SAE planted", 2).set_index("baseline")
    assert table.at["random", "low"] > 0  # random directions need more than 2 to read a feature
    summary = summarise(run["true"]).set_index(["method", "k"])
    assert summary.at[("SAE planted", 2), "auc_low"] == 1.0


def test_shuffled_labels_score_chance_and_claim_no_win(planted_runs):
    _, run = planted_runs
    mean = run["shuffled"].probing.groupby(["method", "k"])["auc"].mean()
    # 3,000 held-out rows, ~250 positives per concept: a chance AUC's SD is ~0.02, a mean of 5 ~0.01
    assert mean.sub(0.5).abs().max() < 0.04
    for k in (1, 2, 5, 20):
        assert not (differences(run["shuffled"], "SAE planted", k)["low"] > 0).any()
    text = describe(run["shuffled"], planted_runs[0].profile)
    probing_lines = [line for line in text.split("\n") if line.startswith("k = ")]
    assert len(probing_lines) == 4 and not any("better than" in line for line in probing_lines)
    assert "the claim is reproduced" not in text  # simulation ignores labels: the SAE still simulates best


def test_describe_reports_the_call_whichever_way_it_falls(planted_runs):
    problem, run = planted_runs
    text = describe(run["true"], problem.profile)
    # at k = 1 the union concept is split by the planted SAE, so a dense baseline wins there
    assert "k = 1: SAE planted" in text and "worse than" in text.split("\n")[0]
    assert "simulation: SAE planted mean correlation 1.000" in text and "better than it." in text.split("\n")[-2]
    assert "refuted" in text and f"profile {problem.profile.name}" in text
    assert [decide(0.1, 0.2), decide(-0.2, -0.1), decide(-0.1, 0.1)] == ["more", "less", "undecided"]


def test_token_entropy_and_correlation_by_hand():
    assert token_entropy([5, 5, 5]) == 0.0 and token_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert correlation(torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6])) == pytest.approx(1.0)
    assert correlation(torch.tensor([1.0, 1, 1]), torch.tensor([2.0, 4, 6])) == 0.0  # a constant predicts nothing


def test_bootstrap_mean():
    assert bootstrap_mean([0.7] * 5, 100, seed=0) == pytest.approx((0.7, 0.7, 0.7))
    values = np.random.default_rng(1).normal(size=30)
    mean, low, high = bootstrap_mean(values, 500, seed=0)
    assert low < mean < high and (mean, low, high) == bootstrap_mean(values, 500, seed=0)
    assert all(math.isnan(v) for v in bootstrap_mean([], 10, seed=0))


def test_stores_of_different_widths_are_an_error(tmp_path):
    stores = {"train": write_store(tmp_path / "train", torch.randn(10, 3)),
              "mae": write_store(tmp_path / "mae", torch.randn(10, 2))}
    labels = {name: torch.zeros(10, 3, dtype=torch.bool) for name in stores}
    with pytest.raises(ValueError, match="d_in=2.*d_in=3.*one hook"):
        evaluate([basis(3)], stores, labels, SMALL, progress=False, concepts=CONCEPTS3)


def test_moving_directions_never_moves_the_callers_sae():
    sae = SAE(3, 4)
    features = SAEDirections("SAE", sae)
    assert features.to("cpu").sae is sae  # already there: no copy
    moved = features.to("meta")  # elsewhere: a copy there
    assert moved.sae is not sae and moved.sae.W_enc.device.type == "meta" and sae.W_enc.device.type == "cpu"
    assert features.sae is sae


def test_no_scorable_concept_is_an_error_that_says_what_to_change(tmp_path):
    store = write_store(tmp_path / "s", torch.randn(50, 3))
    labels = torch.zeros(50, 3, dtype=torch.bool)
    labels[:3] = True  # 3 positives in all: fewer than 5 on each side
    with pytest.raises(ValueError, match="no concept has 5 positives.*smaller interp_min_positives"):
        evaluate([basis(3)], {"s": store}, {"s": labels}, SMALL, progress=False, concepts=CONCEPTS3)
