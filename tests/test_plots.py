"""Figure builders name profile and device; save_figure writes small HTML, PNG optional."""

import sys
import types

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from saelab import paths, plots
from saelab.config import load_profile


@pytest.fixture
def fresh_png_state(monkeypatch):
    monkeypatch.setattr(plots, "_png_state", {"warned": False, "server": False})


def test_titles_name_profile_device_and_offline_origin():
    offline, gpt2 = load_profile("offline"), load_profile("gpt2")
    title = plots.figure_title("Density", offline, "cpu")
    assert "offline" in title and "cpu" in title and "trained on docstrings" in title and "NOT GPT-2" in title
    assert "random-weight" in plots.figure_title("Density", offline.replace(offline_lm="random"), "cpu")
    assert "NOT GPT-2" not in plots.figure_title("Density", gpt2, "cuda")
    fig = plots.density_histogram(np.array([0.0, 0.0, 0.5, 0.01, 0.2]), offline, "cpu", dense_threshold=0.1)
    assert "dead (never fired): 2" in fig.layout.title.text and "offline" in fig.layout.title.text
    assert fig.data[0].x.tolist() == pytest.approx(np.log10([0.5, 0.01, 0.2]).tolist())  # dead left out
    assert "dense (> 0.1): 2" in fig.layout.annotations[0].text


def test_save_figure_writes_small_html_and_warns_once_without_png(monkeypatch, fresh_png_state):
    monkeypatch.setitem(sys.modules, "kaleido", None)  # as if kaleido were not installed
    profile = load_profile("offline")
    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    with pytest.warns(UserWarning, match="PNG export unavailable") as caught:
        first = plots.save_figure(fig, profile, "04_test")
        second = plots.save_figure(fig, profile, "04_again.html")
    assert len(caught) == 1  # one line per session, not one per figure
    assert first == [paths.figures_dir(profile) / "04_test.html"]
    assert second == [paths.figures_dir(profile) / "04_again.html"]
    text = first[0].read_text()
    assert "cdn.plot.ly" in text and first[0].stat().st_size < 50_000  # plotly.js not embedded
    with pytest.raises(ValueError, match="figure name"):
        plots.save_figure(fig, profile, "../escape")


def test_save_figure_writes_png_when_an_exporter_works(monkeypatch, fresh_png_state):
    fake = types.SimpleNamespace(start_sync_server=lambda **kw: None, stop_sync_server=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "kaleido", fake)
    monkeypatch.setattr(plots, "_find_chrome", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(go.Figure, "write_image", lambda self, path, **kw: open(path, "wb").write(b"png"))
    written = plots.save_figure(go.Figure(), load_profile("offline"), "04_png")
    assert [p.suffix for p in written] == [".html", ".png"] and written[1].read_bytes() == b"png"


def test_no_browser_warns_without_starting_kaleido(monkeypatch, fresh_png_state):
    # kaleido's server thread dies without a browser and write_image then waits forever: never start it
    def must_not_start(**kwargs):
        raise AssertionError("kaleido server started without a browser")

    fake = types.SimpleNamespace(start_sync_server=must_not_start, stop_sync_server=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "kaleido", fake)
    monkeypatch.setattr(plots, "_find_chrome", lambda: None)
    with pytest.warns(UserWarning, match="no Chrome/Chromium found"):
        written = plots.save_figure(go.Figure(), load_profile("offline"), "04_nobrowser")
    assert [p.suffix for p in written] == [".html"]


def test_highlight_escapes_text_and_marks_the_max_token():
    out = plots.highlight_tokens(["<script>", "alert(1)", "</script>", "\n"], [0.5, 2.0, None, 0.0], 2.0, mark=1)
    assert "<script>" not in out and "&lt;script&gt;" in out and "&lt;/script&gt;" in out
    assert "↵" in out and "not captured" in out
    assert out.count("border:2px") == 1 and "rgba(255,127,14,1.00);border" in out


def test_bar_builders_title_and_order():
    profile = load_profile("offline")
    stats = pd.DataFrame({"total_activation": [1.0, 5.0, 3.0], "frequency": [0.1, 0.2, 0.3],
                          "max_activation": [1.0, 2.0, 3.0]})
    fig = plots.top_features_bar(stats, profile, "cpu", n=2)
    assert list(fig.data[0].x) == ["f1", "f2"] and "profile offline" in fig.layout.title.text
    table = pd.DataFrame({"token": ["a", "b"], "logit": [0.5, -0.2]})
    fig = plots.logit_attribution_bar(table, 3, profile, "cpu")
    assert list(fig.data[0].y) == ["'b'", "'a'"] and "Feature 3" in fig.layout.title.text
    table = pd.DataFrame({"token": ["�", "�"], "token_id": [7, 9], "logit": [0.5, -0.2]})
    assert list(plots.logit_attribution_bar(table, 3, profile, "cpu").data[0].y) == ["'�' #9", "'�' #7"]


def test_offline_titles_and_a_rerun_give_the_same_html():
    """A fixed div id: saving the same figure twice writes identical bytes (committed figures stay clean)."""
    profile = load_profile("offline")
    def build() -> go.Figure:  # as a notebook rerun does: a fresh figure from the same numbers
        return go.Figure(go.Bar(x=[1, 2], y=[3, 4]), layout={"title": plots.figure_title("Bars", profile, "cpu")})

    first = plots.save_figure(build(), profile, "01_bars", png=False)[0].read_bytes()
    second = plots.save_figure(build(), profile, "01_bars", png=False)[0].read_bytes()
    assert first == second and b"01_bars" in first and b"NOT GPT-2" in first


def test_training_builders_name_profile_and_show_each_column():
    profile = load_profile("offline")
    history = pd.DataFrame({"epoch": [1, 2], "val_loss": [2.0, 1.0], "train_mse": [1.5, 0.8],
                            "val_mse": [1.6, 0.9], "val_l0": [30.0, 12.0]})
    fig = plots.training_curves(history, profile, "cpu")
    assert [trace.name for trace in fig.data] == ["val_loss", "train_mse", "val_mse", "val_l0"]
    assert "NOT GPT-2" in fig.layout.title.text and "cpu" in fig.layout.title.text
    table = pd.DataFrame({"l0": [10.0, 4.0], "fvu": [0.2, 0.3], "ce_loss_recovered": [0.9, 0.75]},
                         index=pd.Index(["tied_l1", "topk"], name="recipe"))
    fig = plots.recipe_comparison(table, profile, "cpu")
    assert list(fig.data[0].text) == ["tied_l1<br>CE rec. 90%", "topk<br>CE rec. 75%"]
    assert "profile offline" in fig.layout.title.text


def test_sweep_figure_has_mmcs_and_l0_per_recipe_and_size_and_names_synthetic_data():
    results = pd.DataFrame({"recipe": ["tied_l1", "tied_l1", "topk", "topk"], "d_sae": [8, 16, 8, 16],
                            "knob_value": [1e-3, 1e-3, 2, 2], "mmcs": [0.5, 0.6, 0.7, 0.8], "l0": [3.0, 4, 2, 2]})
    offline = load_profile("offline")
    fig = plots.sweep_figure(results, offline, "cpu", true_l0=2.0)
    assert len(fig.data) == 2 * 2 * 2  # metrics x recipes x dictionary sizes, one line each
    labels = {a.text for a in fig.layout.annotations}
    assert {"tied_l1", "topk", "MMCS (true → learned)", "L0 (active latents)"} <= labels
    title = fig.layout.title.text
    assert f"{offline.synth_features} synthetic features" in title and "profile offline" in title
    assert "synthetic data" in title and "random-weight" not in title  # no model made this data


def test_lm_training_curve_draws_both_losses_and_the_baselines():
    history = pd.DataFrame({"step": [0, 10], "tokens": [0, 640], "train_loss": [None, 5.0],
                            "held_out_loss": [6.9, 5.5]})
    fig = plots.lm_training_curve(history, 6.0, load_profile("offline"), "cpu", bar=0.75)
    assert [trace.name for trace in fig.data] == ["held-out loss", "training loss (mean since last point)"]
    assert list(fig.data[0].y) == [6.9, 5.5] and list(fig.data[0].x) == [0, 640]
    assert [shape.y0 for shape in fig.layout.shapes] == [6.0, 4.5]  # unigram, 0.75 x unigram
    assert "trained on docstrings" in fig.layout.title.text


def test_norm_by_position_chart_has_readable_legend_names():
    norms = pd.DataFrame({"position": [0, 1], "mean_norm": [9.0, 1.0], "q10": [8.0, 0.5], "q90": [10.0, 2.0]})
    fig = plots.norm_by_position_chart(norms, "blocks.6.hook_resid_pre", load_profile("offline"), "cpu")
    assert [trace.name for trace in fig.data] == ["mean", "90th percentile", "10th percentile"]
    assert list(fig.data[2].y) == [8.0, 0.5] and fig.layout.legend.title.text == "over contexts"
    assert fig.layout.yaxis.type == "log" and "variable" not in fig.to_json()
