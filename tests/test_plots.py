"""Figure builders name profile and device; save_figure writes small HTML, PNG optional."""

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots

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
    assert '<script charset="utf-8" src="plotly.min.js">' in text and first[0].stat().st_size < 50_000  # not embedded
    js = paths.figures_dir(profile) / plots.PLOTLYJS  # shipped once beside the pages: they open offline
    assert js.stat().st_size > 1_000_000 and "cdn.plot.ly/plotly" not in text
    before = js.stat().st_mtime_ns
    plots.save_figure(go.Figure(go.Bar(x=[1], y=[5])), profile, "04_third")
    assert js.stat().st_mtime_ns == before  # written once, not per figure
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


def test_logit_bars_title_and_order():
    profile = load_profile("offline")
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
    table = pd.DataFrame({"l0": [10.0, 4.0], "fvu": [0.2, 0.3], "ce_loss_recovered_pct": [90.0, 75.0]},
                         index=pd.Index(["tied", "topk"], name="architecture"))
    fig = plots.architecture_comparison(table, profile, "cpu")
    assert [trace.name for trace in fig.data] == ["tied: CE rec. 90.0%", "topk: CE rec. 75.0%"]
    assert "profile offline" in fig.layout.title.text


def test_sweep_figure_has_mmcs_and_l0_per_architecture_and_size_and_names_synthetic_data():
    results = pd.DataFrame({"architecture": ["tied", "tied", "topk", "topk"], "d_sae": [8, 16, 8, 16],
                            "knob": ["λ", "λ", "k", "k"], "knob_value": [1e-3, 1e-3, 2, 2],
                            "mmcs": [0.5, 0.6, 0.7, 0.8], "l0": [3.0, 4, 2, 2]})
    offline = load_profile("offline")
    fig = plots.sweep_figure(results, offline, "cpu", true_l0=2.0)
    assert len(fig.data) == 2 * 2 * 2  # metrics x architectures x dictionary sizes, one line each
    labels = {a.text for a in fig.layout.annotations}
    assert {"tied", "topk", "MMCS (true → learned)", "L0 (active latents)"} <= labels
    assert {fig.layout.xaxis.title.text, fig.layout.xaxis2.title.text} == {"λ", "k"}
    title = fig.layout.title.text
    assert f"{offline.synth_features} synthetic features" in title and "profile offline" in title
    assert "synthetic data" in title and "random-weight" not in title  # no model made this data


def test_sweep_figure_draws_the_mean_over_seeds():
    results = pd.DataFrame({"architecture": ["topk"] * 4, "d_sae": [8] * 4, "knob": ["k"] * 4,
                            "knob_value": [2, 2, 4, 4], "seed": [0, 1, 0, 1], "mmcs": [0.5, 0.7, 0.8, 0.9],
                            "l0": [2.0, 2.0, 4.0, 4.0]})
    fig = plots.sweep_figure(results, load_profile("offline"), "cpu")
    mmcs = next(trace for trace in fig.data if list(trace.y) != [2.0, 4.0])
    assert list(mmcs.x) == [2, 4] and list(mmcs.y) == pytest.approx([0.6, 0.85])
    assert fig.layout.showlegend is False and "dictionaries of 8 latents" in fig.layout.title.text  # one size


def test_sweep_figure_keeps_the_legend_for_several_sizes_and_room_for_the_row_titles():
    results = pd.DataFrame({"architecture": ["topk"] * 2, "d_sae": [8, 16], "knob": ["k"] * 2,
                            "knob_value": [2, 2], "mmcs": [0.5, 0.7], "l0": [2.0, 2.0]})
    fig = plots.sweep_figure(results, load_profile("offline"), "cpu")
    assert fig.layout.showlegend is not False and fig.layout.margin.r >= 150
    rows = [a for a in fig.layout.annotations if a.textangle == 90]
    assert rows and all(a.x > 1.0 for a in rows)  # beside the last column, not on it
    assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0  # below, clear of the row titles


def test_interpretability_comparison_shows_each_method_with_its_interval():
    summary = pd.DataFrame({"method": ["PCA", "PCA", "SAE tied", "SAE tied", "dense probe"],
                            "kind": ["baseline", "baseline", "SAE", "SAE", "ceiling"], "k": [1, 2, 1, 2, 64],
                            "auc": [0.6, 0.7, 0.8, 0.85, 0.95], "auc_low": [0.5, 0.6, 0.7, 0.8, 0.94],
                            "auc_high": [0.7, 0.8, 0.9, 0.9, 0.96], "concepts": [40] * 5})
    simulation = pd.DataFrame({"kind": ["baseline", "SAE"], "score": [0.5, 0.7], "score_low": [0.4, 0.6],
                               "score_high": [0.6, 0.8], "directions": [50, 50]},
                              index=pd.Index(["PCA", "SAE tied"], name="method"))
    fig = plots.interpretability_comparison(summary, simulation, load_profile("offline"), "cpu")
    pca, sae, bars = fig.data
    assert (pca.name, list(pca.x), list(pca.y)) == ("PCA", ["1", "2"], [0.6, 0.7])
    assert list(sae.error_y.arrayminus) == pytest.approx([0.1, 0.05]) and sae.line.dash == "solid"
    assert list(bars.x) == ["PCA", "SAE tied"] and list(bars.y) == [0.5, 0.7]
    assert any("dense probe 0.950" in (a.text or "") for a in fig.layout.annotations)  # the ceiling, drawn once
    assert "mean of 40 concepts" in fig.layout.annotations[0].text
    assert "offline" in fig.layout.title.text and "cpu" in fig.layout.title.text


def test_training_curves_have_short_titles_y_titles_and_no_si_ticks():
    history = pd.DataFrame({"epoch": [1, 2], "val_loss": [8e-4, 7e-4], "train_mse": [6e-4, 5e-4],
                            "val_mse": [6.5e-4, 5.5e-4], "val_l0": [30.0, 12.0]})
    fig = plots.training_curves(history, load_profile("offline"), "cpu")
    y_axes = [fig.layout[name] for name in ("yaxis", "yaxis2", "yaxis3")]
    assert all(axis.title.text for axis in y_axes)  # every panel says what its y is
    # each subplot title fits its third of a PNG_WIDTH figure (~9 px per character at plotly's 16 px)
    titles = [a.text for a in fig.layout.annotations]
    assert len(titles) == 3 and all(9 * len(t) < plots.PNG_WIDTH / 3 - 40 for t in titles)
    axes = [fig.layout[k] for k in fig.layout if k.startswith(("xaxis", "yaxis"))]
    assert len(axes) == 6 and all(axis.exponentformat == "power" for axis in axes)  # 8×10⁻⁴, never "800μ"


def test_architecture_comparison_names_close_points_in_the_legend_with_both_floors():
    """At matched L0 the points nearly coincide (topk 32.0 / 0.030, batchtopk 32.0 / 0.029): labels at the
    points would overlap, so each architecture is a legend entry with its own marker."""
    table = pd.DataFrame({"l0": [32.0, 32.0, 30.1], "fvu": [0.030, 0.029, 0.036],
                          "ce_loss_recovered_pct": [99.86, 99.87, 99.81],
                          "ce_loss_recovered_mean_pct": [99.45, 99.43, 99.23]},
                         index=pd.Index(["topk", "batchtopk", "jumprelu"], name="architecture"))
    fig = plots.architecture_comparison(table, load_profile("offline"), "cpu")
    assert [t.name for t in fig.data] == ["topk: CE rec. 99.9% (zero floor), 99.5% (mean floor)",
                                          "batchtopk: CE rec. 99.9% (zero floor), 99.4% (mean floor)",
                                          "jumprelu: CE rec. 99.8% (zero floor), 99.2% (mean floor)"]
    assert len({t.marker.symbol for t in fig.data}) == 3 and all(t.mode == "markers" for t in fig.data)
    (x_lo, x_hi), (y_lo, y_hi) = fig.layout.xaxis.range, fig.layout.yaxis.range
    assert x_lo < 30.1 < 32.0 < x_hi and y_lo < 0.029 < 0.036 < y_hi  # no marker on the frame


def test_saved_numbers_are_rounded_and_noise_does_not_rewrite_a_file():
    profile = load_profile("offline")
    page = paths.figures_dir(profile) / "03_noise.html"

    def save(y):
        return plots.save_figure(go.Figure(go.Scatter(x=np.arange(2), y=np.array(y))), profile, "03_noise", png=False)

    save([0.19943817, 12345.678])
    first = page.read_text()
    assert "[0.1994,12350.0]" in first and "bdata" not in first  # 4 significant digits, as plain text
    save([0.19951, 12344.0])  # another machine's float noise: 0.1994 -> 0.1995
    assert page.read_text() == first
    save([0.25, 12345.678])  # a real change
    assert "[0.25,12350.0]" in page.read_text()
    log = [json.loads(line) for line in (paths.run_dir(profile) / plots.FIGURES_LOG).read_text().splitlines()]
    assert [e["html"] for e in log] == ["written", "kept", "written"]


def test_same_up_to_float_noise():
    assert plots.same_up_to_float_noise("a 0.1994 b [1, 2e-05]", "a 0.1995 b [1, 2.01e-05]")
    assert not plots.same_up_to_float_noise("a 0.1994 b", "a 0.25 b")  # a real change
    assert not plots.same_up_to_float_noise("a 0.1994 b", "a 0.1994 c")  # text changed
    assert not plots.same_up_to_float_noise("[1, 2]", "[1, 2, 3]")


def test_page_shows_a_message_and_the_png_when_plotly_js_cannot_load():
    profile = load_profile("offline")
    page = plots.save_figure(go.Figure(go.Bar(x=[1], y=[2])), profile, "04_fallback", png=False)[0].read_text()
    loader, fallback = page.index("plotly.min.js"), page.index("if (!window.Plotly)")
    plot = page.index("Plotly.newPlot(")
    assert loader < fallback < plot  # runs after plotly.min.js failed to load, before the figure is drawn
    assert "did not load" in page and "04_fallback.png" in page and "No PNG was saved" in page


def fake_exporter(monkeypatch, works: bool):
    def write_image(self, path, **kwargs):
        if not works:
            raise RuntimeError("no Chrome")
        open(path, "wb").write(b"png")

    fake = types.SimpleNamespace(start_sync_server=lambda **kw: None, stop_sync_server=lambda **kw: None)
    monkeypatch.setitem(sys.modules, "kaleido", fake)
    monkeypatch.setattr(plots, "_find_chrome", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(go.Figure, "write_image", write_image)


def test_a_png_never_stays_beside_a_newer_page(monkeypatch, fresh_png_state):
    profile = load_profile("offline")
    png = paths.figures_dir(profile) / "04_stale.png"
    fake_exporter(monkeypatch, works=True)
    assert plots.save_figure(go.Figure(go.Bar(y=[1.0])), profile, "04_stale")[1] == png
    fake_exporter(monkeypatch, works=False)
    kept = plots.save_figure(go.Figure(go.Bar(y=[1.0001])), profile, "04_stale")  # float noise: same figure
    assert kept[1] == png and png.read_bytes() == b"png"
    with pytest.warns(UserWarning, match="no Chrome"):
        written = plots.save_figure(go.Figure(go.Bar(y=[2.0])), profile, "04_stale")  # a new figure, no PNG
    assert written == [paths.figures_dir(profile) / "04_stale.html"] and not png.exists()
    log = [json.loads(line) for line in (paths.run_dir(profile) / plots.FIGURES_LOG).read_text().splitlines()]
    assert [e["png"] for e in log] == ["written", "kept", "removed stale"] and "no Chrome" in log[-1]["reason"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_offline_page_renders_the_message_and_png_in_chromium(tmp_path):
    profile = load_profile("offline")
    page = plots.save_figure(go.Figure(go.Bar(x=[1], y=[2])), profile, "04_chromium", png=False)[0]
    (page.parent / plots.PLOTLYJS).unlink()  # a page copied away from its plotly.min.js
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert "did not load" in dom and "No PNG was saved" in dom


def test_lm_training_curve_draws_both_losses_and_the_baselines():
    history = pd.DataFrame({"step": [0, 10], "tokens": [0, 640], "train_loss": [None, 5.0],
                            "held_out_loss": [6.9, 5.5]})
    fig = plots.lm_training_curve(history, 6.0, load_profile("offline"), "cpu", bar=0.75)
    assert [trace.name for trace in fig.data] == ["held-out loss", "training loss (mean since last point)"]
    assert list(fig.data[0].y) == [6.9, 5.5] and list(fig.data[0].x) == [0, 640]
    assert [shape.y0 for shape in fig.layout.shapes] == [6.0, 4.5]  # unigram, 0.75 x unigram
    curves = {trace.line.color for trace in fig.data}
    assert len(curves) == 2 and not curves & {shape.line.color for shape in fig.layout.shapes}  # told apart
    assert "trained on docstrings" in fig.layout.title.text


def test_norm_by_position_chart_has_readable_legend_names():
    norms = pd.DataFrame({"position": [0, 1], "mean_norm": [9.0, 1.0], "q10": [8.0, 0.5], "q90": [10.0, 2.0]})
    fig = plots.norm_by_position_chart(norms, "blocks.6.hook_resid_pre", load_profile("offline"), "cpu")
    assert [trace.name for trace in fig.data] == ["mean", "90th percentile", "10th percentile"]
    assert list(fig.data[2].y) == [8.0, 0.5] and fig.layout.legend.title.text == "over contexts"
    assert fig.layout.yaxis.type == "log" and "variable" not in fig.to_json()


def test_feature_card_svg_is_valid_xml_with_every_example_and_its_token_boxed():
    import xml.etree.ElementTree as ET

    examples = [([" a", "<b>", "\n"], [0.5, 2.0, None], 1, 2.0), ([" c", " d"], [1.0, 0.0], 0, 1.0)]
    svg = plots.feature_card_svg("Feature 7", "fires on 1% of tokens", examples, 2.0, "offline profile")
    root = ET.fromstring(svg)  # well-formed: a "<b>" token is escaped
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"Feature 7", "<b>", "↵", "\u00a0c", "offline profile"} <= set(texts)  # spaces kept as no-break spaces
    assert svg.count("stroke='#d62728'") == 2  # one boxed token per example
    assert "fill-opacity='0.25'" in svg and "fill-opacity='1.00'" in svg  # shade = activation / scale


def test_readable_axes_label_log_axes_at_powers_of_ten_or_at_each_value():
    fig = make_subplots(rows=1, cols=3)
    fig.add_trace(go.Scatter(x=[0.01, 0.03, 0.1, 0.3, 1], y=[1, 2, 3, 4, 5]), row=1, col=1)  # two decades
    fig.add_trace(go.Scatter(x=[1, 2], y=[10, 1000]), row=1, col=2)
    fig.add_trace(go.Scatter(x=[2, 3, 4], y=[1, 2, 3]), row=1, col=3)  # k = 2, 3, 4 on a log axis
    fig.update_xaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(type="log", row=1, col=3)
    plots.readable_axes(fig)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.yaxis2.dtick == 1  # the log axes spanning decades
    assert list(fig.layout.xaxis3.tickvals) == [2, 3, 4] and fig.layout.xaxis3.dtick is None
    assert fig.layout.xaxis2.dtick is None and fig.layout.yaxis.dtick is None  # linear ones keep plotly's ticks
    fig = plots.readable_axes(go.Figure(go.Scatter(x=[1.5, 2.7], y=[1, 2])).update_xaxes(type="log"))
    assert fig.layout.xaxis.tickvals is None and fig.layout.xaxis.dtick is None  # narrow, not integers: plotly's
    assert fig.layout.xaxis.exponentformat == "power"
