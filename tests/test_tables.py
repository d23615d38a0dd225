"""Tables show one unit per quantity, rounded, with explained variance beside FVU."""

import math

import pandas as pd
import pytest

from saelab import tables


def test_tidy_converts_fractions_to_percent_and_adds_explained_variance():
    frame = pd.DataFrame({"l0": [12.3456789, 3.0], "fvu": [0.25, 0.1], "dead_fraction": [0.125, 0.0],
                          "ce_loss_recovered": [4.71, 0.9], "n": [1, 2]})
    out = tables.tidy(frame)
    assert list(out.columns) == ["l0", "fvu", "explained_variance", "dead_pct", "ce_loss_recovered_pct", "n"]
    assert out["dead_pct"].tolist() == [12.5, 0.0] and out["ce_loss_recovered_pct"].tolist() == [471.0, 90.0]
    assert out["explained_variance"].tolist() == [0.75, 0.9]
    assert out["l0"].tolist() == [12.35, 3.0] and out["n"].tolist() == [1, 2]  # 4 significant digits; ints kept
    assert list(frame.columns) == ["l0", "fvu", "dead_fraction", "ce_loss_recovered", "n"]  # input unchanged


def test_tidy_series_by_its_index():
    out = tables.tidy(pd.Series({"fvu": 0.2, "dense_fraction": 0.015, "l0": 7.0}, name="held-out"))
    assert out.to_dict() == {"fvu": 0.2, "explained_variance": 0.8, "dense_pct": 1.5, "l0": 7.0}
    assert out.name == "held-out"


def test_numbers_print_without_padding_or_si_suffixes():
    assert [tables.number(v) for v in (0.19943, 12.3456, 123456.7, 1.23456e-5, 0.0, 12345)] == \
        ["0.1994", "12.35", "123500", "1.235e-05", "0", "12,345"]
    assert tables.number(math.nan) == "–"


def test_show_styles_the_tidy_table_with_a_caption_in_html_and_text():
    table = tables.show(pd.DataFrame({"frequency": [0.0123456], "n_active": [12345]}), "Top features")
    html = table.to_html()
    assert "firing_pct" in html and "1.235" in html and "Top features" in html and "1.234560" not in html
    assert repr(table).splitlines() == ["Top features", "  firing_pct n_active", "0      1.235   12,345"]
    assert "Styler" not in repr(table)  # a saved notebook's text view shows the table, not an object address


def test_save_csv_writes_the_full_precision_table_beside_the_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELAB_ROOT", str(tmp_path))
    frame = pd.DataFrame({"method": ["sae", "pca"], "auc": [0.912345678, 0.5]})
    path = tables.save_csv(frame, "offline", "06_probing")
    assert path == tmp_path / "figures" / "offline" / "06_probing.csv"
    assert pd.read_csv(path).equals(frame)  # not rounded: a reader recomputes from it
    named = tables.save_csv(frame.set_index("method")["auc"], "offline", "06_by_method")
    assert list(pd.read_csv(named).columns) == ["method", "auc"]
    with pytest.raises(ValueError, match="plain file name"):
        tables.save_csv(frame, "offline", "../escape")


def test_the_same_table_renders_the_same_html_every_time():
    frame = pd.DataFrame({"auc": [0.9, 0.8]}, index=["sae", "pca"])
    assert tables.show(frame, "AUC").to_html() == tables.show(frame.copy(), "AUC").to_html()
    assert tables.show(frame, "AUC").to_html() != tables.show(frame, "other caption").to_html()
