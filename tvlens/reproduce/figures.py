"""The report's figures, one per finding: each takes the finding's assembled result
(``values`` over seeds, seed 0's ``tables``, ``model``, ``settings``) and returns a plotly
figure in the tvlens theme. Plotly is imported on first use (the CLI loads this module)."""

from __future__ import annotations

import numpy as np


def _go():
    import plotly.graph_objects as go

    return go


def _themed(fig):
    from tvlens.plots import apply_theme

    return apply_theme(fig)


def hendel_figure(result: dict):
    rows = [r for r in result["tables"]["per_task"] if r["format"] == result["settings"]["formats"][0]]
    fig = _go().Figure()
    for key, label in (("zero_shot", "zero-shot"), ("task_vector", "ICL task vector"), ("icl", "ICL (5-shot)")):
        fig.add_bar(name=label, x=[r["task"] for r in rows], y=[r[key] for r in rows])
    fig.update_layout(barmode="group", yaxis_title="first-token accuracy", yaxis_range=[0, 1],
                      title=f"Hendel's table on {result['model']} ({rows[0]['format'] if rows else ''} format)")
    return _themed(fig)


def ltv_figure(result: dict):
    rows = [r for r in result["tables"]["by_layer"] if r["layer"] is not None]
    fig = _go().Figure()
    for method, label in (("ltv", "LTV"), ("icl_tv", "ICL task vector"), ("vanilla", "vanilla TV"),
                          ("fv", "function vector")):
        pts = [r for r in rows if r["method"] == method]
        layers = sorted({r["layer"] for r in pts})
        mean = [float(np.mean([r["accuracy"] for r in pts if r["layer"] == lay])) for lay in layers]
        fig.add_scatter(x=layers, y=mean, mode="lines+markers", name=label)
    for ref, label in (("icl", "ICL (5-shot)"), ("zero_shot", "zero-shot")):
        if ref in result["values"]:
            fig.add_hline(y=result["values"][ref]["mean"], line_dash="dot", annotation_text=label)
    fig.update_layout(xaxis_title="layer", yaxis_title="accuracy (mean over tasks)",
                      yaxis_range=[0, 1], title=f"Learned vs extracted vectors by layer ({result['model']})")
    return _themed(fig)


def key_heads_figure(result: dict):
    v = result["values"]
    fig = _go().Figure()
    for setting, label in (("vector", "with the LTV"), ("icl", "plain 5-shot ICL")):
        names = [f"{setting}_baseline", f"{setting}_ablated_zero", f"{setting}_random_zero",
                 f"{setting}_ablated_mean", f"{setting}_random_mean"]
        names = [n for n in names if n in v]
        fig.add_bar(name=label, x=[n.split("_", 1)[1] for n in names], y=[v[n]["mean"] for n in names],
                    error_y={"type": "data", "symmetric": False,
                             "array": [v[n]["ci_high"] - v[n]["mean"] for n in names],
                             "arrayminus": [v[n]["mean"] - v[n]["ci_low"] for n in names]})
    fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1.05],
                      title=f"Key heads vs random heads (same layers), {result['model']}")
    return _themed(fig)


def composition_figure(result: dict):
    rows = result["tables"]["conditions"]
    fig = _go().Figure()
    fig.add_bar(name="exact match", x=[r["name"] for r in rows], y=[r["exact_match"] for r in rows])
    fig.add_bar(name="first token", x=[r["name"] for r in rows], y=[r["accuracy"] for r in rows])
    fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1.05],
                      title=f"Adding two learned vectors on the composed task ({result['model']})")
    return _themed(fig)


def ov_figure(result: dict):
    rows = [r for r in result["tables"]["conditions"] if "@" in r["condition"]]
    kinds = sorted({r["condition"].split("@")[0] for r in rows})
    fig = _go().Figure()
    for kind in kinds:
        pts = [r for r in rows if r["condition"].startswith(kind + "@")]
        fig.add_bar(name=kind, x=[r["condition"].split("@")[1] for r in pts], y=[r["accuracy"] for r in pts])
    for ref in ("vector", "zero_shot"):
        if ref in result["values"]:
            fig.add_hline(y=result["values"][ref]["mean"], line_dash="dot", annotation_text=ref)
    fig.update_layout(barmode="group", xaxis_title="placement", yaxis_title="accuracy", yaxis_range=[0, 1.05],
                      title=f"Re-injected path terms instead of θ ({result['model']})")
    return _themed(fig)


def rotation_figure(result: dict):
    rows = result["tables"]["by_layer"]
    fig = _go().Figure()
    fig.add_scatter(x=[r["layer"] for r in rows], y=[r["rotation_cos"] for r in rows],
                    mode="lines+markers", name="cos(θ, Qθ)")
    fig.add_scatter(x=[r["layer"] for r in rows], y=[r["fit_r2"] for r in rows],
                    mode="lines+markers", name="held-out R²")
    fig.add_scatter(x=[r["layer"] for r in rows], y=[r["scale_ratio"] for r in rows],
                    mode="lines+markers", name="‖Sθ‖/‖θ‖", yaxis="y2")
    fig.update_layout(xaxis_title="injection layer", yaxis_title="cos / R²",
                      yaxis2={"title": "scale", "overlaying": "y", "side": "right"},
                      title=f"Rotation vs scaling of learned vectors ({result['model']})")
    return _themed(fig)


def atv_figure(result: dict):
    v = result["values"]
    fig = _go().Figure()
    methods = sorted({k.removesuffix("_in_domain").removesuffix("_unseen") for k in v})
    for group, label in (("in_domain", "in-domain"), ("unseen", "unseen")):
        names = [m for m in methods if f"{m}_{group}" in v]
        fig.add_bar(name=label, x=names, y=[v[f"{m}_{group}"]["mean"] for m in names])
    fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1.05],
                      title=f"Adaptive task vectors ({result['model']})")
    return _themed(fig)


def tvp_figure(result: dict):
    fig = _go().Figure()
    rows = result["tables"]["tv_accuracy_by_layer"]
    for arm, label in (("with_tvp", "with TVP loss"), ("without_tvp", "ICL loss only")):
        pts = [r for r in rows if r["arm"] == arm]
        fig.add_scatter(x=[r["layer"] for r in pts], y=[r["tv_accuracy"] for r in pts],
                        mode="lines+markers", name=label)
    fig.update_layout(xaxis_title="layer", yaxis_title="task-vector accuracy", yaxis_range=[0, 1],
                      title="Task vectors by layer, trained from scratch")
    return _themed(fig)
