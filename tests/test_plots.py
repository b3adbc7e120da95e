"""Figure export: every format, atomic writes, clear errors."""

from __future__ import annotations

import pandas as pd
import pytest

from tvlens import TvlensError
from tvlens.plots import accuracy_by_layer, export


def _fig():
    df = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.1, 0.6, 0.4],
                       "ci_low": [0.0, 0.5, 0.3], "ci_high": [0.2, 0.7, 0.5]})
    return accuracy_by_layer({"ICL task vector": df}, {"zero-shot": (0.05, 0.0, 0.1)})


def test_html_export_is_self_contained(tmp_path):
    path = export(_fig(), tmp_path / "f.html")
    text = path.read_text()
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inlined
    assert '<script src="http' not in text and "<script src='http" not in text  # nothing fetched


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg"), (".pdf", b"%PDF")])
def test_static_export(tmp_path, suffix, magic):
    path = export(_fig(), tmp_path / f"f{suffix}")
    head = path.read_bytes()[:400]
    assert magic in head
    assert [p.name for p in tmp_path.iterdir()] == [f"f{suffix}"]


def test_export_errors(tmp_path):
    with pytest.raises(TvlensError, match="does not exist"):
        export(_fig(), tmp_path / "missing" / "f.png")
    with pytest.raises(TvlensError, match="cannot export"):
        export(_fig(), tmp_path / "f.jpg")
