"""Feature cards rebuild each example's context from the token rows behind the store."""

from types import SimpleNamespace

import pytest
import torch

from saelab.config import load_profile
from saelab.features.analysis import max_activating
from saelab.features.cards import FeatureExplorer, feature_card, read_rows
from saelab.sae import SAE
from saelab.store import StoreWriter

VOCAB = ["<script>", " a", " b", " c", "\n", " d"]


def build(tmp_path, contexts, exclude_first=True):
    """Store one row per (context, position >= 1) with x = one-hot of the token id."""
    writer = StoreWriter(tmp_path / "s", model_name="test", hook="blocks.0.hook_resid_pre", d_in=len(VOCAB),
                         dtype="float32")
    for c, ids in enumerate(contexts):  # one shard per context, as capture writes them in order
        positions = torch.arange(1 if exclude_first else 0, len(ids))
        tokens = torch.tensor(ids)[positions]
        writer.add_shard(torch.eye(len(VOCAB))[tokens] * (1 + positions[:, None].float()),
                         {"context": torch.full_like(positions, c), "position": positions, "token_id": tokens},
                         contexts=1)
    store = writer.finish()
    sae = SAE(len(VOCAB), len(VOCAB))
    with torch.no_grad():  # feature f = "token f is here", scaled by position + 1
        sae.W_enc.copy_(torch.eye(len(VOCAB)))
        sae.b_enc.zero_()
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(VOCAB[i] for i in ids))
    mae = max_activating(sae, store, k=2, progress=False)
    return FeatureExplorer(mae, sae, store, contexts, tokenizer, load_profile("offline"), window=(2, 1))


def test_read_rows_reads_across_shards(tmp_path):
    explorer = build(tmp_path, [[1, 2, 3], [4, 5, 1]])
    rows = torch.tensor([3, 0, 2])
    assert torch.equal(read_rows(explorer.store, rows), explorer.store.activations()[rows])


def test_examples_map_rows_to_context_and_position(tmp_path):
    explorer = build(tmp_path, [[1, 2, 3, 2], [4, 2, 1, 5]])
    ex = explorer.examples(2)  # token 2 at (0,1) act 2, (0,3) act 4, (1,1) act 2: top 2 = (0,3), (0,1)
    assert ex[["context", "position", "activation"]].values.tolist() == [[0, 3, 4.0], [0, 1, 2.0]]
    assert explorer.examples(0).empty  # token 0 never occurs: no example, not a fake one


def test_highlighted_context_escapes_script_tokens_and_marks_max(tmp_path):
    explorer = build(tmp_path, [[4, 0, 3, 1], [2, 2, 2, 2]])  # "\n<script> c a"
    out = explorer.highlight(0)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "not captured" in out  # position 0 is not in the store: shown, unshaded
    assert out.count("border:2px") == 1


def test_feature_card_renders_and_checks_its_input(tmp_path):
    explorer = build(tmp_path, [[1, 2, 3, 4], [3, 3, 5, 1]])
    explorer.unembed = torch.eye(len(VOCAB))
    card = feature_card(3, explorer)
    page = card._repr_html_()
    assert "Feature 3" in page and "offline" in page and "trained on docstrings" in page
    assert "firing_pct" in page and "frequency" not in page  # one unit per quantity, as the tables
    assert repr(card).startswith("Feature 3: fires on ")
    assert " a b« c»↵" in repr(card)  # a terminal shows each example in its context, the token in «»
    assert "promoted: ' c'" in repr(card)
    assert card.logits.iloc[0]["token"] == " c"  # feature 3's direction promotes token 3 most
    with pytest.raises(ValueError, match="out of range"):
        feature_card(99, explorer)
    explorer.contexts = [[1, 2, 3, 4], [3, 1, 5, 1]]  # token data changed after capture
    with pytest.raises(ValueError, match="changed after capture"):
        explorer.highlight(3)


def test_public_names_resolve_lazily():
    import saelab
    from saelab import plots
    from saelab.features import analysis

    assert saelab.feature_card is feature_card and saelab.FeatureExplorer is FeatureExplorer
    assert saelab.max_activating is analysis.max_activating and saelab.save_figure is plots.save_figure
    from saelab.features import dashboards

    assert saelab.load_sae is analysis.load_sae and saelab.write_dashboards is dashboards.write_dashboards


def test_cards_on_device_equal_cpu_and_leave_the_sae_where_it_was(tmp_path, device):
    """One-hot activations and an identity encoder: exact on every device, so the pages must be equal."""
    contexts = [[1, 2, 3, 2], [4, 2, 1, 5]]
    explorer = build(tmp_path, contexts)
    explorer.unembed = torch.eye(len(VOCAB))
    on_device = FeatureExplorer(explorer.mae, explorer.sae, explorer.store, contexts, explorer.tokenizer,
                                explorer.profile, unembed=explorer.unembed.to(device), device=device, window=(2, 1))
    for feature in range(len(VOCAB)):
        assert on_device.highlight(feature) == explorer.highlight(feature)
        # equal logits may differ by an ulp between devices (reduction order), so ties can swap places
        expected = explorer.logits(feature).assign(logit=lambda t: t["logit"].round(5))
        got = on_device.logits(feature).assign(logit=lambda t: t["logit"].round(5))
        assert sorted(map(tuple, got.to_numpy())) == sorted(map(tuple, expected.to_numpy()))
    assert {p.device.type for p in explorer.sae.parameters()} == {"cpu"}  # the encoder copy went, not the SAE
    assert explorer.highlight(2).count("border:2px") == 2  # two examples shown: the comparison is not vacuous
    assert FeatureExplorer(explorer.mae, explorer.sae, explorer.store, contexts, explorer.tokenizer,
                           explorer.profile).device == "cpu"  # no device: where the SAE lives


def test_examples_table_prints_each_context_in_a_terminal_and_highlights_it_in_a_notebook(tmp_path):
    explorer = build(tmp_path, [[1, 2, 3, 2], [4, 2, 1, 5]])
    table = explorer.table(2)
    assert table.frame["text"].tolist() == [" b c« b»", " a« b» c"]  # window (2, 1) around (0, 3) and (0, 1)
    text = repr(table)
    assert "feature 2: top examples" in text and " b c« b»" in text and "trained on docstrings" in text
    assert table._repr_html_().count("border:2px") == 2
    with pytest.raises(ValueError, match="out of range"):
        explorer.table(6)


def test_card_svg_shows_each_top_example_in_context(tmp_path):
    import xml.etree.ElementTree as ET

    explorer = build(tmp_path, [[1, 2, 3, 2], [4, 2, 1, 5]])
    svg = explorer.svg(2, note="ranked by token purity")
    texts = [t.text for t in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    assert "Feature 2: top 2 examples in context" in texts and any("ranked by token purity" in t for t in texts)
    assert svg.count("stroke='#d62728'") == 2 and texts.count("\u00a0b") == 3  # " b c« b»" and " a« b» c"
