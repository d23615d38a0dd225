"""Feature dashboards: one streaming pass equals brute force; pages are self-contained and complete."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from saelab.config import load_profile
from saelab.features.analysis import max_activating
from saelab.features.cards import FeatureExplorer
from saelab.features.dashboards import dashboard_pass, hash_rows, quantile_values, write_dashboards
from saelab.sae import SAE
from saelab.store import StoreWriter

VOCAB = ["<script>", " a", " b", " c", "\n", " d", " e", " f"]


def build(tmp_path, n_contexts=6, length=8, d_sae=12):
    """Contexts of `length` tokens, rows for positions 1.. (as capture stores them), two shards;
    activations = one-hot(token) + noise, a random SAE: each feature fires on some rows."""
    contexts = [torch.randint(0, len(VOCAB), (length,)).tolist() for _ in range(n_contexts)]
    writer = StoreWriter(tmp_path / "s", model_name="test", hook="blocks.0.hook_resid_pre", d_in=len(VOCAB),
                         dtype="float32")
    for first in (0, n_contexts // 2):
        ids = torch.tensor(contexts[first:first + n_contexts // 2])[:, 1:]  # (contexts, length - 1)
        x = torch.eye(len(VOCAB))[ids.reshape(-1)] + 0.3 * torch.randn(ids.numel(), len(VOCAB))
        index = {"context": torch.arange(first, first + len(ids)).repeat_interleave(length - 1),
                 "position": torch.arange(1, length).repeat(len(ids)), "token_id": ids.reshape(-1)}
        writer.add_shard(x, index, contexts=len(ids))
    store = writer.finish()
    sae = SAE(len(VOCAB), d_sae)
    tokenizer = SimpleNamespace(decode=lambda ids: "".join(VOCAB[i] for i in ids))
    mae = max_activating(sae, store, k=3, progress=False)
    return FeatureExplorer(mae, sae, store, contexts, tokenizer, load_profile("offline"),
                           unembed=torch.randn(len(VOCAB), len(VOCAB)), window=(2, 1))


def brute_window(h, index, row, feature, before=2, after=1):
    """h[row + o, feature] for o in -before..after where that row is the same context at position + o."""
    out = []
    for o in range(-before, after + 1):
        r = row + o
        same = 0 <= r < len(h) and index["context"][r] == index["context"][row] \
            and index["position"][r] == index["position"][row] + o
        out.append(float(h[r, feature]) if same else math.nan)
    return out


def as_list(t):
    return [None if math.isnan(v) else round(v, 5) for v in t.tolist()]


@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])  # 1: one context per chunk; 1000: a shard per chunk
def test_one_pass_equals_brute_force_whatever_the_chunking(tmp_path, chunk_rows):
    explorer = build(tmp_path)
    features, bins, sample = [0, 3, 5], 4, 6
    data = dashboard_pass(explorer, features, bins=bins, sample=sample, chunk_rows=chunk_rows, progress=False)
    h, index = explorer.sae.encode(explorer.store.activations()).detach(), explorer.store.index()
    for i, f in enumerate(features):
        fired = (h[:, f] > 0).nonzero().squeeze(1)
        top = h[:, f].max()
        expected = torch.bincount((h[fired, f] / top * bins).long().clamp(max=bins - 1), minlength=bins)
        assert data.histogram[i].tolist() == expected.tolist() and float(data.edges[i, -1]) == pytest.approx(top)
        hashes = hash_rows(fired, torch.tensor([f]))[:, 0].tolist()
        order = [r for _, r in sorted(zip(hashes, fired.tolist(), strict=True), reverse=True)][:sample]
        assert data.sample_rows[i, :len(order)].tolist() == order  # the fired rows with the largest hash
        assert (data.sample_rows[i, len(order):] == -1).all()
        assert data.sample_values[i, :len(order)].tolist() == pytest.approx(h[order, f].tolist())
        for j, r in enumerate(order):
            assert as_list(data.sample_windows[i, j]) == as_list(torch.tensor(brute_window(h, index, r, f)))
        for j, r in enumerate(explorer.mae.rows[f].tolist()):
            if r >= 0:
                assert as_list(data.top_windows[i, j]) == as_list(torch.tensor(brute_window(h, index, r, f)))


def test_hash_is_a_fixed_spread_of_rows():
    values = hash_rows(torch.arange(4096), torch.tensor([0, 1]))
    assert values.min() >= 0 and values.max() < 2**31
    assert len(set(values[:, 0].tolist())) > 4000  # nearly no collisions
    assert (values[:, 0] != values[:, 1]).float().mean() > 0.99  # another feature, another order
    assert torch.equal(values, hash_rows(torch.arange(4096), torch.tensor([0, 1])))


def test_quantiles_read_off_the_histogram():
    counts, edges = torch.tensor([2, 0, 2]), torch.tensor([0.0, 1.0, 2.0, 3.0])  # firings in [0,1) and [2,3)
    assert quantile_values(counts, edges, [0.0, 0.25, 0.5, 1.0]) == pytest.approx([0.0, 0.5, 1.0, 3.0])


def test_pass_checks_its_input(tmp_path):
    explorer = build(tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        dashboard_pass(explorer, [1, 1], progress=False)
    with pytest.raises(ValueError, match="0..11"):
        dashboard_pass(explorer, [12], progress=False)


def test_pages_are_self_contained_and_show_every_part(tmp_path):
    explorer = build(tmp_path)
    index = write_dashboards(explorer, [3, 0, 5], tmp_path / "dash", per_band=2, sample=8, progress=False)
    pages = {p.name: p.read_text() for p in index.parent.glob("*.html")}
    assert sorted(pages) == ["feature_0.html", "feature_3.html", "feature_5.html", "index.html"]
    assert re.findall(r"href='(feature_\d+)\.html'>feature", pages["index.html"]) == ["feature_3", "feature_0",
                                                                                     "feature_5"]
    for name, page in pages.items():
        assert "<script" not in page and "src=" not in page and "@import" not in page  # no code, nothing fetched
        links = re.findall(r"href='([^']+)'", page)
        assert all((index.parent / link).is_file() for link in links), (name, links)
        assert "trained on docstrings" in page  # the offline caption
    page = pages["feature_3.html"]
    assert "<svg" in page and page.count("<rect") == 40  # the histogram, default 40 bins
    for part in ("Statistics", "fires on", "promoted", "suppressed", "Nearest features", "boxed", "Top 3 activations",
                 "Firings 75%–100%", "Firings 0%–25%"):
        assert part in page, part
    top = int((explorer.mae.rows[3] >= 0).sum())
    assert top < page.count("<code style=") <= top + 4 * 2  # top examples, then at most per_band per quarter
    for band in page.split("Firings ")[1:]:  # within a quarter, the strongest example first
        shown = [float(v) for v in re.findall(r"<code style='[^']*'>([^<]+)</code>", band)]
        assert shown == sorted(shown, reverse=True)


def test_dashboards_leave_the_sae_where_it_was_and_agree_with_the_cpu(tmp_path, device):
    explorer = build(tmp_path)
    expected = dashboard_pass(explorer, [0, 3, 5], bins=4, sample=6, progress=False)
    on_device = FeatureExplorer(explorer.mae, explorer.sae, explorer.store, explorer.contexts, explorer.tokenizer,
                                explorer.profile, unembed=explorer.unembed, device=device, window=(2, 1))
    got = dashboard_pass(on_device, [0, 3, 5], bins=4, sample=6, progress=False)
    assert {p.device.type for p in explorer.sae.parameters()} == {"cpu"}  # encoded on a copy
    assert torch.equal(got.sample_rows, expected.sample_rows)
    assert (expected.sample_rows >= 0).any()  # the comparison is not vacuous


def test_a_rerun_keeps_unchanged_pages_and_removes_stale_ones(tmp_path):
    explorer = build(tmp_path)
    folder = tmp_path / "dash"
    write_dashboards(explorer, [3, 0, 5], folder, progress=False)
    before = (folder / "feature_3.html").read_bytes()
    write_dashboards(explorer, [3, 0], folder, progress=False)
    assert not (folder / "feature_5.html").exists() and (folder / "feature_3.html").read_bytes() != before  # nav
    write_dashboards(explorer, [3, 0], folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["feature_0.html", "feature_3.html", "index.html"]
    write_dashboards(explorer, [], folder, progress=False)  # profile.dashboard_features = 0
    assert sorted(p.name for p in folder.iterdir()) == ["index.html"]
