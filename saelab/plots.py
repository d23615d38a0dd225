"""Figure builders and `save_figure`: every figure names its profile, model and device.

Builders take plain numbers (arrays, DataFrames) and return a `plotly.graph_objects.Figure`
titled with `figure_title`; notebooks display it and call `save_figure(fig, profile, "04_name")`,
which writes `figures/<profile>/04_name.html` (+ `.png` when a static exporter works). Names
follow `NN_name`, NN = the notebook that made the figure. This module sits on floor 2: builders
get numbers, never an SAE run or the analysis (notebooks 03-05 pass their tables in).

HTML files load plotly.js from plotly's CDN (`include_plotlyjs="cdn"`, pinned to the installed
plotly's bundle version): each file stays ~10 KB instead of ~4.6 MB, so figures can be committed.
Pass `plotlyjs="directory"` to write `plotly.min.js` once beside the figures instead, for viewing
without a network. PNGs need kaleido>=1 (a dev extra) and a Chrome/Chromium (Debian:
`apt-get install chromium`, or `plotly_get_chrome`); without them a one-line warning is printed.
"""

from __future__ import annotations

import atexit
import html
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saelab import paths
from saelab.config import Profile, default_device, describe_device

OFFLINE_NOTE = "offline profile: small model trained on docstrings, NOT GPT-2"
RANDOM_LM_NOTE = "offline profile: random-weight model, NOT GPT-2"  # profile.offline_lm == "random"
SYNTHETIC_SOURCE = "synthetic data (no language model, not GPT-2)"  # notebook 05's data comes from no model
_png_state: dict[str, object] = {"warned": False, "server": False}


def _origin(profile: Profile, device: str | None, source: str | None = None) -> str:
    """source: what made the data when it is not the profile's model (notebook 05: synthetic data)."""
    origin = f"profile {profile.name}, {source or profile.model_name}, on {describe_device(device or default_device())}"
    note = RANDOM_LM_NOTE if profile.offline_lm == "random" else OFFLINE_NOTE
    return f"{origin} · {note}" if profile.is_offline and source is None else origin


def caption(text: str, profile: Profile, device: str | None = None, source: str | None = None) -> str:
    """Plain text: '<text> — profile <name>, <model>, on <device>' (+ the offline note)."""
    return f"{text} — {_origin(profile, device, source)}"


def figure_title(text: str, profile: Profile, device: str | None = None, source: str | None = None) -> str:
    """Plotly title: the text, then profile, model (or `source`), device and the offline note, smaller."""
    return f"{text}<br><sup>{_origin(profile, device, source)}</sup>"


def _figure_stem(name: str) -> str:
    stem = name.removesuffix(".html").removesuffix(".png")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", stem):
        raise ValueError(f"figure name {name!r}: use letters, digits, '_', '-' (e.g. '04_feature_density')")
    return stem


def _find_chrome() -> str | None:
    """The browser kaleido would use ($BROWSER_PATH, PATH, typical places, kaleido's download), or None."""
    from choreographer.browsers.chromium import Chromium

    return Chromium.find_browser(skip_local=False)


def _write_png(fig: go.Figure, path: Path) -> bool:
    """PNG through kaleido; any failure (no kaleido, no Chrome) is one warning per session."""
    try:
        import kaleido

        if not _png_state["server"]:  # one Chrome for the whole session: ~0.2 s per PNG instead of ~3 s
            # kaleido's sync server dies in its own thread when there is no browser and the caller then
            # waits forever, so look for one first
            if _find_chrome() is None:
                raise FileNotFoundError("no Chrome/Chromium found")
            kaleido.start_sync_server(silence_warnings=True)
            atexit.register(kaleido.stop_sync_server, silence_warnings=True)
            _png_state["server"] = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "kopts ignored when using a server"
            fig.write_image(path, scale=2)
        return True
    except Exception as err:  # any exporter failure: a missing exporter must never fail a notebook
        if not _png_state["warned"]:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(f"PNG export unavailable ({type(err).__name__}: {reason[:120]}); HTML only. "
                          "For PNGs: pip install 'kaleido>=1' and install Chrome/Chromium.", stacklevel=3)
            _png_state["warned"] = True
        return False


def save_figure(fig: go.Figure, profile: Profile, name: str, *, plotlyjs: str = "cdn",
                png: bool = True) -> list[Path]:
    """Write figures/<profile>/<name>.html (and .png when possible); returns the paths written."""
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    stem = _figure_stem(name)
    written = [out / f"{stem}.html"]
    # a fixed div id (plotly draws a random one) keeps a rerun with the same numbers byte-identical
    fig.write_html(written[0], include_plotlyjs=plotlyjs, full_html=True, div_id=stem)
    if png and _write_png(fig, out / f"{stem}.png"):
        written.append(out / f"{stem}.png")
    return written


def save_html(body: str, profile: Profile, name: str, title: str) -> Path:
    """Write a non-plotly HTML fragment (e.g. highlighted examples) as a standalone page."""
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_figure_stem(name)}.html"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>{body}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------- builders


def density_histogram(frequency: np.ndarray, profile: Profile, device: str | None = None, *,
                      dense_threshold: float = 0.1, bins: int = 50) -> go.Figure:
    """Histogram of log10(firing frequency) per feature; dead (never fired) and dense counted.

    frequency: (d_sae,) fraction of tokens on which each feature fired.
    """
    frequency = np.asarray(frequency, dtype=float)
    alive = frequency[frequency > 0]
    dead, dense = int((frequency == 0).sum()), int((frequency > dense_threshold).sum())
    fig = go.Figure(go.Histogram(x=np.log10(alive), nbinsx=bins, marker_color="#4C78A8", name="features"))
    fig.add_vline(x=np.log10(dense_threshold), line_dash="dash", line_color="#E45756",
                  annotation_text=f"dense (> {dense_threshold:g}): {dense}", annotation_position="top left")
    fig.update_layout(
        title=figure_title(f"Feature density: {len(frequency):,} features, dead (never fired): {dead:,}",
                           profile, device),
        xaxis_title="log10(firing frequency)", yaxis_title="features", bargap=0.05, showlegend=False)
    return fig


def training_curves(history: pd.DataFrame, profile: Profile, device: str | None = None) -> go.Figure:
    """The seed's three charts per epoch: validation loss, reconstruction loss (MSE), sparsity (L0)."""
    panels = [("validation loss", ["val_loss"]), ("reconstruction loss (MSE)", ["train_mse", "val_mse"]),
              ("sparsity: L0 (active latents per token)", ["val_l0"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for title, _ in panels])
    for col, (_, columns) in enumerate(panels, start=1):
        for column in columns:
            fig.add_trace(go.Scatter(x=history["epoch"], y=history[column], name=column, mode="lines+markers"),
                          row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title=figure_title(f"SAE training ({profile.recipe}, {profile.d_in}->{profile.d_sae})",
                                         profile, device), height=380, margin={"t": 110})
    return fig


def recipe_comparison(table: pd.DataFrame, profile: Profile, device: str | None = None) -> go.Figure:
    """FVU against L0, one point per recipe (table index; down-left is better), labelled with CE loss recovered."""
    fig = go.Figure(go.Scatter(
        x=table["l0"], y=table["fvu"], mode="markers+text", marker={"size": 14},
        text=[f"{recipe}<br>CE rec. {ce:.0%}" for recipe, ce in zip(table.index, table["ce_loss_recovered"],
                                                                     strict=True)],
        textposition="top center"))
    fig.update_layout(title=figure_title("Recipes on the same activations: sparsity vs reconstruction", profile,
                                         device), xaxis_title="L0 (active latents per token)",
                      yaxis_title="FVU (fraction of variance unexplained)", margin={"t": 110})
    return fig


def top_features_bar(stats: pd.DataFrame, profile: Profile, device: str | None = None, *,
                     by: str = "total_activation", n: int = 20) -> go.Figure:
    """Bar chart of the n features with the largest `by` column (stats indexed by feature)."""
    top = stats.nlargest(n, by)
    fig = go.Figure(go.Bar(x=[f"f{i}" for i in top.index], y=top[by], marker_color="#4C78A8",
                           customdata=top[["frequency", "max_activation"]].to_numpy(),
                           hovertemplate="%{x}<br>%{y:.4g}<br>freq %{customdata[0]:.3g}"
                                         "<br>max %{customdata[1]:.3g}<extra></extra>"))
    fig.update_layout(title=figure_title(f"Top {len(top)} features by {by.replace('_', ' ')}", profile, device),
                      xaxis_title="feature", yaxis_title=by.replace("_", " "))
    return fig


def logit_attribution_bar(table: pd.DataFrame, feature: int, profile: Profile,
                          device: str | None = None) -> go.Figure:
    """Horizontal bars of the tokens a feature promotes (>0) and suppresses (<0).

    table: columns "token" and "logit" (one row per token), as `analysis.logit_attribution`.
    """
    table = table.sort_values("logit")
    colours = np.where(table["logit"] > 0, "#54A24B", "#E45756")
    labels = [repr(t) for t in table["token"]]
    if "token_id" in table:  # distinct tokens can print alike (e.g. partial UTF-8 bytes as '�')
        labels = [f"{label} #{i}" for label, i in zip(labels, table["token_id"], strict=True)]
    fig = go.Figure(go.Bar(x=table["logit"], y=labels, orientation="h", marker_color=colours))
    fig.update_layout(title=figure_title(f"Feature {feature}: direct logit attribution W_dec[f] @ W_U",
                                         profile, device),
                      xaxis_title="logit change per unit activation", yaxis_title="token",
                      height=max(300, 22 * len(table) + 120))
    return fig


def sweep_figure(results: pd.DataFrame, profile: Profile, device: str | None = None, *,
                 true_l0: float | None = None) -> go.Figure:
    """Notebook 05: MMCS (top row) and L0 (bottom row) against λ or k (log x), a column per recipe, a
    line per d_sae. results: columns recipe, d_sae, knob_value, mmcs, l0 (as `ground_truth.sweep`)."""
    recipes = list(dict.fromkeys(results["recipe"]))
    long = results.melt(id_vars=["recipe", "d_sae", "knob_value"], value_vars=["mmcs", "l0"],
                        var_name="metric", value_name="value")
    long["d_sae"] = long["d_sae"].astype(str)  # discrete colours, one per dictionary size
    title = figure_title(f"Ground-truth recovery: {profile.synth_features} synthetic features in {profile.synth_d} "
                         "dims", profile, device, source=SYNTHETIC_SOURCE)
    fig = px.line(long, x="knob_value", y="value", color="d_sae", facet_row="metric", facet_col="recipe",
                  markers=True, log_x=True, title=title, category_orders={"metric": ["mmcs", "l0"], "recipe": recipes})
    names = {"mmcs": "MMCS (true → learned)", "l0": "L0 (active latents)"}
    fig.for_each_annotation(lambda a: a.update(text=names.get(a.text.split("=")[-1], a.text.split("=")[-1])))
    fig.update_xaxes(matches=None, title_text="")
    for col, recipe in enumerate(recipes, start=1):  # x titles under the bottom row only
        fig.update_xaxes(title_text="k" if recipe == "topk" else "λ (L1 coefficient)", row=1, col=col)
    fig.update_yaxes(matches=None, title_text="")
    fig.update_yaxes(range=[0, 1.05], row=2)  # facet rows count from the bottom: row 2 is mmcs
    # L0 spans orders of magnitude when λ is small: log axis, one range for every panel so the
    # unlabelled panels read off the first column's ticks
    positive_l0 = results["l0"][results["l0"] > 0]
    low, high = positive_l0.min(), max(positive_l0.max(), true_l0 or 0)
    fig.update_yaxes(type="log", range=[math.log10(low) - 0.2, math.log10(high) + 0.2], row=1)
    if true_l0 is not None:
        fig.add_hline(y=true_l0, line_dash="dot", row=1, annotation_text="true L0")
    fig.add_hline(y=1.0, line_dash="dot", row=2)
    fig.update_layout(margin={"t": 110})
    return fig


def highlight_tokens(tokens: list[str], activations: list[float | None], scale: float,
                     mark: int | None = None) -> str:
    """One line of HTML: each token shaded by activation / scale, token `mark` boxed.

    Text is HTML-escaped (a "<script>" token shows as text); newlines show as "↵". A None
    activation (a position the store does not hold, e.g. position 0) is left unshaded, grey.
    """
    spans = []
    for i, (token, act) in enumerate(zip(tokens, activations, strict=True)):
        text = html.escape(token.replace("\n", "↵"))
        if act is None:
            spans.append(f"<span style='color:#999' title='not captured'>{text}</span>")
            continue
        alpha = min(max(act / scale, 0.0), 1.0) if scale > 0 else 0.0
        border = "border:2px solid #d62728;font-weight:bold;" if i == mark else ""
        spans.append(f"<span style='background:rgba(255,127,14,{alpha:.2f});{border}' "
                     f"title='{act:.4g}'>{text}</span>")
    return "<span style='white-space:pre-wrap;font-family:monospace'>" + "".join(spans) + "</span>"


def lm_training_curve(history: pd.DataFrame, unigram_ce: float, profile: Profile, device: str | None = None, *,
                      bar: float | None = None) -> go.Figure:
    """The offline LM's training: held-out and training loss against tokens seen, with the unigram
    baseline (and `bar` x it, the target) as horizontal lines. history: columns tokens, train_loss,
    held_out_loss (as `saelab.lm.training_history`)."""
    fig = go.Figure()
    for column, name in (("held_out_loss", "held-out loss"), ("train_loss", "training loss (mean since last point)")):
        fig.add_trace(go.Scatter(x=history["tokens"], y=history[column], name=name, mode="lines+markers"))
    fig.add_hline(y=unigram_ce, line_dash="dash", line_color="#E45756",
                  annotation_text=f"unigram baseline {unigram_ce:.2f}", annotation_position="top right")
    if bar is not None:
        fig.add_hline(y=bar * unigram_ce, line_dash="dot", line_color="#888",
                      annotation_text=f"{bar:g} x unigram", annotation_position="bottom right")
    fig.update_layout(title=figure_title("Offline language model: next-token loss while it trains", profile, device),
                      xaxis_title="training tokens seen", yaxis_title="cross-entropy (nats/token)",
                      legend={"x": 0.98, "xanchor": "right", "y": 0.98}, margin={"t": 110})
    return fig


def norm_by_position_chart(norms: pd.DataFrame, hook: str, profile: Profile, device: str | None = None) -> go.Figure:
    """Notebook 02: the hook's L2 norm by position, mean and 10-90% band (log y), as
    `saelab.capture.norm_by_position` returns it (columns position, mean_norm, q10, q90)."""
    names = {"mean_norm": "mean", "q90": "90th percentile", "q10": "10th percentile"}
    fig = go.Figure([go.Scatter(x=norms["position"], y=norms[column], name=name, mode="lines",
                                line={"dash": "solid" if column == "mean_norm" else "dot"})
                     for column, name in names.items()])
    fig.update_layout(title=figure_title(f"{hook} norm by position", profile, device), xaxis_title="position",
                      yaxis_title="L2 norm", yaxis_type="log", legend_title_text="over contexts", margin={"t": 110})
    return fig
