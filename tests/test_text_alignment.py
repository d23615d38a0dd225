"""Token purity and position spread (saelab.features.analysis) by hand, and the random-weight twin through the
same pipeline (saelab.studies.random_twin)."""

import math

import pandas as pd
import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import paths
from saelab.data import capture, lm
from saelab.features.analysis import alignment_summary, max_activating, position_spread, text_alignment, token_purity
from saelab.sae import SAE
from saelab.store import StoreWriter
from saelab.studies import random_twin

ROWS = torch.tensor([[0, 1, 2], [3, -1, -1], [-1, -1, -1]])  # 3 features' top examples; -1 = none


def test_token_purity_by_hand():
    token_ids = torch.tensor([7, 7, 9, 5])  # rows 0, 1 hold token 7
    purity = token_purity(ROWS, token_ids)
    assert purity[:2].tolist() == pytest.approx([2 / 3, 1.0]) and math.isnan(purity[2])


def test_position_spread_by_hand():
    positions = torch.tensor([1, 3, 5, 2])
    spread = position_spread(ROWS, positions)  # positions 1, 3, 5: variance (4 + 0 + 4) / 3
    assert spread[:2].tolist() == pytest.approx([math.sqrt(8 / 3), 0.0]) and math.isnan(spread[2])


class Letters:
    def decode(self, ids):
        return "".join(chr(ord("a") + i) for i in ids)


def test_a_token_feature_and_a_position_feature_through_max_activating(tmp_path):
    """Feature 0 fires on token 7 wherever it stands; feature 1 fires at position 2 whatever the token."""
    token_ids = torch.tensor([7, 1, 2, 3, 4, 7, 5, 7, 6, 8, 7, 9])
    positions = torch.arange(12) % 4 + 1  # contexts of 4 rows, positions 1..4
    x = torch.stack([(token_ids == 7).float() * (1 + torch.arange(12) / 100),
                     (positions == 2).float() * (1 + torch.arange(12) / 100)], dim=1)  # (12, 2)
    writer = StoreWriter(tmp_path, model_name="test", hook="blocks.0.hook_resid_pre", d_in=2, dtype="float32")
    writer.add_shard(x, {"context": torch.arange(12) // 4, "position": positions, "token_id": token_ids}, contexts=3)
    sae = SAE(2, 2)
    with torch.no_grad():  # h = relu(x)
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
    mae = max_activating(sae, writer.finish(), k=3, progress=False)
    table = text_alignment(mae, [0, 1], Letters())
    # feature 0: rows 10, 7, 5 (token 7 at positions 3, 4, 2); feature 1: rows 9, 5, 1 (tokens 8, 7, 1 at position 2)
    assert table["token_purity"].tolist() == pytest.approx([1.0, 1 / 3])
    assert table.loc[0, "position_spread"] == pytest.approx(math.sqrt(2 / 3)) and table.loc[1, "position_spread"] == 0
    assert table["top_token"].tolist() == ["h", "b"]  # feature 1: a three-way tie, the smallest id
    assert table["examples"].tolist() == [3, 3]


def test_alignment_summary_averages_each_model():
    trained = pd.DataFrame({"token_purity": [1.0, 0.5], "position_spread": [4.0, 2.0]})
    random = pd.DataFrame({"token_purity": [0.2], "position_spread": [0.0]})
    summary = alignment_summary({"trained": trained, "random": random})
    assert summary["trained"].tolist() == [2, 0.75, 3.0] and summary["random"].tolist() == [1, 0.2, 0.0]


def test_capture_in_memory_equals_the_store_notebook_02_writes(tiny):
    model = lm.load_lm(tiny, "cpu")
    store = capture.capture_activations(tiny, "mae", "cpu", lm=model, progress=False)
    ids = torch.tensor(capture.load_tokens(tiny, "mae")["input_ids"], dtype=torch.int64)
    activations, index = random_twin.capture_in_memory(model, ids, tiny.hook, batch_size=3)
    assert torch.equal(activations, store.activations())
    assert all(torch.equal(index[k], v) for k, v in store.index().items())


def test_random_twin_alignment_scores_its_top_features(tiny):
    model = lm.load_lm(tiny, "cpu")
    table = random_twin.random_twin_alignment(tiny, model)
    assert 0 < len(table) <= tiny.mae_top_features and table.index.name == "feature"
    assert table["token_purity"].between(0, 1).all() and (table["position_spread"] >= 0).all()
    assert (table["examples"] <= tiny.mae_top_k).all()


def test_the_twins_sae_is_searched_to_the_target_l0_and_reported(tiny):
    """The twin SAE's λ comes from the same search as notebook 03's (kept in memory: no run folder is
    written), its held-out L0 is reported beside the table; with target_l0 0 the profile's λ is kept."""
    profile = tiny.replace(target_l0=12.0, l1_coefficient=0.05)
    table = random_twin.random_twin_alignment(profile, lm.load_lm(profile, "cpu"))
    search = table.attrs["search"]
    closest = min(search["probes"], key=lambda p: abs(math.log(p[1] / 12.0)))
    assert search["value"] == closest[0] and search["l0"] == closest[1]
    assert table.attrs["l0"] > 0 and table.attrs["target_l0"] == 12.0 and 0 <= table.attrs["fvu"]
    assert not paths.sae_dir(profile).exists()  # notebook 03's runs are not touched
    plain = random_twin.random_twin_alignment(tiny.replace(target_l0=0.0), lm.load_lm(tiny, "cpu"))
    assert plain.attrs["search"] is None and plain.attrs["l0"] > 0
