"""Feature cards: one feature's statistics, highlighted examples and logit attribution together.

    explorer = FeatureExplorer(mae, sae, store, contexts, tokenizer, profile, unembed=unembedding(lm))
    saelab.feature_card(1234, explorer)      # renders in a notebook (`_repr_html_`), prints in a terminal
    saelab.feature_card(1234, saelab.explore("runs/offline"))  # the same, the explorer built in one call

Contexts are rebuilt from the token rows the store was captured from: the store index gives each
row's context (a row of `saelab.data.tokens.load_tokens(profile, "mae")`) and position in it. Every token
of the window is shaded by the feature's activation there, re-encoded from the stored activations.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import pandas as pd
import torch
from safetensors import safe_open

from saelab import plots, tables
from saelab.config import Profile
from saelab.devices import device_of, module_on
from saelab.features.analysis import MAEResult, logit_attribution, token_text, top_logit_tokens
from saelab.sae import SAE
from saelab.store import ActivationStore


def read_rows(store: ActivationStore, rows: torch.Tensor) -> torch.Tensor:
    """(n,) int64 store rows -> (n, d_in) float32 CPU activations in the same order, reading from each
    shard only the slice between the first and last row asked for (the store is not changed)."""
    bounds = torch.tensor([0] + [s["rows"] for s in store.manifest["shards"]]).cumsum(0)
    out = torch.empty(len(rows), store.d_in)
    shard_of = torch.searchsorted(bounds, rows, right=True) - 1
    for s in shard_of.unique().tolist():
        picked = (shard_of == s).nonzero().squeeze(1)
        local = rows[picked] - bounds[s]
        lo, hi = int(local.min()), int(local.max()) + 1
        with safe_open(store.shard_paths()[s], "pt") as shard:
            block = shard.get_slice("activations")[lo:hi]
        out[picked] = block[local - lo].float()
    return out


# ------------------------------------------------------------------ the one renderer of an example and a logit table
# Feature cards, `Examples` tables and the dashboards all draw an example line and a logit table with these.


def example_html(tokens: list[str], activations: list[float | None], scale: float, mark: int, value: float,
                 where: str) -> str:
    """One example as a line of HTML: its activation, where it is (e.g. 'ctx 3:17'), and its tokens shaded
    by activation / scale (`plots.highlight_tokens`), token `mark` boxed. Inline styles: it renders the
    same in a notebook, a saved page and a dashboard."""
    return (f"<div style='margin:2px 0;white-space:nowrap;overflow-x:auto'><code style='display:inline-block;"
            f"width:5.5em;color:#555'>{tables.number(value)}</code><span style='color:#999;font-size:11px;"
            f"margin-right:.5em'>{html.escape(where)}</span>{plots.highlight_tokens(tokens, activations, scale, mark)}"
            "</div>")


def example_text(tokens: list[str], mark: int) -> str:
    """The example's context as one line of plain text, its token in «», newlines as ↵ (a terminal's card)."""
    return "".join(f"«{t}»" if i == mark else t for i, t in enumerate(tokens)).replace("\n", "↵")


def logit_html(table: pd.DataFrame | None) -> str:
    """The promoted and suppressed tokens of `analysis.top_logit_tokens` as two tables side by side."""
    if table is None:
        return "<p><i>No unembedding given: pass unembed=analysis.unembedding(lm) to the explorer.</i></p>"
    parts = []
    for effect in ("promoted", "suppressed"):
        part = table[table.effect == effect]
        rows = "".join(f"<tr><td style='text-align:left'>{html.escape(repr(t))}</td><td>{v:+.3f}</td></tr>"
                       for t, v in zip(part.token, part.logit, strict=True))
        parts.append(f"<table><tr><th style='text-align:left'>{effect}</th><th>logit</th></tr>{rows}</table>")
    return f"<div style='display:flex;gap:2em'>{''.join(parts)}</div>"


@dataclass
class FeatureExplorer:
    """What a feature card (and a dashboard) needs: the MAE pass, the SAE, its store and the token
    rows behind it. The explorer only reads them; it encodes on `device` with the SAE or a copy of it
    there (`sae_on_device`), never moving the caller's SAE.

    mae: `analysis.max_activating(sae, store, k)`. contexts: `load_tokens(profile, split)` of the
    split the store was captured from. unembed: `analysis.unembedding(lm)`; None = no logit tables.
    device: where contexts are re-encoded (default "cpu"). window: tokens shown (before, after) the
    example's token (default 12, 4).
    """

    mae: MAEResult
    sae: SAE
    store: ActivationStore
    contexts: object  # load_tokens(profile, split) (column "input_ids") or a list of token-id lists
    tokenizer: object  # anything with decode(list[int]) -> str
    profile: Profile
    unembed: torch.Tensor | None = None  # (d_in, d_vocab) from analysis.unembedding(lm)
    device: str | None = None  # where contexts are re-encoded; None: where the SAE lives (saelab.devices)
    window: tuple[int, int] = (12, 4)  # tokens shown before / after the example's token
    _cache: dict = field(default_factory=dict, repr=False)
    _encoder: tuple = field(default=(None, None), repr=False)  # (the caller's SAE, it or its copy on device)

    def __post_init__(self):
        self.device = str(device_of(self.sae)) if self.device is None else self.device

    def sae_on_device(self) -> SAE:
        """The SAE on `device`: itself, or a copy made once (the caller's SAE is never moved)."""
        if self._encoder[0] is not self.sae:
            self._encoder = (self.sae, module_on(self.sae, self.device))
        return self._encoder[1]

    def _context_ids(self, context: int) -> list[int]:
        row = self.contexts[context]
        return list(row["input_ids"] if isinstance(row, dict) else row)

    def _context_activations(self, context: int, feature: int) -> dict[int, float]:
        """{position: activation of `feature`} for every stored row of one context."""
        index = self.mae.index
        rows = (index["context"] == context).nonzero().squeeze(1)
        if (context, "x") not in self._cache:
            self._cache.clear()  # keep one context's activations: examples come one context at a time
            self._cache[(context, "x")] = read_rows(self.store, rows)
        with torch.no_grad():
            acts = self.sae_on_device().encode(self._cache[(context, "x")].to(self.device))[:, feature]
        return dict(zip(index["position"][rows].tolist(), acts.cpu().tolist(), strict=True))

    def span(self, context: int, position: int, token_id: int) -> tuple[range, list[str]]:
        """The window of positions shown around one example and their tokens as text (`token_text`).
        Raises ValueError when the token data no longer matches the store (notebook 01 rerun after 02)."""
        ids = self._context_ids(context)
        if ids[position] != token_id:
            raise ValueError(f"context {context} position {position} holds token {ids[position]}, the store says "
                             f"{token_id}: the token data changed after capture; rerun notebook 02")
        before, after = self.window
        span = range(max(position - before, 0), min(position + after + 1, len(ids)))
        return span, [token_text(self.tokenizer, ids[p]) for p in span]

    def examples(self, feature: int) -> pd.DataFrame:
        """The feature's top examples (at most mae's k), strongest first: a DataFrame indexed by rank
        with columns activation, token, text (the context window, the token in «»), row (in the store),
        context, position, token_id. Empty for a feature that never fired."""
        values, rows = self.mae.values[feature], self.mae.rows[feature]
        keep = rows >= 0  # -1 = fewer than k activations > 0
        if keep.any() and int(rows[keep].max()) >= len(self.mae.index["context"]):
            raise ValueError("an example row lies outside the store index; recompute max_activating")
        rows = rows[keep]
        frame = pd.DataFrame({"activation": values[keep].tolist(), "row": rows.tolist(),
                              **{f: self.mae.index[f][rows].tolist() for f in ("context", "position", "token_id")}})
        frame.insert(1, "token", [token_text(self.tokenizer, t) for t in frame["token_id"]])
        texts = []
        for ex in frame.itertuples():
            span, tokens = self.span(ex.context, ex.position, ex.token_id)
            texts.append(example_text(tokens, ex.position - span.start))
        frame.insert(2, "text", texts)
        frame.index.name = "rank"
        return frame

    def lines(self, feature: int) -> list[tuple[list[str], list[float | None], int, float, str]]:
        """Per top example: (tokens of its window, the feature's activation at each (None: not in the store),
        index of the example's token, its activation, 'ctx C:P'), strongest first."""
        out = []
        for ex in self.examples(feature).itertuples():
            span, tokens = self.span(ex.context, ex.position, ex.token_id)
            acts = self._context_activations(ex.context, feature)
            out.append((tokens, [acts.get(p) for p in span], ex.position - span.start, ex.activation,
                        f"ctx {ex.context}:{ex.position}"))
        return out

    def highlight(self, feature: int) -> str:
        """An HTML string: one line per top example (`example_html`), its window of tokens shaded by the
        feature's activation there (scaled by the feature's max), the example's token boxed. Raises
        ValueError when the token data no longer matches the store (notebook 01 rerun after 02)."""
        scale = float(self.mae.values[feature, 0])
        lines = [example_html(tokens, acts, scale, mark, value, where)
                 for tokens, acts, mark, value, where in self.lines(feature)]
        return "\n".join(lines) or "<div><i>never active on this sample</i></div>"

    def svg(self, feature: int, note: str = "") -> str:
        """The feature's card as a standalone SVG image (`plots.feature_card_svg`): statistics, then each top
        example in context, shaded; `note` (e.g. how the feature was chosen) joins the statistics line."""
        row = self.mae.stats.loc[feature]
        subtitle = (f"fires on {tables.number(100 * row['frequency'])}% of tokens, max activation "
                    f"{tables.number(row['max_activation'])}" + (f"; {note}" if note else ""))
        return plots.feature_card_svg(f"Feature {feature}: top {len(self.examples(feature))} examples in context",
                                      subtitle, [line[:4] for line in self.lines(feature)],
                                      float(self.mae.values[feature, 0]),
                                      plots.caption("shade = activation / max, boxed = the example's token",
                                                    self.profile, self.device))

    def table(self, feature: int) -> Examples:
        """The feature's top examples with their context: a table in a terminal, highlighted in a notebook."""
        if not 0 <= feature < self.sae.d_sae:
            raise ValueError(f"feature {feature} out of range: the SAE has {self.sae.d_sae} features")
        return Examples(feature, self.examples(feature), self.highlight(feature),
                        plots.caption(f"feature {feature}: top examples", self.profile, self.device))

    def logits(self, feature: int, n: int = 10) -> pd.DataFrame | None:
        """The n tokens the feature's decoder direction promotes most and the n it suppresses most
        (`analysis.top_logit_tokens`), or None when the explorer has no `unembed`."""
        if self.unembed is None:
            return None
        return top_logit_tokens(logit_attribution(self.sae, self.unembed, feature), self.tokenizer, n)

    def highlight_features(self, features: list[int]) -> str:
        """An HTML string for several features: their `highlight` blocks, each under a heading, below
        a caption naming profile and device."""
        caption = plots.caption("Max-activating examples", self.profile, self.device)
        return f"<p><b>{html.escape(caption)}</b></p>" + "\n".join(
            f"<h4>feature {f}</h4>{self.highlight(f)}" for f in features)


@dataclass
class Examples:
    """A feature's top examples with their context (`FeatureExplorer.table`, `saelab.top_examples`): prints
    as a text table in a terminal, shows highlighted lines in a notebook; `frame` is the data."""

    feature: int
    frame: pd.DataFrame  # as FeatureExplorer.examples
    examples_html: str
    caption: str

    def __repr__(self) -> str:
        if not len(self.frame):
            return f"{self.caption}\n(never active on this sample)"
        shown = self.frame[["activation", "token", "text", "context", "position"]]
        return f"{self.caption}\n" + shown.to_string(formatters={"activation": tables.number,
                                                                 "token": repr}, max_colwidth=200)

    def _repr_html_(self) -> str:
        return f"<div><p><small>{html.escape(self.caption)}</small></p>{self.examples_html}</div>"


@dataclass
class FeatureCard:
    """What `feature_card` returns: shows itself as HTML in a notebook; the fields are the data."""

    feature: int
    stats: pd.Series
    examples: pd.DataFrame
    examples_html: str
    logits: pd.DataFrame | None
    caption: str

    def __repr__(self) -> str:  # the text a saved notebook (or a terminal) shows: the numbers and each example line
        head = (f"Feature {self.feature}: fires on {tables.number(100 * self.stats['frequency'])}% of tokens, max "
                f"{tables.number(self.stats['max_activation'])} ({self.caption})")
        lines = [f"  {tables.number(a):>8}  {t}" for a, t in zip(self.examples["activation"], self.examples["text"],
                                                                 strict=True)]
        if self.logits is not None:
            for effect in ("promoted", "suppressed"):
                tokens = self.logits[self.logits.effect == effect]["token"]
                lines.append(f"  {effect}: {', '.join(repr(t) for t in tokens)}")
        return "\n".join([head, *(lines or ["  never active on this sample"])])

    def _repr_html_(self) -> str:
        stats = tables.tidy(self.stats.to_frame().T).to_html(float_format=tables.number)  # firing in percent
        return (f"<div><h3>Feature {self.feature}</h3><p><small>{html.escape(self.caption)}</small></p>{stats}"
                f"<h4>Top examples</h4>{self.examples_html}<h4>Logit attribution (promoted | suppressed)</h4>"
                f"{logit_html(self.logits)}</div>")


def feature_card(feature: int, explorer: FeatureExplorer, n_logits: int = 10) -> FeatureCard:
    """One feature's stats, top examples (highlighted) and promoted/suppressed tokens, as a
    `FeatureCard` that renders in a notebook (`_repr_html_`); its fields are plain DataFrames.
    n_logits: tokens listed each way (default 10). Raises ValueError for a feature id out of range."""
    if not 0 <= feature < explorer.sae.d_sae:
        raise ValueError(f"feature {feature} out of range: the SAE has {explorer.sae.d_sae} features")
    return FeatureCard(feature, explorer.mae.stats.loc[feature], explorer.examples(feature),
                       explorer.highlight(feature), explorer.logits(feature, n_logits),
                       plots.caption(f"feature {feature}", explorer.profile, explorer.device))
