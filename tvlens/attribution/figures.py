"""Plotly figures for the attribution analyses (themed with :func:`tvlens.plots.apply_theme`).

Each builder takes what an analysis returns — its result object or that object's
``to_dict()`` — and gives a ``plotly.graph_objects.Figure``; write it with
``tvlens.plots.export(fig, "x.html")``. The results' ``.figure()`` methods call these.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch


def _as_dict(result) -> dict:
    return result.to_dict() if hasattr(result, "to_dict") else result


def _theme(fig: go.Figure) -> go.Figure:
    from tvlens.plots import apply_theme

    return apply_theme(fig)


def head_heatmap(scores, title: str = "head saliency", key_heads=()) -> go.Figure:
    """Layer × head heatmap of ``scores`` ([L, H] tensor or nested list); key heads marked."""
    s = torch.as_tensor(scores, dtype=torch.float32)
    fig = go.Figure(go.Heatmap(z=s.T.tolist(), x=list(range(s.shape[0])), y=list(range(s.shape[1])),
                               colorscale="Blues", colorbar=dict(title="score")))
    if key_heads:
        fig.add_trace(go.Scatter(x=[h[0] for h in key_heads], y=[h[1] for h in key_heads],
                                 mode="markers", marker=dict(symbol="x", color="#D55E00", size=9),
                                 name="key heads"))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="head")
    return _theme(fig)


def layer_profile(scores, title: str = "saliency per layer", injected_layer: int | None = None
                  ) -> go.Figure:
    """Sum over heads of ``scores`` per layer (the LTV paper finds a U shape)."""
    s = torch.as_tensor(scores, dtype=torch.float32)
    fig = go.Figure(go.Scatter(x=list(range(s.shape[0])), y=s.sum(1).tolist(), mode="lines+markers",
                               name="Σ_h score"))
    if injected_layer is not None:
        fig.add_vline(x=injected_layer, line_dash="dash", line_color="#888")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="summed score")
    return _theme(fig)


def ablation_bars(result, title: str = "head ablation") -> go.Figure:
    """Bars with 95% CIs: no ablation, key heads, random sets, per mode.

    ``result`` is :func:`~tvlens.attribution.key_head_analysis`'s result (its ``ablation``
    entry) or one :class:`~tvlens.attribution.AblationResult` (or their ``to_dict()``).
    """
    result = _as_dict(result)
    modes = result.get("ablation", {result.get("mode", "zero"): result})
    fig = go.Figure()
    nan = [float("nan")] * 2
    for mode, r in modes.items():
        y = [r["baseline_accuracy"], r["ablated_accuracy"], r["random_accuracy"]]
        cis = [r.get("baseline_ci", nan), r.get("ablated_ci", nan), r["random_ci"]]
        err = [(hi - v) if hi == hi else 0 for v, (_, hi) in zip(y, cis)]
        errm = [(v - lo) if lo == lo else 0 for v, (lo, _) in zip(y, cis)]
        fig.add_trace(go.Bar(x=["none", "key heads", "random"], name=f"{mode} ablation", y=y,
                             error_y=dict(type="data", array=err, arrayminus=errm)))
    fig.update_layout(title=title, yaxis_title="accuracy", barmode="group", yaxis_range=[0, 1])
    return _theme(fig)


def geometry_curves(result: dict, title: str = "rotation vs scaling") -> go.Figure:
    """Rotation cos(θ, Qθ), scaling ‖Sθ‖/‖θ‖, R² and accuracies across layers
    (:func:`~tvlens.attribution.geometry_sweep`'s dict)."""
    from plotly.subplots import make_subplots

    x = result["layers"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("geometry", "accuracy"))
    for key, name in (("rotation_cos", "cos(θ, Qθ)"), ("fit_r2", "fit R²")):
        fig.add_trace(go.Scatter(x=x, y=result[key], mode="lines+markers", name=name), 1, 1)
    fig.add_trace(go.Scatter(x=x, y=result["scale_ratio"], mode="lines+markers",
                             name="‖Sθ‖/‖θ‖", line_dash="dot"), 1, 1)
    for key, name in (("vector_accuracy", "inject θ"), ("linear_accuracy", "shift by Wθ"),
                      ("zero_shot", "zero-shot")):
        if key in result:
            fig.add_trace(go.Scatter(x=x, y=result[key], mode="lines+markers", name=name), 1, 2)
    fig.update_layout(title=title)
    fig.update_xaxes(title_text="layer")
    return _theme(fig)


def logit_lens_table(result: dict, k: int = 5) -> go.Figure:
    """Table of the logit lens of θ, Qθ, Wθ per layer: top tokens, answer rank, alignment."""
    rows = {"layer": [], "vector": [], "top tokens": [], "answer rank": [], "alignment": []}
    for layer, lens in zip(result["layers"], result["logit_lens"]):
        for name, d in lens.items():
            rows["layer"].append(layer)
            rows["vector"].append(name)
            rows["top tokens"].append(" | ".join(repr(t) for t in d["top_tokens"][:k]))
            rows["answer rank"].append(f"{d['answer_rank_mean']:.0f}")
            rows["alignment"].append(f"{d['alignment']:.2f}")
    fig = go.Figure(go.Table(header=dict(values=list(rows)), cells=dict(values=list(rows.values()))))
    fig.update_layout(title="logit lens", height=120 + 22 * len(rows["layer"]))
    return _theme(fig)


def ov_dla_heatmap(result, title: str = "packaged OV term: DLA on the answer") -> go.Figure:
    """Heatmap of the packaged OV terms' direct logit attribution (later layers × heads);
    ``result``: :func:`~tvlens.attribution.reinjection_test`'s result or its ``to_dict()``."""
    result = _as_dict(result)
    d = torch.as_tensor(result["dla_packaged"], dtype=torch.float32)
    fig = go.Figure(go.Heatmap(z=d.T.tolist(), x=result["later_layers"], y=list(range(d.shape[1])),
                               colorscale="RdBu", zmid=0, colorbar=dict(title="logit")))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="head")
    return _theme(fig)
