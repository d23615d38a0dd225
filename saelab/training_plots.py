"""Figures of notebook 03: the seed's training curves, feature density, the recipe comparison.

Builders return plotly figures whose titles name the profile, model and device (and say
"NOT GPT-2" offline); `save_figure` writes figures/<profile>/<name>.html. (A minimal writer:
saelab.plots.save_figure from notebook 04's branch has the same signature and adds PNGs.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from saelab import paths
from saelab.config import Profile, default_device


def figure_title(text: str, profile: Profile, device: str | None = None) -> str:
    origin = f"profile {profile.name}, {profile.model_name}, on {device or default_device()}"
    if profile.is_offline:
        origin += " · offline profile: random-weight model, NOT GPT-2"
    return f"{text}<br><sup>{origin}</sup>"


def save_figure(fig: go.Figure, profile: Profile, name: str) -> list[Path]:
    out = paths.figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.html"
    fig.write_html(path, include_plotlyjs="cdn", div_id=name)  # fixed id: reruns are byte-identical
    return [path]


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


def density_histogram(density: np.ndarray, profile: Profile, device: str | None = None,
                      eps: float = 1e-10) -> go.Figure:
    """log10 of each latent's firing frequency on held-out tokens; dead latents sit at log10(eps)."""
    values = np.log10(np.asarray(density, dtype=float) + eps)
    counts, edges = np.histogram(values, bins=50)
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, width=np.diff(edges)))
    dead = int((np.asarray(density) == 0).sum())
    fig.update_layout(title=figure_title(f"Feature density on held-out tokens ({dead} dead at {np.log10(eps):.0f})",
                                         profile, device),
                      xaxis_title="log10(fraction of tokens on which the latent fires)", yaxis_title="latents")
    return fig


def recipe_comparison(table: pd.DataFrame, profile: Profile, device: str | None = None) -> go.Figure:
    """FVU against L0, one point per recipe (down-left is better), labelled with CE loss recovered."""
    fig = go.Figure(go.Scatter(
        x=table["l0"], y=table["fvu"], mode="markers+text", marker={"size": 14},
        text=[f"{recipe}<br>CE rec. {ce:.0%}" for recipe, ce in zip(table.index, table["ce_loss_recovered"],
                                                                     strict=True)],
        textposition="top center"))
    fig.update_layout(title=figure_title("Recipes on the same activations: sparsity vs reconstruction", profile,
                                         device), xaxis_title="L0 (active latents per token)",
                      yaxis_title="FVU (fraction of variance unexplained)", margin={"t": 110})
    return fig
