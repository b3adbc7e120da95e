"""The progress bar tvlens uses everywhere: ``tqdm.auto``'s — a widget in Jupyter when
ipywidgets is installed, else a text bar — imported without the warning tqdm prints in a
notebook that lacks ipywidgets (it falls back to the text bar, which is what we want; the
warning would otherwise land in every executed notebook's outputs)."""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="IProgress not found")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
