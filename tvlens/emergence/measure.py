"""Emergence measurements: ICL accuracy (in and out of distribution) and task-vector
accuracy by layer, for one trained model (the with/without-TVP comparison that trains two
is :func:`tvlens.emergence.training.compare`).

Task-vector accuracy at layer l (Hendel et al.'s protocol, one vector per prompt as in
the TVP loss): for each prompt ``b`` of K pairs from task ``f`` cut at the last arrow,

    v_b = h_l(prompt_b)[last]                 (residual after layer l, [d_model])
    acc_l = mean_b [ argmax logits(BOS x'_b -> | h_l[arrow] ← v_b) = f(x'_b) ]

with ``x'_b ≠ x_K`` so the vector must carry the task, not the last answer. ICL
accuracy is ``mean_b [argmax logits(prompt_b)[last] = y_K]`` (argmax over the whole
vocabulary). Chance is ``1 / n_values``; the zero-shot query without a vector cannot
beat ``1 / n_tasks`` for offset tasks (it does not know the task).

Every measure is seeded (``EVAL_SEED``) and reported as a rate over ``n`` prompts; its
exact binomial interval is ``tvlens.stats.proportion(rate, n)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvlens.emergence.config import TVPConfig
from tvlens.emergence.synthetic import SyntheticTask, sample_batch, task_tables, token_prompt_batch
from tvlens.errors import TvlensError
from tvlens.interventions import ResidualEdit, resid_hook_name
from tvlens.runner import run

EVAL_SEED = 12345


def _check_ctx(model, n_pairs: int) -> None:
    if 4 * n_pairs > int(model.cfg.n_ctx):
        raise TvlensError(f"{n_pairs} pairs need {4 * n_pairs} tokens, beyond the model's "
                          f"n_ctx={model.cfg.n_ctx}; use fewer pairs")


def _n_values(model) -> int:
    return int(model.cfg.d_vocab) - 4


def _accuracy(model, ids, answers, interventions=None) -> float:
    """Share of token-level prompts ``ids`` whose argmax next token is ``answers``."""
    prompts = token_prompt_batch(ids, answers, _n_values(model))
    pred = run(model, prompts, interventions, batch_size=None, progress=False).prediction
    return (pred == answers).float().mean().item()


def icl_accuracy(model, tasks: Sequence[SyntheticTask], n_pairs: int, *, n: int = 256,
                 seed: int = EVAL_SEED) -> float:
    """Share of ``n`` K-pair prompts whose last answer ``y_K`` is the argmax prediction."""
    _check_ctx(model, n_pairs)
    batch = sample_batch(task_tables(tasks), n_pairs, n, torch.Generator().manual_seed(seed))
    return _accuracy(model, batch.prompt_ids(), batch.ys[:, -1])


def zero_shot_accuracy(model, tasks: Sequence[SyntheticTask], *, n: int = 256,
                       seed: int = EVAL_SEED) -> float:
    """Accuracy of the bare zero-shot queries (no context, no vector): the floor."""
    batch = sample_batch(task_tables(tasks), 1, n, torch.Generator().manual_seed(seed))
    return _accuracy(model, batch.query_ids, batch.query_answers)


def tv_accuracy_by_layer(model, tasks: Sequence[SyntheticTask], n_pairs: int, *,
                         layers: Sequence[int] | None = None, n: int = 256,
                         seed: int = EVAL_SEED) -> list[float]:
    """Task-vector accuracy ``acc_l`` (module docstring) for each of ``layers`` (default all)."""
    _check_ctx(model, n_pairs)
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    batch = sample_batch(task_tables(tasks), n_pairs, n, torch.Generator().manual_seed(seed))
    names = [resid_hook_name(layer) for layer in layers]
    prompts = token_prompt_batch(batch.prompt_ids(), batch.ys[:, -1], _n_values(model))
    acts = run(model, prompts, capture=names, capture_at="last", logits=None, batch_size=None,
               progress=False).captured
    return [_accuracy(model, batch.query_ids, batch.query_answers,
                      ResidualEdit((layer,), ("last",), acts[name][:, None, None, :], "replace"))
            for name, layer in zip(names, layers)]


def training_metrics(model, cfg: TVPConfig) -> dict:
    """The cheap per-checkpoint measures used for curves over training (seeded, ``n_eval``)."""
    train_tasks, _ = cfg.tasks()
    model.eval()
    tv = tv_accuracy_by_layer(model, train_tasks, cfg.n_pairs, n=cfg.n_eval)
    return {"icl_accuracy": icl_accuracy(model, train_tasks, cfg.n_pairs, n=cfg.n_eval),
            "tv_accuracy_by_layer": tv, "tv_accuracy": tv[cfg.tvp_layer]}


def evaluate_run(model, cfg: TVPConfig, *, n: int | None = None, seed: int = EVAL_SEED) -> dict:
    """All measures of one model (JSON-ready).

    Keys: ``icl_accuracy`` (training tasks, ``n_pairs``), ``ood_icl_accuracy`` (held-out
    task parameters, ``n_pairs``; None without held-out tasks), ``long_context_icl_accuracy``
    (training tasks, ``ood_pairs``), ``zero_shot_accuracy``, ``tv_accuracy_by_layer``,
    ``ood_tv_accuracy_by_layer``, ``tvp_layer``, ``tvp_lambda``, ``chance``.
    """
    n = n or cfg.n_eval
    train_tasks, held = cfg.tasks()
    model.eval()
    return {
        "icl_accuracy": icl_accuracy(model, train_tasks, cfg.n_pairs, n=n, seed=seed),
        "ood_icl_accuracy": icl_accuracy(model, held, cfg.n_pairs, n=n, seed=seed) if held else None,
        "long_context_icl_accuracy": icl_accuracy(model, train_tasks, cfg.ood_pairs, n=n, seed=seed),
        "zero_shot_accuracy": zero_shot_accuracy(model, train_tasks, n=n, seed=seed),
        "tv_accuracy_by_layer": tv_accuracy_by_layer(model, train_tasks, cfg.n_pairs, n=n, seed=seed),
        "ood_tv_accuracy_by_layer": (tv_accuracy_by_layer(model, held, cfg.n_pairs, n=n, seed=seed)
                                     if held else None),
        "tvp_layer": cfg.tvp_layer,
        "tvp_lambda": cfg.tvp_lambda,
        "chance": 1.0 / cfg.n_values,
    }
