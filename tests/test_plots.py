"""Figure export: every format, atomic writes with the usual file mode, no plotly globals changed, clear errors."""

from __future__ import annotations

import importlib
import os
import stat

import pandas as pd
import plotly.graph_objects as go
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


def _umask_set(mask: int) -> int:
    return os.umask(mask)


def test_exported_file_gets_the_usual_mode(tmp_path):
    """An ordinary write's mode (0o666 minus the umask), not the temp file's 0o600."""
    old = _umask_set(0o022)
    try:
        path = export(_fig(), tmp_path / "f.html")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~0o022 == 0o644
        path.chmod(0o640)  # overwriting keeps the mode of the file it replaces
        export(_fig(), path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["f.html"]  # no temporary file left


def test_export_leaves_plotly_global_defaults_alone(tmp_path, monkeypatch):
    """Importing tvlens.plots and exporting changes no plotly default; MathJax is off per call."""
    import kaleido
    import plotly.io as pio

    import tvlens.plots

    monkeypatch.setattr(pio.templates, "default", "ggplot2")
    monkeypatch.setattr(pio.defaults, "mathjax", "https://example.invalid/mathjax.js")
    calls = []

    def fake_calc_fig_sync(fig_dict, opts=None, *, topojson=None, kopts=None):
        calls.append((opts, kopts))
        return b"<svg></svg>"

    monkeypatch.setattr(kaleido, "calc_fig_sync", fake_calc_fig_sync)
    importlib.reload(tvlens.plots)  # what an import does, with the defaults set as above
    fig = tvlens.plots.apply_theme(go.Figure(go.Scatter(x=[0, 1], y=[1, 0])))
    tvlens.plots.export(fig, tmp_path / "f.html")
    tvlens.plots.export(fig, tmp_path / "f.svg", scale=3)
    assert pio.templates.default == "ggplot2"
    assert pio.defaults.mathjax == "https://example.invalid/mathjax.js"
    (opts, kopts), = calls
    assert kopts["mathjax"] is False  # per call, whatever the global says
    assert opts == {"format": "svg", "width": 720, "height": 420, "scale": 3}  # the theme's size
    assert fig.layout.template.layout.paper_bgcolor == "white"


def test_notebook_renderer_gives_plotly_json_and_a_real_png(monkeypatch):
    """``static_figures_in_notebooks``: a figure's bundle holds plotly's own JSON (Jupyter's
    interactive view) and a PNG from the offline export path (what GitHub shows)."""
    import base64

    import plotly.io as pio

    from tvlens.plots import NOTEBOOK_RENDERER, static_figures_in_notebooks

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)  # restored after the test
    assert static_figures_in_notebooks() == NOTEBOOK_RENDERER == pio.renderers.default
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))
    bundle = pio.renderers[NOTEBOOK_RENDERER].to_mimebundle(fig.to_dict())
    assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [1, 2]
    assert base64.b64decode(bundle["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
