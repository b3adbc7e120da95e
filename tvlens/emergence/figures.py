"""Figures for a with/without-TVP comparison (the dict :func:`tvlens.emergence.compare` returns).

- :func:`accuracy_by_layer_figure`: task-vector accuracy at each extraction layer, both
  arms, with 95% Wilson intervals over the ``n`` evaluation prompts and the ICL /
  chance references; the prescribed layer ℓ is marked.
- :func:`training_curves_figure`: ICL accuracy and task-vector accuracy at ℓ over steps.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tvlens.plots import PALETTE, accuracy_by_layer, apply_theme

ARMS = (("with_tvp", "with TVP"), ("without_tvp", "without TVP"))


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion ``p`` measured on ``n`` trials."""
    if n <= 0:
        return (p, p)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_by_layer_figure(result: dict, *, n: int | None = None) -> go.Figure:
    """Task-vector accuracy by layer, with vs without TVP (``n``: evaluation prompts)."""
    n = n or int(result["config"]["n_eval"])
    curves = {}
    for key, label in ARMS:
        accs = result[key]["tv_accuracy_by_layer"]
        cis = [wilson(a, n) for a in accs]
        curves[label] = pd.DataFrame({"layer": list(range(len(accs))), "accuracy": accs,
                                      "ci_low": [c[0] for c in cis], "ci_high": [c[1] for c in cis]})
    refs = {}
    for key, label in ARMS:
        acc = result[key]["icl_accuracy"]
        refs[f"ICL, {label}"] = (acc, *wilson(acc, n))
    chance = 1.0 / result["config"]["n_values"]
    refs["chance"] = (chance, chance, chance)
    fig = accuracy_by_layer(curves, refs, title="Task-vector accuracy by extraction layer")
    fig.add_vline(x=result["config"]["tvp_layer"], line=dict(color="#888", dash="dot", width=1))
    return fig


def training_curves_figure(result: dict) -> go.Figure:
    """ICL accuracy and task-vector accuracy at ℓ over training steps, both arms."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "ICL accuracy", f"task-vector accuracy at layer {result['config']['tvp_layer']}"))
    for i, (key, label) in enumerate(ARMS):
        hist = result[key].get("history") or []
        steps = [h["step"] for h in hist]
        color = PALETTE[i]
        fig.add_trace(go.Scatter(x=steps, y=[h["icl_accuracy"] for h in hist], name=label,
                                 mode="lines+markers", line=dict(color=color), legendgroup=label),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[h["tv_accuracy"] for h in hist], name=label,
                                 mode="lines+markers", line=dict(color=color), legendgroup=label,
                                 showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="accuracy", range=[-0.02, 1.02])
    fig.update_layout(title="Emergence over training", width=900)
    return apply_theme(fig)
