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


def head_heatmap(scores, title: str = "head saliency", key_heads=(),
                 injected_layer: int | None = None) -> go.Figure:
    """Layer × head heatmap of ``scores`` ([L, H] tensor or nested list); key heads marked,
    and with ``injected_layer`` a line after it (heads left of it cannot read the vector)."""
    s = torch.as_tensor(scores, dtype=torch.float32)
    fig = go.Figure(go.Heatmap(z=s.T.tolist(), x=list(range(s.shape[0])), y=list(range(s.shape[1])),
                               colorscale="Blues", colorbar=dict(title="score")))
    if key_heads:
        fig.add_trace(go.Scatter(x=[h[0] for h in key_heads], y=[h[1] for h in key_heads],
                                 mode="markers", marker=dict(symbol="x", color="#D55E00", size=9),
                                 name="key heads"))
    if injected_layer is not None:
        fig.add_vline(x=injected_layer + 0.5, line_dash="dash", line_color="#888",
                      annotation_text=f"θ after layer {injected_layer}")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="head")
    return _theme(fig)


def layer_profile(scores, title: str = "saliency per layer", injected_layer: int | None = None,
                  histogram=None) -> go.Figure:
    """Sum over heads of ``scores`` per layer (the LTV paper finds a U shape), with the key
    heads' layer ``histogram`` ([L] counts, e.g. ``KeyHeadResult.layer_histogram``) as bars
    on a second axis; a dashed line at ``injected_layer``."""
    from plotly.subplots import make_subplots

    s = torch.as_tensor(scores, dtype=torch.float32)
    x = list(range(s.shape[0]))
    fig = make_subplots(specs=[[{"secondary_y": histogram is not None}]])
    fig.add_trace(go.Scatter(x=x, y=s.nan_to_num().sum(1).tolist(), mode="lines+markers",
                             name="Σ_h score"))
    if histogram is not None:
        fig.add_trace(go.Bar(x=x, y=list(histogram), name="key heads", opacity=0.4,
                             marker_color="#D55E00"), secondary_y=True)
        fig.update_yaxes(title_text="key heads", secondary_y=True)
    if injected_layer is not None:
        fig.add_vline(x=injected_layer, line_dash="dash", line_color="#888")
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="summed score")
    return _theme(fig)


def ablation_bars(result, title: str = "head ablation") -> go.Figure:
    """Bars with 95% CIs: no ablation, key heads, random sets, per mode — under the vector
    and, when the result has them (``icl``), in plain ICL without it.

    ``result`` is :func:`~tvlens.attribution.key_head_analysis`'s result (its ``ablation``
    and ``icl`` entries) or one :class:`~tvlens.attribution.AblationResult` (or their
    ``to_dict()``).
    """
    result = _as_dict(result)
    settings = {"": result.get("ablation", {result.get("mode", "zero"): result})}
    if result.get("icl"):
        settings = {" · vector": settings[""], f" · {result.get('icl_shots', '')}-shot ICL": result["icl"]}
    fig = go.Figure()
    nan = [float("nan")] * 2
    for suffix, modes in settings.items():
        for mode, r in modes.items():
            y = [r["baseline_accuracy"], r["ablated_accuracy"], r["random_accuracy"]]
            cis = [r.get("baseline_ci", nan), r.get("ablated_ci", nan), r["random_ci"]]
            err = [(hi - v) if hi == hi else 0 for v, (_, hi) in zip(y, cis)]
            errm = [(v - lo) if lo == lo else 0 for v, (lo, _) in zip(y, cis)]
            rand = "random (same layers)" if r.get("random_from", "layers") == "layers" else "random"
            fig.add_trace(go.Bar(x=["none", "key heads", rand], name=f"{mode} ablation{suffix}", y=y,
                                 error_y=dict(type="data", array=err, arrayminus=errm)))
    fig.update_layout(title=title, yaxis_title="accuracy", barmode="group", yaxis_range=[0, 1])
    return _theme(fig)


def _error_bars(values, cis) -> dict | None:
    """``error_y`` for plotly from values and ``[lo, hi]`` intervals (None when absent / NaN)."""
    if not cis or all(lo != lo for lo, _ in cis):
        return None
    up = [(hi - v) if hi == hi else 0 for v, (_, hi) in zip(values, cis)]
    down = [(v - lo) if lo == lo else 0 for v, (lo, _) in zip(values, cis)]
    return dict(type="data", array=up, arrayminus=down)


def geometry_curves(result: dict, title: str = "rotation vs scaling") -> go.Figure:
    """Rotation cos(θ, Qθ), scaling ‖Sθ‖/‖θ‖ and held-out R² across layers (the headline
    design, with 95% intervals over prompts for ``per_prompt``), the ``mixed`` design's R²
    as a dotted control, and the accuracies with their CIs
    (:func:`~tvlens.attribution.geometry_sweep`'s dict)."""
    from plotly.subplots import make_subplots

    x = result["layers"]
    design = result.get("design", "per_prompt")
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"geometry ({design} fit)", "accuracy"))
    for key, name, dash in (("rotation_cos", "cos(θ, Qθ)", None), ("scale_ratio", "‖Sθ‖/‖θ‖", "dot"),
                            ("fit_r2", "held-out R²", None)):
        fig.add_trace(go.Scatter(x=x, y=result[key], mode="lines+markers", name=name, line_dash=dash,
                                 error_y=_error_bars(result[key], result.get(f"{key}_ci"))), 1, 1)
    designs = result.get("designs")
    if designs and design != "mixed":
        fig.add_trace(go.Scatter(x=x, y=[d["mixed"]["fit_r2"] for d in designs], mode="lines+markers",
                                 name="R², prompts mixed (control)", line_dash="dot"), 1, 1)
    for key, name in (("vector_accuracy", "inject θ"), ("linear_accuracy", "shift by Wθ"),
                      ("zero_shot", "zero-shot")):
        if key in result:
            ci = result.get(key.replace("_accuracy", "") + "_ci")
            fig.add_trace(go.Scatter(x=x, y=result[key], mode="lines+markers", name=name,
                                     error_y=_error_bars(result[key], ci)), 1, 2)
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


def reinjection_bars(result, title: str = "path terms re-injected: accuracy") -> go.Figure:
    """Accuracy with 95% CI of each term kind at each placement (grouped bars) and of the
    controls, with zero-shot and θ as horizontal lines; ``result``:
    :func:`~tvlens.attribution.reinjection_test`'s result or its ``to_dict()``."""
    result = _as_dict(result)
    conds = result["conditions"]
    kinds = list(dict.fromkeys(k.split("@")[0] for k in conds if "@" in k))
    places = list(dict.fromkeys(k.split("@")[1] for k in conds if "@" in k))
    controls = [k for k in conds if "@" not in k]

    def bar(names, x, label):
        y = [conds[k]["accuracy"] for k in names]
        hi = [conds[k]["ci"][1] - v if conds[k]["ci"][1] == conds[k]["ci"][1] else 0 for k, v in zip(names, y)]
        lo = [v - conds[k]["ci"][0] if conds[k]["ci"][0] == conds[k]["ci"][0] else 0 for k, v in zip(names, y)]
        return go.Bar(x=x, y=y, name=label, error_y=dict(type="data", array=hi, arrayminus=lo),
                      customdata=[conds[k]["recovery"] for k in names],
                      hovertemplate="%{x}: %{y:.2f} (recovery %{customdata:.2f})")

    fig = go.Figure([bar([f"{k}@{p}" for k in kinds], kinds, p) for p in places])
    if controls:
        fig.add_trace(bar(controls, controls, "controls"))
    for key, name, dash in (("zero_shot", "zero-shot", "dot"), ("vector_accuracy", "θ", "dash")):
        fig.add_hline(y=result[key], line_dash=dash, line_color="#888", annotation_text=name)
    fig.update_layout(title=title, yaxis_title="accuracy", yaxis_range=[0, 1], barmode="group")
    return _theme(fig)
