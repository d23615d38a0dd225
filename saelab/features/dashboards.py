"""Feature dashboards: one static HTML page per feature and an index to browse them (notebook 04).

    features = analysis.specific_features(mae, profile.dashboard_features).index.tolist()
    index = dashboards.write_dashboards(explorer, features, paths.figures_dir(profile) / "dashboards",
                                        ranking="token purity among sparse features")

A page holds the feature's statistics, its activation histogram, its top examples (all that the MAE pass
kept: run it with k >= TOP_EXAMPLES) and examples from each activation quartile, strongest first, with
their contexts shaded token by token under a legend (`cards.example_html`), the
tokens its decoder direction promotes and suppresses, and its nearest features by decoder cosine
(after the sae_vis / Neuronpedia dashboards). Pages are self-contained (inline CSS and SVG, no
script, no link off the folder): they open from file:// with no network.

`dashboard_pass` makes ONE streaming pass over the store for all chosen features. Each chunk is
encoded on the device and merged into running tensors: a histogram of each feature's positive
activations over [0, its max] (the max from the MAE pass), a uniform sample of the rows where it
fires (the rows with the largest hash(row, feature): a fixed pseudo-random order, so the sample does
not depend on chunking or device), and the activations in the context window of each sampled and
each top example. Chunks end at context boundaries, so every window lies in its chunk. Memory:
O(chunk_rows x d_sae + N x (bins + (sample + k) x window)), never O(tokens).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line

from saelab import plots
from saelab.features.analysis import RunningTopK, logit_attribution, token_text, top_logit_tokens
from saelab.features.cards import FeatureExplorer, example_html, logit_html
from saelab.tables import number

_LOW = (1 << 32) - 1  # low 32 bits of a sample key hold the store row
_M31 = (1 << 31) - 1
TOP_EXAMPLES = 10  # top examples a dashboard shows (sae_vis shows 10 or more); run max_activating with k >= this
QUANTILE_BANDS = ((0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25))  # shares of a feature's firings
BAND_COLOURS = ("#d62728", "#ff7f0e", "#2ca02c", "#1f77b4")  # one per band, in the histogram and headings


@dataclass
class DashboardData:
    """What `dashboard_pass` gathers, one row per chosen feature (N of them)."""

    features: list[int]
    histogram: torch.Tensor  # (N, bins) int64: positive activations per bin of [0, max]
    edges: torch.Tensor  # (N, bins + 1) float32 bin edges
    sample_rows: torch.Tensor  # (N, sample) int64 store rows where the feature fired; -1 = none
    sample_values: torch.Tensor  # (N, sample) float32 the feature's activation there
    sample_windows: torch.Tensor  # (N, sample, window) activations at positions -before..after; NaN: not stored
    top_windows: torch.Tensor  # (N, k, window) the same for the MAE top examples (explorer.mae.rows)
    window: tuple[int, int]  # (before, after) tokens around each example


def hash_rows(rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(R,) rows x (N,) features -> (R, N) int64 pseudo-random values in [0, 2^31), the same on every
    device (integer mixing in the style of splitmix; every product stays below 2^63)."""
    x = ((rows[:, None] & _M31) * 0x9E3779B1 + features[None, :] * 0x85EBCA77 + 1) & _M31
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


def _windows(h: torch.Tensor, local: torch.Tensor, context: torch.Tensor, position: torch.Tensor,
             window: tuple[int, int]) -> torch.Tensor:
    """h (R, N); local (s, N) chunk rows -> (s, N, W): h[local + o, f] for o in -before..after when that
    row holds the same context at position + o, else NaN."""
    offsets = torch.arange(-window[0], window[1] + 1, device=h.device)  # (W,)
    rows = local[..., None] + offsets  # (s, N, W)
    inside = (rows >= 0) & (rows < h.shape[0])
    rows = rows.clamp(0, h.shape[0] - 1)
    same = inside & (context[rows] == context[local][..., None])
    same &= position[rows] == position[local][..., None] + offsets
    feature = torch.arange(h.shape[1], device=h.device)[None, :, None]
    values = h.reshape(-1)[rows * h.shape[1] + feature]  # h[rows, f] without an (s, N, R) copy
    return torch.where(same, values, torch.nan)


@torch.no_grad()
def dashboard_pass(explorer: FeatureExplorer, features: list[int], *, bins: int = 40, sample: int = 32,
                   chunk_rows: int = 4096, exclude_token_ids: set[int] | None = None,
                   progress: bool = True) -> DashboardData:
    """One streaming pass over explorer.store for `features`: histograms, a uniform sample of firing
    rows and the context windows of sampled and top examples (see the module docstring).

    Encodes on explorer.device (the explorer's SAE, or a copy of it there: the caller's SAE is not
    moved). bins: histogram bins over [0, max]; sample: rows kept per feature (all of them when it
    fires less often); chunk_rows: rows encoded at once. exclude_token_ids as in
    `analysis.max_activating` (pass the same ones).
    """
    if not features or len(set(features)) != len(features):
        raise ValueError(f"features={features!r}: give one or more distinct feature ids")
    if not all(0 <= f < explorer.sae.d_sae for f in features):
        raise ValueError(f"features must lie in 0..{explorer.sae.d_sae - 1} (the SAE's d_sae)")
    if min(bins, sample, chunk_rows) < 1:
        raise ValueError(f"bins={bins}, sample={sample}, chunk_rows={chunk_rows}: each must be >= 1")
    if explorer.store.n_rows >= _LOW:
        raise ValueError(f"{explorer.store.n_rows} rows exceed the 2^32 rows a sample key can number; split the store")
    device, mae = torch.device(explorer.device), explorer.mae
    sae = explorer.sae_on_device()
    feats = torch.tensor(features, device=device)
    n, width = len(features), sum(explorer.window) + 1
    maxes = mae.values[features, 0].to(device)  # (N,) from the MAE pass
    counts = torch.zeros(n * bins, dtype=torch.int64, device=device)
    top_rows = mae.rows[features].to(device)  # (N, k)
    top_windows = torch.full((*top_rows.shape, width), torch.nan, device=device)  # (N, k, W)
    running = RunningTopK(sample, n, device, values=((), 0.0), windows=((width,), torch.nan))
    excluded = torch.tensor(sorted(exclude_token_ids or []), dtype=torch.int64)
    for chunk in explorer.store.chunks(chunk_rows, device, whole_contexts=True, progress=progress, desc="dashboards"):
        h = sae.encode(chunk.activations)[:, feats]  # (R, N)
        h[torch.isin(chunk.index["token_id"], excluded).to(device)] = 0.0  # excluded tokens never fire
        context, position = (chunk.index[f].to(device) for f in ("context", "position"))
        fired = h > 0
        bin_of = (h / maxes.clamp_min(1e-30) * bins).long().clamp_(0, bins - 1)  # (R, N)
        counts += torch.bincount((bin_of + torch.arange(n, device=device) * bins)[fired], minlength=n * bins)
        rows = torch.arange(chunk.first_row, chunk.first_row + len(h), device=device)
        keys = torch.where(fired, (hash_rows(rows, feats) << 32) | rows[:, None], -1)
        running.update(keys, lambda best, h=h, context=context, position=position: {
            "values": h.gather(0, best), "windows": _windows(h, best, context, position, explorer.window)})
        local = top_rows - chunk.first_row  # (N, k): the MAE top examples that lie in this chunk
        here = (top_rows >= 0) & (local >= 0) & (local < len(h))
        found = _windows(h, local.clamp(0, len(h) - 1).t(), context, position, explorer.window)  # (k, N, W)
        top_windows = torch.where(here[..., None], found.transpose(0, 1), top_windows)
    rows = torch.where(running.keys >= 0, running.keys & _LOW, -1)
    edges = torch.stack([torch.linspace(0, float(m), bins + 1) for m in maxes.cpu()])
    return DashboardData(list(features), counts.view(n, bins).cpu(), edges, rows.t().cpu(),
                         running.payloads["values"].t().cpu(), running.payloads["windows"].transpose(0, 1).cpu(),
                         top_windows.cpu(), explorer.window)


def quantile_values(histogram: torch.Tensor, edges: torch.Tensor, qs) -> list[float]:
    """Activations at the shares `qs` of one feature's firings, read off its (bins,) histogram
    (linear within a bin: exact to a bin width)."""
    cumulative, total = histogram.cumsum(0).double(), int(histogram.sum())
    out = []
    for q in qs:
        i = min(int(torch.searchsorted(cumulative, q * total)), len(histogram) - 1)
        below = float(cumulative[i - 1]) if i else 0.0
        inside = (q * total - below) / max(int(histogram[i]), 1)
        out.append(float(edges[i] + min(max(inside, 0.0), 1.0) * (edges[i + 1] - edges[i])))
    return out


# ------------------------------------------------------------------ pages

CSS = """body{font:14px/1.4 sans-serif;margin:1.5em auto;max-width:1100px;color:#222;padding:0 1em}
nav a{margin-right:1em} .origin{color:#666;font-size:12px} h2{font-size:17px;margin:1.2em 0 .4em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:1em 2.5em}
table{border-collapse:collapse} td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #eee}
td:first-child,th:first-child,.index td:nth-child(2){text-align:left}
.swatch{display:inline-block;width:.9em;height:.9em;vertical-align:middle;margin-right:.3em}
.legend span{margin-right:1.2em}"""


def _page(title: str, caption: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='origin'>{html.escape(caption)}</p>{body}</body></html>\n")


def histogram_svg(counts: torch.Tensor, edges: torch.Tensor, bands: list[float], width: int = 380,
                  height: int = 150) -> str:
    """Inline SVG bar chart of one feature's (bins,) activation counts, bars coloured by quantile band
    (`bands`: the activations at 75/50/25% of firings), a tooltip per bar, 0 and max on the x axis."""
    peak, bins = max(int(counts.max()), 1), len(counts)
    bar_w, top, plot_h = width / bins, 16, height - 30  # the peak's label sits in the top 16 px
    bars = []
    for i, count in enumerate(counts.tolist()):
        middle = float(edges[i] + edges[i + 1]) / 2
        band = sum(middle < b for b in bands)  # 0 = top quarter ... 3 = bottom quarter
        bar_h = max((plot_h - top) * count / peak, 1.0 if count else 0.0)
        bars.append(f"<rect x='{i * bar_w:.1f}' y='{plot_h - bar_h:.1f}' width='{max(bar_w - 1, 1):.1f}' "
                    f"height='{bar_h:.1f}' fill='{BAND_COLOURS[band]}'><title>{number(float(edges[i]))}–"
                    f"{number(float(edges[i + 1]))}: {count:,} tokens</title></rect>")
    axis = (f"<line x1='0' y1='{plot_h}' x2='{width}' y2='{plot_h}' stroke='#888'/>"
            f"<text x='0' y='{plot_h + 14}' font-size='11'>0</text>"
            f"<text x='{width}' y='{plot_h + 14}' font-size='11' text-anchor='end'>{number(float(edges[-1]))}</text>"
            f"<text x='{width / 2}' y='{plot_h + 27}' font-size='11' text-anchor='middle'>activation</text>"
            f"<text x='0' y='11' font-size='11'>tallest bar: {peak:,} tokens</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
            f"aria-label='activation histogram'>{''.join(bars)}{axis}</svg>")


def _legend(scale: float) -> str:
    steps = "".join(plots.highlight_tokens([f" {number(scale * a)} "], [scale * a], scale) for a in (0.1, 0.4, 0.7, 1))
    return (f"<p class='legend'><span>shade = activation / this feature's max: {steps}</span>"
            "<span><b style='border:2px solid #d62728'>&nbsp;boxed&nbsp;</b> = the example's token</span>"
            "<span style='color:#999'>grey = not in the store (e.g. position 0)</span>"
            "<span>hover a token for its value</span></p>")


def _example(explorer: FeatureExplorer, row: int, value: float, window: torch.Tensor, scale: float) -> str:
    """One example line (`cards.example_html`): its activation, where it is, and its context window shaded."""
    index = explorer.mae.index
    context, position, token = (int(index[f][row]) for f in ("context", "position", "token_id"))
    span, tokens = explorer.span(context, position, token)
    before = explorer.window[0]
    acts = [None if torch.isnan(window[p - position + before]) else float(window[p - position + before]) for p in span]
    return example_html(tokens, acts, scale, position - span.start, value, f"ctx {context}:{position}")


def _examples(explorer: FeatureExplorer, data: DashboardData, i: int, per_band: int) -> str:
    """The top examples, then `per_band` sampled examples from each quantile band of the firings, strongest
    first within a band (as sae_vis orders its quantile groups)."""
    f, scale = data.features[i], float(explorer.mae.values[data.features[i], 0])
    if scale <= 0:
        return "<p><i>This feature never fired on this sample: no examples.</i></p>"
    tops = [(int(r), float(v), w) for r, v, w in zip(explorer.mae.rows[f], explorer.mae.values[f],
                                                        data.top_windows[i], strict=True) if r >= 0]
    parts = [_legend(scale), f"<h3>Top {len(tops)} activations</h3>"]
    parts += [_example(explorer, r, v, w, scale) for r, v, w in tops]
    cuts = quantile_values(data.histogram[i], data.edges[i], [0.0, 0.25, 0.5, 0.75, 1.0])
    for (lo, hi), colour in zip(QUANTILE_BANDS, BAND_COLOURS, strict=True):
        low, high = cuts[round(lo * 4)], cuts[round(hi * 4)]
        picked = [j for j in range(data.sample_rows.shape[1]) if data.sample_rows[i, j] >= 0
                  and low <= data.sample_values[i, j] and (data.sample_values[i, j] < high or hi == 1.0)][:per_band]
        picked.sort(key=lambda j: (-float(data.sample_values[i, j]), int(data.sample_rows[i, j])))
        parts.append(f"<h3><span class='swatch' style='background:{colour}'></span>Firings {lo:.0%}–{hi:.0%} "
                     f"(activation {number(low)}–{number(high)}): {len(picked)} random examples, strongest first</h3>")
        parts += [_example(explorer, int(data.sample_rows[i, j]), float(data.sample_values[i, j]),
                           data.sample_windows[i, j], scale) for j in picked]
    return "\n".join(parts)


def _stats(explorer: FeatureExplorer, data: DashboardData, i: int, ranking: str) -> str:
    f = data.features[i]
    row, n_tokens = explorer.mae.stats.loc[f], explorer.mae.n_tokens
    q = quantile_values(data.histogram[i], data.edges[i], [0.25, 0.5, 0.75]) if row["n_active"] else [float("nan")] * 3
    items = [(f"rank by {ranking}", f"{i + 1} of {len(data.features)} shown"),
             ("fires on", f"{number(100 * row['frequency'])}% of tokens ({int(row['n_active']):,} of {n_tokens:,})"),
             ("max activation", number(row["max_activation"])), ("mean when active", number(row["mean_when_active"])),
             ("quartiles when active", " / ".join(number(v) for v in q)),
             ("total activation", number(row["total_activation"])),
             ("decoder norm", number(float(explorer.sae.decoder_weight[f].detach().norm())))]
    return "<table>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in items) + "</table>"


def _logits(explorer: FeatureExplorer, logits: torch.Tensor | None, n: int) -> str:
    return logit_html(None if logits is None else top_logit_tokens(logits, explorer.tokenizer, n))


def _neighbours(similar: torch.Tensor, ids: torch.Tensor, shown: set[int]) -> str:
    rows = "".join(f"<tr><td>{_link(int(g), shown)}</td><td>{float(c):+.3f}</td></tr>"
                   for g, c in zip(ids, similar, strict=True))
    return f"<table><tr><th>feature</th><th>cosine</th></tr>{rows}</table>"


def _link(feature: int, shown: set[int]) -> str:
    return f"<a href='feature_{feature}.html'>feature {feature}</a>" if feature in shown else f"feature {feature}"


def write_dashboards(explorer: FeatureExplorer, features: list[int], directory: str | Path, *,
                     ranking: str = "total activation", per_band: int = 4, n_logits: int = 8, n_neighbours: int = 8,
                     progress: bool = True, **pass_options) -> Path:
    """Write `directory`/feature_<id>.html for each feature (in the given order: rank) and
    `directory`/index.html; returns the index's path. One `dashboard_pass` over the store.

    ranking: how `features` were chosen, as the pages say it (e.g. "token purity, sparse features");
    per_band: sampled examples shown from each quarter of the feature's firings; n_logits: tokens
    listed each way; n_neighbours: nearest features by decoder cosine. pass_options go to
    `dashboard_pass` (bins, sample, chunk_rows, exclude_token_ids). Pages whose content changed only
    by float noise are left as they are; feature pages of an earlier run not in `features` are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if features:  # none (profile.dashboard_features = 0): only the index, saying so
        data = dashboard_pass(explorer, features, progress=progress, **pass_options)
        decoder = explorer.sae.decoder_weight.detach()
        unit = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (d_sae, d_in)
        cosine = unit[features] @ unit.t()  # (N, d_sae)
        cosine[torch.arange(len(features)), torch.tensor(features)] = -2.0  # not its own neighbour
        near = cosine.topk(min(n_neighbours, cosine.shape[1] - 1), dim=1)
    for i, f in enumerate(tqdm(features, desc="pages", disable=not progress)):
        body = _feature_body(explorer, data, i, _neighbours(near.values[i], near.indices[i], set(features)),
                             per_band, n_logits, ranking)
        _write(explorer, directory / f"feature_{f}.html", _page(f"Feature {f}", _caption(explorer, f"feature {f}"),
                                                               body))
    for stale in set(directory.glob("feature_*.html")) - {directory / f"feature_{f}.html" for f in features}:
        stale.unlink()  # a page from an earlier run with other top features: never leave it to be browsed
    index = directory / "index.html"
    _write(explorer, index, _page(f"Feature dashboards: {len(features)} features",
                                  _caption(explorer, "feature dashboards"), _index(explorer, features, ranking)))
    return index


def _feature_body(explorer: FeatureExplorer, data: DashboardData, i: int, neighbours: str, per_band: int,
                  n_logits: int, ranking: str) -> str:
    features, f = data.features, data.features[i]
    nav = "".join([f"<nav><a href='index.html'>all {len(features)} features</a>",
                   f"<a href='feature_{features[i - 1]}.html'>← feature {features[i - 1]}</a>" if i else "",
                   f"<a href='feature_{features[i + 1]}.html'>feature {features[i + 1]} →</a>"
                   if i + 1 < len(features) else "", "</nav>"])
    logits = None if explorer.unembed is None else logit_attribution(explorer.sae, explorer.unembed, f)
    bands = quantile_values(data.histogram[i], data.edges[i], [0.75, 0.5, 0.25])
    return (f"{nav}<div class='grid'><div><h2>Statistics</h2>{_stats(explorer, data, i, ranking)}</div>"
            f"<div><h2>Activation histogram (tokens where it fires)</h2>"
            f"{histogram_svg(data.histogram[i], data.edges[i], bands)}<p class='origin'>Bars coloured by quarter of "
            "its firings, as the example sections below; hover a bar for its count.</p></div>"
            f"<div><h2>Logit effect of its decoder direction</h2>{_logits(explorer, logits, n_logits)}</div>"
            f"<div><h2>Nearest features (decoder cosine)</h2>{neighbours}</div></div>"
            f"<h2>Examples</h2>{_examples(explorer, data, i, per_band)}")


def _caption(explorer: FeatureExplorer, text: str) -> str:
    return plots.caption(text, explorer.profile, explorer.device)


def _index(explorer: FeatureExplorer, features: list[int], ranking: str) -> str:
    stats = explorer.mae.stats
    rows = []
    for rank, f in enumerate(features, start=1):
        tokens = [token_text(explorer.tokenizer, int(explorer.mae.index["token_id"][r]))
                  for r in explorer.mae.rows[f][:3] if r >= 0]
        rows.append(f"<tr><td>{rank}</td><td><a href='feature_{f}.html'>feature {f}</a></td>"
                    f"<td>{number(100 * stats.loc[f, 'frequency'])}%</td>"
                    f"<td>{number(stats.loc[f, 'max_activation'])}</td>"
                    f"<td>{number(stats.loc[f, 'mean_when_active'])}</td>"
                    f"<td style='text-align:left'>{html.escape(', '.join(repr(t) for t in tokens))}</td></tr>")
    return (f"<p>Features ranked by {html.escape(ranking)} on the held-out sample, one page each: "
            "statistics, activation histogram, examples across the range of activations, logit effect and "
            "nearest features.</p><table class='index'><tr><th>rank</th><th>feature</th><th>fires on</th><th>max</th>"
            f"<th>mean when active</th><th style='text-align:left'>top example tokens</th></tr>{''.join(rows)}</table>")


def _write(explorer: FeatureExplorer, path: Path, page: str) -> None:
    wrote = plots.write_if_changed(path, page)
    plots.log_figure(explorer.profile, f"{path.parent.name}/{path.name}", html="written" if wrote else "kept", png="-")
