"""Figure builders and `save_figure`: every figure names its profile, model and device.

Builders take plain numbers (arrays, DataFrames) and return a `plotly.graph_objects.Figure`
titled with `figure_title`; notebooks display it and call `save_figure(fig, profile, "04_name")`,
which writes `figures/<profile>/04_name.html` (+ `.png` when a static exporter works). Names
follow `NN_name`, NN = the notebook that made the figure. This module sits on floor 2: builders
get numbers, never an SAE run or the analysis (notebooks 03-05 pass their tables in).

HTML files load plotly.js from `plotly.min.js`, written once beside them from the installed plotly
(`include_plotlyjs="directory"`): every page opens offline, from file://, and each stays small. If that
file is missing, a page says so and shows the PNG saved beside it. `plotlyjs="cdn"` loads it from
plotly's CDN instead. PNGs need kaleido>=1 (a dev extra) and a Chrome/Chromium, which kaleido does not
bring: `plotly_get_chrome` downloads one without root; without it a one-line warning names what is
missing, and a PNG left from an earlier figure is removed rather than left stale beside the new page.
Figures that must always have an image (the README's) are SVG written here in pure Python
(`feature_card_svg`): no browser needed.

Files to share are stable across machines: numbers stored in a figure are rounded to
SIGNIFICANT_DIGITS, and a file whose new text differs from the one on disk only by numbers within
FLOAT_NOISE (relative) is left as it is, so rerunning the workbook elsewhere does not rewrite
committed figures with float noise. Each write is logged in runs/<profile>/figures.log for the
workbook's summary.
"""

from __future__ import annotations

import atexit
import base64
import html
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from saelab import paths
from saelab.config import Profile, default_device, describe_device

OFFLINE_NOTE = "offline profile: small model trained on docstrings, NOT GPT-2"
RANDOM_LM_NOTE = "offline profile: random-weight model, NOT GPT-2"  # profile.offline_lm == "random"
SYNTHETIC_SOURCE = "synthetic data (no language model, not GPT-2)"  # notebook 05's data comes from no model
_png_state: dict[str, object] = {"warned": False, "server": False, "reason": None}
SIGNIFICANT_DIGITS = 4  # numbers stored in saved figures: what a hover shows, and no float noise beyond it
FLOAT_NOISE = 0.01  # a saved file is kept when its numbers all change by less than this, relatively
PNG_WIDTH = 1000  # px (x2 scale) when the figure sets no width: plotly's 700 squeezes subplots and labels
FIGURES_LOG = "figures.log"  # runs/<profile>/figures.log: one JSON line per file written, for `make workbook`
PLOTLYJS = "plotly.min.js"  # written once into each figures folder: the pages need no network


def png_hint() -> str:
    """What to install for PNGs, from what is missing here (kaleido, or the Chrome it drives)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return ("For PNGs: pip install 'kaleido>=1', then run plotly_get_chrome (it downloads Chrome for kaleido, "
                "no root needed); the HTML figures need neither.")
    return ("For PNGs: kaleido is installed but finds no Chrome/Chromium; run .venv/bin/plotly_get_chrome "
            "(downloads one for kaleido, no root needed) or set BROWSER_PATH to an installed Chrome; "
            "the HTML figures need neither.")


def _origin(profile: Profile, device: str | None, source: str | None = None) -> str:
    """source: what made the data when it is not the profile's model (notebook 05: synthetic data)."""
    origin = f"profile {profile.name}, {source or profile.model_name}, on {describe_device(device or default_device())}"
    if profile.sae_path and source is None:  # notebook 04 on an SAE from elsewhere: say which one
        origin += f", SAE {Path(profile.sae_path).name}"
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
            fig.write_image(path, scale=2, width=fig.layout.width or PNG_WIDTH)
        return True
    except Exception as err:  # any exporter failure: a missing exporter must never fail a notebook
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _png_state["reason"] = f"{type(err).__name__}: {reason[:120]}"
        if not _png_state["warned"]:
            warnings.warn(f"PNG export unavailable ({_png_state['reason']}); HTML only. {png_hint()}",
                          stacklevel=3)
            _png_state["warned"] = True
        return False


def round_numbers(value, digits: int = SIGNIFICANT_DIGITS):
    """A copy of a figure dict (as `fig.to_plotly_json()`) with every float rounded to `digits`
    significant digits; plotly's base64 arrays ({"dtype", "bdata"}) become plain lists."""
    if isinstance(value, dict) and "bdata" in value and "dtype" in value:
        array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
        return round_numbers(array.tolist(), digits)
    if isinstance(value, dict):
        return {k: round_numbers(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_numbers(v, digits) for v in value]
    if isinstance(value, np.ndarray):
        return round_numbers(value.tolist(), digits)
    if isinstance(value, (float, np.floating)):
        return float(f"{value:.{digits}g}")
    return value


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def same_up_to_float_noise(old: str, new: str, rtol: float = FLOAT_NOISE) -> bool:
    """True when the two texts are equal but for numbers that differ by less than rtol, relatively."""
    old_parts, new_parts = _NUMBER.split(old), _NUMBER.split(new)
    if old_parts != new_parts:
        return False
    return all(a == b or abs(float(a) - float(b)) <= rtol * max(abs(float(a)), abs(float(b)))
               for a, b in zip(_NUMBER.findall(old), _NUMBER.findall(new), strict=True))


def write_if_changed(path: Path, text: str) -> bool:
    """Write `text` to `path` (atomically) unless the file there already says the same up to float
    noise; returns True when it wrote. Keeps committed figures byte-stable across machines."""
    path = Path(path)
    if path.is_file() and same_up_to_float_noise(path.read_text(encoding="utf-8"), text):
        return False
    with paths.writing(f"the page {path.name}", path.parent, kept="Figures and pages already written are kept",
                       then="rerun the cell"):  # a full disk or a read-only folder: a message, not a traceback
        paths.replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return True


def log_figure(profile: Profile, name: str, **what) -> None:
    """Append one line to runs/<profile>/figures.log (`make workbook` summarises it at the end).
    what: html="written" | "kept", png="written" | "kept" | "none" | "removed stale" | "-" (no PNG kind)."""
    log = paths.run_dir(profile) / FIGURES_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"file": name, **what}) + "\n")


_LOADER = re.compile(r"<script[^>]*\bsrc=\"[^\"]*plotly[^\"]*\.js\"[^>]*></script>")


def offline_fallback(stem: str) -> str:
    """A script for right after plotly.js' <script src>: if plotly.js did not load (no network), each
    figure's div says so and shows `<stem>.png` (or says that no PNG was saved) instead of a blank page."""
    message = (f"<p style='font:14px sans-serif;color:#444'>This interactive figure needs plotly.js ({PLOTLYJS} "
               f"beside this page, or cdn.plot.ly), which did not load. Its static image, {stem}.png, follows; "
               f"copy {PLOTLYJS} from the figures folder beside the page for the interactive figure.</p>")
    missing = "No PNG was saved beside this page: saelab makes one only where kaleido finds Chrome."
    image = (f"<img src='{stem}.png' alt='{stem}' style='max-width:100%' "
             f"onerror='this.replaceWith({json.dumps(missing)})'>")
    return ("<script>if (!window.Plotly) {  // plotly.js did not load: show the message and the PNG instead\n"
            "  window.Plotly = {newPlot: function (id) {\n"
            "    var div = document.getElementById(id);\n"
            "    div.style.height = 'auto'; div.parentNode.style.height = 'auto';\n"
            f"    div.innerHTML = {json.dumps(message + image)};\n"
            "    return Promise.resolve(div);\n  }};\n}</script>")


def figure_html(fig: go.Figure, stem: str, plotlyjs: str | bool = "directory") -> str:
    """The standalone page `save_figure` writes: numbers rounded, a fixed div id (a rerun with the same
    numbers is byte-identical) and, when plotly.js is loaded from a file, the offline fallback."""
    page = pio.to_html(round_numbers(fig.to_plotly_json()), include_plotlyjs=plotlyjs, full_html=True,
                       div_id=stem, validate=False)
    loader = _LOADER.search(page)
    return page if loader is None else page[:loader.end()] + offline_fallback(stem) + page[loader.end():]


def write_plotlyjs(directory: Path) -> Path:
    """`directory`/plotly.min.js, the installed plotly's bundle, (re)written only when missing or different."""
    from plotly.offline import get_plotlyjs

    path, text = Path(directory) / PLOTLYJS, get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(text.encode()) or path.read_text(encoding="utf-8") != text:
        paths.replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def save_figure(fig: go.Figure, profile: Profile, name: str, *, plotlyjs: str = "directory",
                png: bool = True) -> list[Path]:
    """Write figures/<profile>/<name>.html (+ <name>.png when an exporter works); returns the files
    that now hold this figure (the HTML, then the PNG if there is one).

    The HTML is left untouched when it already shows this figure up to float noise (and so is its
    PNG); when it is rewritten and no PNG can be made (png=False, or no kaleido/Chrome), an older
    PNG of that name is deleted, so a PNG beside a page always shows the same figure. plotlyjs:
    "directory" (default: plotly.min.js written once beside the pages, which then open offline), "cdn"
    (loaded from the network) or True (embedded in the page, ~4.6 MB).
    """
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    stem = _figure_stem(name)
    page, image = out / f"{stem}.html", out / f"{stem}.png"
    if plotlyjs == "directory":
        write_plotlyjs(out)
    rewrote = write_if_changed(page, figure_html(fig, stem, plotlyjs))
    if png and (rewrote or not image.is_file()) and _write_png(fig, image):
        png_status = "written"
    elif image.is_file() and rewrote:
        image.unlink()  # made from an earlier figure: never leave it beside the new page
        png_status = "removed stale"
    else:
        png_status = "kept" if image.is_file() else "none"
    log_figure(profile, page.name, html="written" if rewrote else "kept", png=png_status,
         reason=None if png_status in ("written", "kept") or not png else _png_state["reason"])
    return [page, image] if image.is_file() else [page]


def save_html(body: str, profile: Profile, name: str, title: str) -> Path:
    """Write a non-plotly HTML fragment (e.g. highlighted examples) as a standalone page
    figures/<profile>/<name>.html; returns its path. Unchanged up to float noise: not rewritten."""
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_figure_stem(name)}.html"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>{body}</body></html>")
    log_figure(profile, path.name, html="written" if write_if_changed(path, page) else "kept", png="-")
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
    return readable_axes(fig)


def readable_axes(fig: go.Figure) -> go.Figure:
    """Tick labels a reader of a shared figure can read: 0.0008 as 8×10⁻⁴, never plotly's SI '800μ'; and on
    each log axis either labels at powers of ten only, when its data span a decade or more (plotly also
    labels 2 and 5 between them, which crams a narrow facet until its labels overlap), or, on a narrower
    one, a label at each value plotted when they are at most 6 integers (k = 2, 3, 4, not 2.5 and 3.5)."""
    fig.update_xaxes(exponentformat="power")
    fig.update_yaxes(exponentformat="power")
    for letter in "xy":
        for key in [k for k in fig.layout.to_plotly_json() if k.startswith(f"{letter}axis")]:
            axis = fig.layout[key]
            if axis.type != "log":
                continue
            ref = letter + key.removeprefix(f"{letter}axis")  # layout "xaxis2" is trace axis "x2"
            data = [pd.to_numeric(pd.Series(getattr(trace, letter)), errors="coerce") for trace in fig.data
                    if (getattr(trace, f"{letter}axis", None) or letter) == ref and getattr(trace, letter) is not None]
            values = sorted({float(v) for column in data for v in column if v > 0})  # NaN > 0 is False
            if values and values[-1] >= 10 * values[0]:
                axis.update(dtick=1)
            elif 0 < len(values) <= 6 and all(v.is_integer() for v in values):  # e.g. k of a TopK sweep
                axis.update(tickvals=values)
    return fig


def padded_range(values, low: float = 0.1, high: float = 0.1) -> list[float]:
    """[min - low * span, max + high * span] of `values` (span >= 1e-3 x max |value|): room for labels."""
    values = np.asarray(values, dtype=float)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    span = max(hi - lo, 1e-3 * max(abs(lo), abs(hi), 1e-12))
    return [lo - low * span, hi + high * span]


def training_curves(history: pd.DataFrame, profile: Profile, device: str | None = None) -> go.Figure:
    """The seed's three charts per epoch: validation loss, reconstruction loss (MSE), sparsity (L0).
    history: one row per epoch, columns epoch, val_loss, train_mse, val_mse, val_l0 (as `train_sae`)."""
    panels = [("validation loss", "loss (MSE + sparsity term)", ["val_loss"]),
              ("reconstruction MSE", "MSE per activation element", ["train_mse", "val_mse"]),
              ("sparsity (L0)", "active latents per token", ["val_l0"])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[title for title, _, _ in panels], horizontal_spacing=0.1)
    for col, (_, y_title, columns) in enumerate(panels, start=1):
        for column in columns:
            fig.add_trace(go.Scatter(x=history["epoch"], y=history[column], name=column, mode="lines+markers"),
                          row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
        fig.update_yaxes(title_text=y_title, row=1, col=col)
    fig.update_layout(title=figure_title(f"SAE training ({profile.sae.architecture}, {profile.d_in}->{profile.d_sae})",
                                         profile, device), height=420, margin={"t": 120},
                      legend={"orientation": "h", "y": -0.25, "x": 0.5, "xanchor": "center"})
    return readable_axes(fig)


def architecture_comparison(table: pd.DataFrame, profile: Profile, device: str | None = None) -> go.Figure:
    """FVU against L0, one marker per architecture (table index; down-left is better), named in the legend with
    its CE loss recovered (column ce_loss_recovered_pct, and ce_loss_recovered_mean_pct when there: the
    mean-ablation floor). A legend, not labels at the points: at matched L0 the points sit close together."""
    fig = go.Figure()
    symbols = ["circle", "square", "diamond", "triangle-up", "x", "star", "cross", "hexagon"]
    for i, (name, row) in enumerate(table.iterrows()):
        ce = f"CE rec. {row['ce_loss_recovered_pct']:.1f}%"
        if "ce_loss_recovered_mean_pct" in row:
            ce += f" (zero floor), {row['ce_loss_recovered_mean_pct']:.1f}% (mean floor)"
        fig.add_trace(go.Scatter(x=[row["l0"]], y=[row["fvu"]], mode="markers", name=f"{name}: {ce}",
                                 marker={"size": 14, "symbol": symbols[i % len(symbols)]}, cliponaxis=False))
    fig.update_layout(title=figure_title("Architectures on the same activations: sparsity vs reconstruction", profile,
                                         device), xaxis_title="L0 (active latents per token)",
                      yaxis_title="FVU (fraction of variance unexplained)", margin={"t": 110, "r": 60},
                      legend={"title": {"text": "architecture (down-left is better)"}})
    fig.update_xaxes(range=padded_range(table["l0"], 0.25, 0.25))
    fig.update_yaxes(range=padded_range(table["fvu"], 0.15, 0.15))
    return readable_axes(fig)


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
    return readable_axes(fig)


def sweep_figure(results: pd.DataFrame, profile: Profile, device: str | None = None, *,
                 true_l0: float | None = None) -> go.Figure:
    """Notebook 05: MMCS (top row) and L0 (bottom row) against each architecture's sparsity knob (log x),
    a column per architecture, a line per d_sae. results: columns architecture, d_sae, knob, knob_value,
    mmcs, l0 (as `ground_truth.sweep`); with several seeds, each point is their mean."""
    architectures = list(dict.fromkeys(results["architecture"]))
    results = results.groupby(["architecture", "d_sae", "knob", "knob_value"], sort=False)[["mmcs", "l0"]].mean()
    results = results.reset_index()
    long = results.melt(id_vars=["architecture", "d_sae", "knob_value"], value_vars=["mmcs", "l0"],
                        var_name="metric", value_name="value")
    long["d_sae"] = long["d_sae"].astype(str)  # discrete colours, one per dictionary size
    title = figure_title(f"Ground-truth recovery: {profile.synth_features} synthetic features in {profile.synth_d} "
                         "dims", profile, device, source=SYNTHETIC_SOURCE)
    fig = px.line(long, x="knob_value", y="value", color="d_sae", facet_row="metric", facet_col="architecture",
                  markers=True, log_x=True, title=title,
                  category_orders={"metric": ["mmcs", "l0"], "architecture": architectures})
    names = {"mmcs": "MMCS (true → learned)", "l0": "L0 (active latents)"}
    fig.for_each_annotation(lambda a: a.update(text=names.get(a.text.split("=")[-1], a.text.split("=")[-1])))
    fig.update_xaxes(matches=None, title_text="")
    knobs = results.drop_duplicates("architecture").set_index("architecture")["knob"]
    for col, architecture in enumerate(architectures, start=1):  # x titles under the bottom row only
        fig.update_xaxes(title_text=knobs[architecture], row=1, col=col)
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
    sizes = long["d_sae"].unique()
    if len(sizes) == 1:  # one dictionary size: a one-entry legend says less than the title can
        fig.update_layout(showlegend=False, title_text=f"{title}<br><sup>dictionaries of {sizes[0]} latents</sup>")
    # the facet row titles stand right of the last column, the legend below the plot: neither covers the other
    fig.update_layout(margin={"t": 110, "r": 150, "b": 110}, legend={"orientation": "h", "yanchor": "top",
                                                                     "y": -0.12, "x": 0, "title": {"text": "d_sae"}})
    fig.for_each_annotation(lambda a: a.update(x=a.x + 0.03) if a.textangle == 90 else None)
    return readable_axes(fig)


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


def interpretability_comparison(summary: pd.DataFrame, simulation: pd.DataFrame, profile: Profile,
                                device: str | None = None) -> go.Figure:
    """Notebook 06: methods side by side. Left, k-sparse probing: mean held-out ROC AUC over the concepts
    against k, with 95% intervals from resampling held-out documents, and the dense probe as the ceiling;
    right, simulation scoring: mean correlation over each method's sampled directions, 95% interval.
    SAEs in colour, baselines in grey.

    summary: columns method, kind, k, auc, auc_low, auc_high, concepts (as `probing.summarise`);
    simulation: indexed by method, columns kind, score, score_low, score_high, directions
    (as `probing.simulation_summary`).
    """
    sae_colours = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2"]
    grey = ["#9D9D9D", "#6F6F6F", "#BDBDBD", "#4A4A4A", "#D0D0D0"]
    kind = dict(zip(summary["method"], summary["kind"], strict=True))
    methods = [m for m in kind if kind[m] != "ceiling"]
    saes, bases = iter(sae_colours * 4), iter(grey * 4)
    colour = {m: next(saes) if kind[m] == "SAE" else next(bases) for m in methods}
    concepts = int(summary["concepts"].max()) if len(summary) else 0
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, column_widths=[0.58, 0.42], subplot_titles=[
        f"k-sparse probing: held-out ROC AUC<br>mean of {concepts} concepts, 95% CI over held-out documents",
        f"simulation scoring: correlation<br>mean of {int(simulation['directions'].max()) if len(simulation) else 0} "
        "random live directions, 95% CI"])
    for m in methods:
        rows = summary[summary["method"] == m].sort_values("k")
        fig.add_trace(go.Scatter(
            x=rows["k"].astype(str), y=rows["auc"], mode="lines+markers", name=m, legendgroup=m,
            line={"color": colour[m], "dash": "solid" if kind[m] == "SAE" else "dot"},
            error_y={"type": "data", "symmetric": False, "array": rows["auc_high"] - rows["auc"],
                     "arrayminus": rows["auc"] - rows["auc_low"]},
            hovertemplate=f"{m}, k=%{{x}}: %{{y:.3f}}<extra></extra>"), row=1, col=1)
    ceiling = summary[summary["kind"] == "ceiling"]
    if len(ceiling):
        fig.add_hline(y=float(ceiling["auc"].iloc[0]), line_dash="dash", line_color="#222", row=1, col=1,
                      annotation_text=f"dense probe {float(ceiling['auc'].iloc[0]):.3f}",
                      annotation_position="bottom right")
    shown = [m for m in simulation.index if m in colour]
    fig.add_trace(go.Bar(
        x=shown, y=simulation.loc[shown, "score"], marker_color=[colour[m] for m in shown], opacity=0.85,
        showlegend=False, error_y={"type": "data", "symmetric": False,
                                   "array": simulation.loc[shown, "score_high"] - simulation.loc[shown, "score"],
                                   "arrayminus": simulation.loc[shown, "score"] - simulation.loc[shown, "score_low"]},
        hovertemplate="%{x}: %{y:.3f}<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="k (directions per probe)", type="category", row=1, col=1)
    fig.update_yaxes(title_text="ROC AUC (higher = better probe)", row=1, col=1)
    fig.update_yaxes(title_text="correlation (simulated vs true activation)", row=1, col=2)
    fig.update_annotations(font_size=13)
    fig.update_layout(title=figure_title("SAE features against other directions, scored without an LM judge",
                                         profile, device),
                      width=1200, height=560, margin={"t": 130}, legend={"orientation": "h", "y": -0.22})
    return fig


def lm_training_curve(history: pd.DataFrame, unigram_ce: float, profile: Profile, device: str | None = None, *,
                      bar: float | None = None) -> go.Figure:
    """The offline LM's training: held-out and training loss against tokens seen, with the unigram
    baseline (and `bar` x it, the target) as horizontal lines. history: columns tokens, train_loss,
    held_out_loss (as `saelab.data.lm.training_history`)."""
    fig = go.Figure()
    for column, name, colour in (("held_out_loss", "held-out loss", "#4C78A8"),
                                 ("train_loss", "training loss (mean since last point)", "#72B7B2")):
        fig.add_trace(go.Scatter(x=history["tokens"], y=history[column], name=name, mode="lines+markers",
                                 line={"color": colour}))
    # the baselines in grey and black, never a loss curve's colour
    fig.add_hline(y=unigram_ce, line_dash="dash", line_color="#333",
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
    `saelab.data.capture.norm_by_position` returns it (columns position, mean_norm, q10, q90)."""
    names = {"mean_norm": "mean", "q90": "90th percentile", "q10": "10th percentile"}
    fig = go.Figure([go.Scatter(x=norms["position"], y=norms[column], name=name, mode="lines",
                                line={"dash": "solid" if column == "mean_norm" else "dot"})
                     for column, name in names.items()])
    fig.update_layout(title=figure_title(f"{hook} norm by position", profile, device), xaxis_title="position",
                      yaxis_title="L2 norm", yaxis_type="log", legend_title_text="over contexts", margin={"t": 110})
    return fig


# ---------------------------------------------------------------- an image that needs no browser
_CHAR_PX = 7.2  # width of one character of 12 px monospace (DejaVu Sans Mono: 0.6 em)


def _svg_text(x: float, y: float, text: str, size: int = 12, **attributes) -> str:
    extra = "".join(f" {k.replace('_', '-')}='{v}'" for k, v in attributes.items())
    return f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}'{extra}>{html.escape(text)}</text>"


def feature_card_svg(title: str, subtitle: str, examples: list[tuple[list[str], list[float | None], int, float]],
                     scale: float, caption: str, width: int = 900) -> str:
    """A feature card as a standalone SVG: title, a line of statistics, and one line per example with each
    token shaded by activation / scale (as `highlight_tokens`), the example's token boxed. Pure Python, so
    an image is written wherever the workbook runs (no browser; GitHub shows it in a README).

    examples: (tokens, activations (None = not captured), index of the example's token, activation) each."""
    line_h, top = 24, 70
    notes = caption.split(" · ")  # the origin, then the offline note, on lines of their own
    height = top + line_h * max(len(examples), 1) + 12 + 16 * len(notes)
    parts = [f"<rect width='{width}' height='{height}' fill='white'/>",
             _svg_text(12, 24, title, 17, font_weight="bold"), _svg_text(12, 46, subtitle, 12, fill="#444")]
    for i, (tokens, acts, mark, value) in enumerate(examples):
        y = top + i * line_h
        parts.append(_svg_text(12, y + 15, f"{value:.3g}", 11, fill="#555", font_family="monospace"))
        x = 70.0
        for j, (token, act) in enumerate(zip(tokens, acts, strict=True)):
            text = token.replace("\n", "↵").replace(" ", "\u00a0")  # no-break spaces: SVG collapses spaces
            w = _CHAR_PX * len(text)
            if x + w > width - 12:
                parts.append(_svg_text(x, y + 15, "…", 12, fill="#999", font_family="monospace"))
                break
            if act is not None and scale > 0 and act > 0:
                parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='20' "
                             f"fill='rgb(255,127,14)' fill-opacity='{min(act / scale, 1.0):.2f}'/>")
            if j == mark:
                parts.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='20' fill='none' "
                             "stroke='#d62728' stroke-width='2'/>")
            parts.append(_svg_text(x, y + 15, text, 12, font_family="monospace", fill="#999" if act is None else "#222",
                                   font_weight="bold" if j == mark else "normal"))
            x += w
    for i, note in enumerate(notes):
        parts.append(_svg_text(12, height - 12 - 16 * (len(notes) - 1 - i), note, 11, fill="#666"))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
            f"viewBox='0 0 {width} {height}' font-family='sans-serif' role='img' aria-label='{html.escape(title)}'>"
            + "".join(parts) + "</svg>\n")


def save_svg(svg: str, profile: Profile, name: str) -> Path:
    """Write figures/<profile>/<name>.svg (unchanged up to float noise: not rewritten); returns its path."""
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{_figure_stem(name)}.svg"
    log_figure(profile, path.name, html="written" if write_if_changed(path, svg) else "kept", png="-")
    return path
