"""Evaluating and analysing adaptive generators.

- :func:`compare`: ATV vs zero-shot vs K-shot ICL (vs a per-task LTV with
  ``ltv_steps``) on in-domain and unseen tasks, accuracy with 95% bootstrap CIs (every
  number from :func:`tvlens.evaluate`) — one row per (task, method).
- :func:`generated_vectors`: ``V(x)`` for the test queries of several tasks, stacked.
- :func:`layer_norm_profile`: mean ``‖λ·V(x)_l‖₂`` per target layer.
- :func:`similarity_structure`: cosine similarity of the flattened generated vectors,
  mean within a task (off-diagonal pairs) vs across tasks — if the generator encodes the
  task, within > across.
- :func:`projection_2d` / :func:`projection_figure`: the first two principal components
  (``torch.pca_lowrank``, centred) of the flattened vectors, coloured by task.
- :func:`lambda_sweep`: accuracy when the trained vectors are injected with λ·k.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.evaluation import evaluate
from tvlens.learn import learn_task_vector
from tvlens.tasks.task import Task

from tvlens.adaptive.generator import AdaptiveGenerator, check_scale
from tvlens.adaptive.training import check_unseen


def _queries(task: Task, n: int | None, split: str = "test") -> list[str]:
    xs = [x for x, _ in task.split(split)][:n]
    if not xs:
        raise TvlensError(f"task {task.name!r} has no {split} items")
    return xs


def compare(target, generator: AdaptiveGenerator, in_domain: Sequence[Task] = (),
            unseen: Sequence[Task] = (), *, n: int | None = 50, shots: int = 5,
            ltv_steps: int | None = None, ltv_layer: int | None = None, seed: int = 0,
            batch_size: int = 16) -> pd.DataFrame:
    """Accuracy table: columns task, group (in-domain / unseen), method, accuracy, ci_low,
    ci_high, n. Methods: ``zero-shot``, ``icl-{shots}``, ``atv`` and, with ``ltv_steps``,
    ``ltv`` (trained on the task's train split at ``ltv_layer``, default
    ``n_layers // 3``, last position). Every method is scored on the same test queries
    with the generator's target template."""
    check_unseen(in_domain, unseen)
    if not in_domain and not unseen:
        raise TvlensError("no tasks to evaluate; give in-domain and/or unseen tasks")
    tpl = generator.template
    rows = []
    for group, tasks in (("in-domain", in_domain), ("unseen", unseen)):
        for task in tasks:
            kw = dict(n=n, template=tpl, seed=seed, batch_size=batch_size, progress=False)
            runs = {"zero-shot": evaluate(target, task, **kw),
                    f"icl-{shots}": evaluate(target, task, shots=shots, **kw),
                    "atv": evaluate(target, task, vector=generator, **kw)}
            if ltv_steps:
                layer = ltv_layer if ltv_layer is not None else int(target.cfg.n_layers) // 3
                tv = learn_task_vector(target, task, layer, ("last",), steps=ltv_steps,
                                       template=tpl, seed=seed, progress=False)
                runs["ltv"] = evaluate(target, task, vector=tv, **kw)
            for method, r in runs.items():
                rows.append({"task": task.name, "group": group, "method": method,
                             "accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high,
                             "n": r.n})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per (group, method) of a :func:`compare` table."""
    return table.groupby(["group", "method"], sort=False)["accuracy"].mean().unstack("method")


@torch.no_grad()
def generated_vectors(generator: AdaptiveGenerator, tasks: Sequence[Task], *, n: int = 20,
                      split: str = "test", batch_size: int = 32
                      ) -> tuple[Float[Tensor, "N layer d_model"], list[str]]:
    """``V(x)`` (unscaled) for the first ``n`` queries of each task, and each row's task name."""
    vs, labels = [], []
    for task in tasks:
        xs = _queries(task, n, split)
        for i in range(0, len(xs), batch_size):
            vs.append(generator.generate(xs[i:i + batch_size]).cpu())
        labels += [task.name] * len(xs)
    return torch.cat(vs), labels


def layer_norm_profile(generator: AdaptiveGenerator, vectors: Tensor) -> pd.DataFrame:
    """Mean and std over queries of ``‖λ·V_l‖₂`` for each target layer ``l``."""
    norms = vectors.norm(dim=-1) * abs(generator.scale)  # [N, L]
    return pd.DataFrame({"layer": list(generator.layers), "mean_norm": norms.mean(0).tolist(),
                         "std_norm": norms.std(0).tolist() if len(norms) > 1 else [0.0] * norms.shape[1]})


def cosine_matrix(vectors: Float[Tensor, "N layer d_model"]) -> Float[Tensor, "N N"]:
    """Pairwise cosine similarity of the flattened vectors."""
    flat = torch.nn.functional.normalize(vectors.reshape(len(vectors), -1).float(), dim=-1)
    return flat @ flat.T


def similarity_structure(vectors: Tensor, labels: Sequence[str], *, centre: bool = False) -> dict:
    """Mean cosine within tasks (pairs i ≠ j of one task) and across tasks, per task and overall.

    ``centre=True`` subtracts the mean vector over all queries first: a component shared
    by every query (the expansion's bias, an answer-format direction) otherwise makes all
    cosines ≈ 1 and hides the task structure.
    """
    if len(set(labels)) < 2:
        raise TvlensError("similarity structure needs vectors from at least two tasks")
    if centre:
        vectors = vectors - vectors.mean(0, keepdim=True)
    sim = cosine_matrix(vectors)
    lab = list(labels)
    same = torch.tensor([[a == b for b in lab] for a in lab])
    off = ~torch.eye(len(lab), dtype=torch.bool)
    per_task = {}
    for t in dict.fromkeys(lab):
        rows = torch.tensor([x == t for x in lab])
        w = sim[rows][:, rows][off[rows][:, rows]]
        a = sim[rows][:, ~rows]
        per_task[t] = {"within": float(w.mean()) if w.numel() else float("nan"),
                       "across": float(a.mean())}
    return {"within": float(sim[same & off].mean()), "across": float(sim[~same].mean()),
            "per_task": per_task}


def projection_2d(vectors: Tensor, labels: Sequence[str]) -> pd.DataFrame:
    """First two principal components of the flattened vectors (centred): columns pc1, pc2, task."""
    flat = vectors.reshape(len(vectors), -1).float()
    if len(flat) < 3:
        raise TvlensError("a 2-D projection needs at least 3 vectors")
    centred = flat - flat.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ v[:2].T
    return pd.DataFrame({"pc1": xy[:, 0].tolist(), "pc2": xy[:, 1].tolist(), "task": list(labels)})


def projection_figure(df: pd.DataFrame, title: str = "Generated task vectors (PCA)"):
    """A plotly scatter of :func:`projection_2d`, one colour per task."""
    import plotly.graph_objects as go

    from tvlens.plots import apply_theme

    fig = go.Figure()
    for task, part in df.groupby("task", sort=False):
        fig.add_trace(go.Scatter(x=part["pc1"], y=part["pc2"], mode="markers", name=str(task)))
    fig.update_layout(title=title, xaxis_title="PC 1", yaxis_title="PC 2")
    return apply_theme(fig)


def lambda_sweep(target, generator: AdaptiveGenerator, task: Task,
                 multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), *, n: int | None = 50,
                 seed: int = 0) -> pd.DataFrame:
    """Accuracy on ``task`` with the vectors injected at λ·k for each multiplier k (k ≠ 0)."""
    rows = []
    for k in multipliers:
        lam = check_scale(generator.scale * k)
        r = evaluate(target, task, vector=generator.scaled(lam), n=n, seed=seed, progress=False)
        rows.append({"multiplier": k, "scale": lam, "accuracy": r.accuracy,
                     "ci_low": r.ci_low, "ci_high": r.ci_high})
    return pd.DataFrame(rows)


__all__ = ["compare", "cosine_matrix", "generated_vectors", "lambda_sweep", "layer_norm_profile",
           "projection_2d", "projection_figure", "similarity_structure", "summary"]
