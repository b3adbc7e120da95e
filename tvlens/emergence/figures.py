"""Figures for a with/without-TVP comparison (the dict :func:`tvlens.emergence.compare` returns).

- :func:`accuracy_by_layer_figure`: task-vector accuracy at each extraction layer, both
  arms, and the ICL / chance references. Each accuracy ``p`` is a rate over the ``n``
  evaluation prompts, so its band is the exact (Clopper–Pearson) 95% binomial interval of
  ``round(p·n)`` successes in ``n`` trials, :func:`tvlens.stats.proportion` — the one
  interval function of tvlens. The prescribed layer ℓ is marked.
- :func:`training_curves_figure`: ICL accuracy and task-vector accuracy at ℓ over steps.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tvlens.plots import PALETTE, accuracy_by_layer, apply_theme
from tvlens.stats import proportion

ARMS = (("with_tvp", "with TVP"), ("without_tvp", "without TVP"))


def accuracy_by_layer_figure(result: dict, *, n: int | None = None) -> go.Figure:
    """Task-vector accuracy by layer, with vs without TVP (``n``: evaluation prompts)."""
    n = n or int(result["config"]["n_eval"])
    curves = {}
    for key, label in ARMS:
        accs = result[key]["tv_accuracy_by_layer"]
        cis = [proportion(a, n) for a in accs]
        curves[label] = pd.DataFrame({"layer": list(range(len(accs))), "accuracy": accs,
                                      "ci_low": [c.ci_low for c in cis],
                                      "ci_high": [c.ci_high for c in cis]})
    refs = {}
    for key, label in ARMS:
        acc = result[key]["icl_accuracy"]
        refs[f"ICL, {label}"] = proportion(acc, n).as_tuple()
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
