"""Figures for papers: one plotly theme, one export function, the shared figures.

``export(fig, path)`` writes ``.html`` (self-contained, plotly.js inlined, nothing
fetched when opened), or ``.png`` / ``.svg`` / ``.pdf`` through kaleido ≥ 1, which drives
a system Chromium (Debian's ``chromium`` package; ``make`` installs it). MathJax is
turned off per call so static export never reaches the network.

The theme is a plotly template registered under the name ``"tvlens_paper"``; importing
this module changes none of plotly's global defaults (``pio.templates.default``,
``pio.defaults.*``). tvlens's own figures call :func:`apply_theme`; apply it to yours,
or set ``pio.templates.default = "tvlens_paper"`` yourself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from tvlens.errors import TvlensError
from tvlens.io import atomic_write

PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
TEMPLATE_NAME = "tvlens_paper"

THEME = go.layout.Template(
    layout=dict(
        font=dict(family="Helvetica, Arial, sans-serif", size=13, color="#222"),
        paper_bgcolor="white",
        plot_bgcolor="white",
        colorway=PALETTE,
        xaxis=dict(showline=True, linecolor="#444", ticks="outside", gridcolor="#eee", zeroline=False),
        yaxis=dict(showline=True, linecolor="#444", ticks="outside", gridcolor="#eee", zeroline=False),
        legend=dict(bgcolor="rgba(255,255,255,0.8)", borderwidth=0),
        margin=dict(l=60, r=20, t=50, b=50),
        width=720,
        height=420,
    )
)
# Registering a named template adds an entry to plotly's registry; it is not made the
# default (``pio.templates.default`` is left as the user has it).
pio.templates[TEMPLATE_NAME] = THEME

STATIC_FORMATS = (".png", ".svg", ".pdf")


def apply_theme(fig: go.Figure) -> go.Figure:
    """Apply the tvlens paper theme (colour-blind-safe palette, white background)."""
    fig.update_layout(template=THEME)
    return fig


def export(fig: go.Figure, path: str | Path, *, scale: float = 2.0) -> Path:
    """Write ``fig`` to ``path``; the suffix picks the format (.html, .png, .svg, .pdf).

    The file appears atomically (written beside it, then renamed) with the mode an
    ordinary write gives it (``0o666`` minus the umask, or the mode of the file it
    replaces). Raises :class:`TvlensError` for a missing folder, an unknown suffix, or a
    static export without a usable Chromium (install Debian's ``chromium``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.parent.is_dir():
        raise TvlensError(f"folder {str(path.parent)!r} does not exist; create it first")
    if suffix not in (".html", *STATIC_FORMATS):
        raise TvlensError(f"cannot export to {suffix or 'a file without suffix'}; use .html, .png, .svg or .pdf")
    if suffix == ".html":
        def write(tmp: str) -> None:
            fig.write_html(tmp, include_plotlyjs=True, include_mathjax=False, full_html=True)
    else:
        def write(tmp: str) -> None:
            Path(tmp).write_bytes(_static_bytes(fig, suffix[1:], scale))
    # the temporary file keeps the suffix: writers that look at it pick the right format
    return atomic_write(path, write, suffix=suffix)


NOTEBOOK_RENDERER = "tvlens_notebook"


def static_figures_in_notebooks() -> str:
    """Make plotly show each figure in a notebook both interactively (plotly's JSON, for
    Jupyter) and as a PNG through :func:`export`'s offline path (what GitHub and other
    static viewers of a committed notebook display). Sets ``pio.renderers.default`` to
    :data:`NOTEBOOK_RENDERER` — a deliberate, global choice, so only on request — and
    returns the renderer's name. Needs kaleido and Chromium, as static export does."""
    import base64

    from plotly.io.base_renderers import MimetypeRenderer

    class _JsonAndPng(MimetypeRenderer):
        def to_mimebundle(self, fig_dict):
            bundle = pio.renderers["plotly_mimetype"].to_mimebundle(fig_dict)
            png = _static_bytes(go.Figure(fig_dict), "png", 1.0)
            return {**bundle, "image/png": base64.b64encode(png).decode("ascii")}

    pio.renderers[NOTEBOOK_RENDERER] = _JsonAndPng()
    pio.renderers.default = NOTEBOOK_RENDERER
    return NOTEBOOK_RENDERER


def _static_bytes(fig: go.Figure, fmt: str, scale: float) -> bytes:
    """``fig`` as ``fmt`` bytes through kaleido, with MathJax off for this call only.

    ``fig.write_image`` cannot turn MathJax off: plotly forwards ``pio.defaults.mathjax``
    to kaleido only when it is truthy, and kaleido's default loads MathJax from a CDN. So
    this calls kaleido's public ``calc_fig_sync`` with ``mathjax=False`` in its options,
    sizing the figure as ``plotly.io.to_image`` does and passing on (never changing) the
    user's other ``pio.defaults``.
    """
    try:
        import kaleido
    except ImportError:
        raise TvlensError("static export needs kaleido>=1: pip install 'kaleido>=1'") from None
    fig_dict = fig.to_dict()
    layout = fig_dict.get("layout", {})
    template_layout = layout.get("template", {}).get("layout", {})
    defaults = pio.defaults
    opts = dict(
        format=fmt,
        width=layout.get("width") or template_layout.get("width") or defaults.default_width,
        height=layout.get("height") or template_layout.get("height") or defaults.default_height,
        scale=scale,
    )
    kopts = {"mathjax": False}
    if defaults.plotlyjs:
        kopts["plotlyjs"] = defaults.plotlyjs
    if defaults.headers:
        kopts["headers"] = dict(defaults.headers)
    try:
        try:
            return kaleido.calc_fig_sync(fig_dict, opts=opts, topojson=defaults.topojson, kopts=kopts)
        except Exception as err:
            # seen once on a loaded 2-core machine: kaleido's page ran the render before its own
            # scripts had loaded ("ReferenceError: kaleido_scopes is not defined"); a fresh
            # browser session then succeeds, so that one error is retried once
            if "ReferenceError" not in str(err):
                raise
            return kaleido.calc_fig_sync(fig_dict, opts=opts, topojson=defaults.topojson, kopts=kopts)
    except Exception as err:  # kaleido reports a missing browser in several ways
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TvlensError(
            f"static export to .{fmt} failed ({msg}); install a Chromium "
            "(`apt-get install chromium`) or export to .html"
        ) from None


def accuracy_by_layer(
    curves: Mapping[str, "pd.DataFrame"],  # noqa: F821
    references: Mapping[str, tuple[float, float, float]] | None = None,
    *,
    title: str = "Accuracy by layer",
    xaxis_title: str = "layer",
) -> go.Figure:
    """Accuracy-by-layer curves with CI bands and horizontal reference lines.

    Args:
        curves: method name → DataFrame with columns ``layer``, ``accuracy``,
            ``ci_low``, ``ci_high`` (one row per layer).
        references: name → ``(accuracy, ci_low, ci_high)`` drawn as dashed lines
            (e.g. zero-shot and ICL).
    """
    fig = go.Figure()
    for i, (name, df) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        df = df.sort_values("layer")
        x = df["layer"].tolist()
        fig.add_trace(go.Scatter(
            x=x + x[::-1], y=df["ci_high"].tolist() + df["ci_low"].tolist()[::-1],
            mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line=dict(width=0),
            hoverinfo="skip", showlegend=False, legendgroup=name,
        ))
        fig.add_trace(go.Scatter(x=x, y=df["accuracy"], mode="lines+markers", name=name,
                                 line=dict(color=color, width=2), legendgroup=name))
    dash_styles = ["dash", "dot", "dashdot", "longdash"]
    for j, (name, (acc, lo, hi)) in enumerate((references or {}).items()):
        color = PALETTE[(len(curves) + j) % len(PALETTE)]
        fig.add_hline(y=acc, line=dict(color=color, dash=dash_styles[j % 4], width=1.5))
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{name} ({acc:.2f} [{lo:.2f}, {hi:.2f}])",
                                 line=dict(color=color, dash=dash_styles[j % 4])))
    fig.update_layout(title=title, xaxis_title=xaxis_title, yaxis_title="accuracy",
                      yaxis_range=[-0.02, 1.02], xaxis_tickformat="d")
    return apply_theme(fig)


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"
