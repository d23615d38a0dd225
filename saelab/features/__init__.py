"""Notebook 04: what a trained SAE's features are, read from its store.

    mae.py         max-activating examples (MAE), per-feature statistics, logit attribution
    cards.py       one feature's card: statistics, highlighted examples and logit effects together
    dashboards.py  static HTML dashboards, one page per feature and an index
"""
