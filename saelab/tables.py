"""Tables as notebooks show and share them: one unit per quantity, rounded, FVU with explained variance.

    display(tables.show(results, "Sweep results"))   # a styled table: what a reader sees
    tidy = tables.tidy(results)                       # the same as a DataFrame, for further use
    tables.save_csv(results, profile, "05_sweep")     # figures/<profile>/05_sweep.csv: the data behind it

One unit per quantity, everywhere: a share of tokens or features (firing frequency, dead and dense
latents, recovered features, CE loss recovered) is a percent, in a column named `<name>_pct` (text
prints it as "12.5%"); FVU and explained variance (= 1 - FVU, as SAELens logs it) stay fractions of
the variance, 0..1, as in the papers; MMCS is a cosine. The metric functions keep returning
fractions (`dead_fraction`, `frequency`): `tidy` converts them for display, so a table never shows
`dead_fraction` beside `dead_pct`.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

from saelab import paths

PERCENT = {  # fraction column (0..1) -> the percent column tables show instead
    "frequency": "firing_pct",
    "fraction_active": "active_pct",
    "dead_fraction": "dead_pct",
    "dense_fraction": "dense_pct",
    "recovered": "recovered_pct",
    "recovered_sd": "recovered_sd_pct",
    "chance_recovered": "chance_recovered_pct",
    "ce_loss_recovered": "ce_loss_recovered_pct",
}
DIGITS = 4  # significant digits shown: differences below this are float noise for an SAE metric


def number(value, digits: int = DIGITS) -> str:
    """One number as text: `digits` significant digits, positional between 0.001 and 1e6
    (0.1994, 12.35, 123500), else exponent (1.234e-05); NaN as "–"; integers as they are."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    value = float(value)
    if math.isnan(value):
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return np.format_float_positional(value, precision=digits, fractional=False, trim="-")
    return f"{value:.{digits - 1}e}"


def tidy(frame: pd.DataFrame | pd.Series, digits: int = DIGITS) -> pd.DataFrame | pd.Series:
    """A copy for display (the input is not changed): fraction columns of PERCENT x 100 under their
    `_pct` name, `explained_variance` = 1 - fvu inserted right after `fvu` (when there is one), and
    floats rounded to `digits` significant digits. A Series (metric name -> value, as notebook 03's
    evaluation) is tidied the same way, by its index."""
    if isinstance(frame, pd.Series):
        return tidy(frame.to_frame().T, digits).iloc[0].rename(frame.name)
    out = frame.copy()
    for fraction in PERCENT:
        if fraction in out.columns:
            out[fraction] = 100 * out[fraction].astype(float)
    out = out.rename(columns=PERCENT)
    if "fvu" in out.columns and "explained_variance" not in out.columns:
        out.insert(out.columns.get_loc("fvu") + 1, "explained_variance", 1 - out["fvu"].astype(float))
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].map(lambda v: float(f"{v:.{digits}g}"))
    return out


class Table:
    """A tidy table for a notebook: HTML with every number printed by `number` and the caption above it;
    plain text (a saved notebook's text view, a terminal) with the same numbers. `frame` holds the data."""

    def __init__(self, frame: pd.DataFrame, caption: str | None = None, digits: int = DIGITS):
        self.frame, self.caption, self.digits = frame, caption, digits

    def _format(self, value):
        return number(value, self.digits) if isinstance(value, (int, float, np.number)) else value

    def to_html(self) -> str:
        # a stable id instead of pandas' random one, so an unchanged table rewrites no file
        uuid = hashlib.sha1(f"{self.caption}|{list(self.frame.columns)}|{len(self.frame)}".encode()).hexdigest()[:8]
        style = self.frame.style.format(self._format).set_uuid(uuid)
        return (style.set_caption(self.caption) if self.caption else style).to_html()

    _repr_html_ = to_html

    def __repr__(self) -> str:
        text = self.frame.map(self._format).to_string()
        return f"{self.caption}\n{text}" if self.caption else text


def show(frame: pd.DataFrame | pd.Series, caption: str | None = None, digits: int = DIGITS) -> Table:
    """`tidy(frame)` as a `Table` for a notebook: numbers printed by `number` (no padding to six
    decimals, no object address as its text), `caption` above it (e.g. `plots.caption(...)`, naming
    profile and device). `.to_html()` gives the page fragment to save."""
    table = tidy(frame, digits)
    return Table(table.to_frame() if isinstance(table, pd.Series) else table, caption, digits)


def save_csv(frame: pd.DataFrame | pd.Series, profile, name: str) -> Path:
    """Every table a notebook shows is also data: `frame` at full precision (not rounded, fractions as
    fractions) written atomically to figures/<profile>/<name>.csv, e.g. name "06_probing"; returns the path.
    A reader can recompute any number of the figure beside it from this file."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"name={name!r}: a plain file name like '06_probing' (no folders)")
    directory = paths.figures_dir(profile)
    directory.mkdir(parents=True, exist_ok=True)
    frame = frame.to_frame() if isinstance(frame, pd.Series) else frame
    index = not isinstance(frame.index, pd.RangeIndex)  # a meaningful index (e.g. method names) is a column
    return paths.replace_atomically(directory / f"{name}.csv", lambda tmp: frame.to_csv(tmp, index=index))
