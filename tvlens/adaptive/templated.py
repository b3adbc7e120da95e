"""Scoring over several target templates: the reference recipe's tasks each have several.

For a task with templates ``τ_1 … τ_m`` (:func:`eval_templates`), the accuracy is the mean
over templates and items of the first-token hit,

    acc = (1 / (m·n)) Σ_k Σ_i 1[argmax p(· | τ_k(x_i) ; + λ·V(x_i)) = y_i,1]

with its interval from :func:`tvlens.stats.accuracy` over the pooled ``m·n`` scores (the
same queries under every template); each template's own :class:`EvalResult` comes with
it. The released evaluation scores each template separately (``ATV_evaluate.py:355-362``);
the pooled mean is the mean of those per-template accuracies (equal ``n``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import replace

import pandas as pd

from tvlens.evaluation import EvalResult, evaluate
from tvlens.stats import accuracy
from tvlens.tasks.task import Task
from tvlens.templates import Template, atv_templates, get_template


def eval_templates(generator, task: Task, natural: Sequence[str] | None = None) -> list[Template]:
    """The templates ``generator`` is scored with on ``task``: with ``natural_templates``
    the task's ATV templates (:func:`~tvlens.templates.atv_templates`), else its one
    ``target_template``."""
    if generator.config.natural_templates:
        return atv_templates(task.name, natural)
    return [get_template(generator.template)]


def evaluate_templates(model, task: Task, templates: Sequence[Template], *, vector=None,
                       shots: int = 0, seed: int = 0, **kw) -> tuple[EvalResult, list[EvalResult]]:
    """``evaluate`` under each of ``templates`` (same queries, same demonstrations): the
    pooled result (module docstring; its records stack the runs' with a ``template_index``
    column; ``template`` reads ``"k templates"``) and the per-template results. ``kw`` goes
    to :func:`evaluate`."""
    runs = []
    with warnings.catch_warnings():  # the vector's own format differs on purpose here
        warnings.filterwarnings("ignore", message=".*the vector was made with the")
        for tmpl in templates:
            runs.append(evaluate(model, task, vector=vector, shots=shots, template=tmpl, seed=seed, **kw))
    records = pd.concat([r.records.assign(template_index=k) for k, r in enumerate(runs)],
                        ignore_index=True)
    acc = accuracy(records["correct"].to_numpy(dtype=float), seed=seed)
    pooled = replace(runs[0], accuracy=acc.value, ci_low=acc.ci_low, ci_high=acc.ci_high, n=acc.n,
                     records=records, template=f"{len(runs)} templates")
    return pooled, runs


def per_template(runs: Sequence[EvalResult]) -> list[dict]:
    """``[{"template": demo or name, "accuracy": ..., "ci": [lo, hi]}]`` for records."""
    return [{"template": r.template, "accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high]}
            for r in runs]


__all__ = ["eval_templates", "evaluate_templates", "per_template"]
