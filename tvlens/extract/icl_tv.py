"""ICL task vectors (Hendel, Geva, Globerson 2023, "In-Context Learning Creates Task Vectors")
and the vanilla difference vector (the baseline of Yang et al. 2025, "Task Vectors, Learned
Not Extracted").

For layer l, run N ICL prompts (K demonstrations and a *dummy* query each) and average
the residual stream after layer l at the last token:

    θ_l = (1/N) Σ_i h_l(prompt_i)[last]                                    (ICL-TV)

Injected by **replacing** the residual after layer l at the zero-shot query's last token.
The vanilla vector subtracts the mean zero-shot residual of the same N dummy queries,

    θ_l = (1/N) Σ_i h_l(prompt_i)[last] − (1/N) Σ_i h_l(x_i)[last]         (vanilla)

and is injected by **adding**. The dummy queries are train items, so no test item leaks
into either vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.activations import residuals
from tvlens.errors import TvlensError
from tvlens.injection import check_layer
from tvlens.models.loading import fingerprint
from tvlens.prompts import Example, Template, get_template, make_examples, tokenize
from tvlens.tasks.task import Pair, Task
from tvlens.vector import TaskVector


def dummy_queries(task: Task, shots: int, n_prompts: int, seed: int) -> list[Pair]:
    """``n_prompts`` train pairs drawn with replacement (seeded) to serve as dummy queries."""
    train = task.train
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise TvlensError(f"n_prompts must be a positive integer (prompts to average), got {n_prompts!r}")
    if len(train) < shots + 1:
        raise TvlensError(
            f"task {task.name!r} has {len(train)} train items; {shots} shots need {shots + 1}; "
            "use fewer shots or a larger task"
        )
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(train), (n_prompts,), generator=rng).tolist()
    return [train[i] for i in picks]


def mean_last_residual(model, examples: Sequence[Example], layers: Sequence[int],
                       template: Template, batch_size: int) -> Float[Tensor, "layer d_model"]:
    """(1/N) Σ_i h_l(prompt_i)[last] for every l in ``layers`` (float32 accumulation)."""
    if batch_size <= 0:
        raise TvlensError(f"batch_size must be positive, got {batch_size}")
    total = None
    for start in range(0, len(examples), batch_size):
        batch = tokenize(model, examples[start : start + batch_size], template)
        resid = residuals(model, batch, layers, "last").float().sum(dim=0)  # [L, d_model]
        total = resid if total is None else total + resid
    return total / len(examples)


def _layers(model, layers) -> list[int]:
    out = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not out:
        raise TvlensError("no layers given: pass a layer or a list of layers")
    for layer in out:
        check_layer(model, layer)
    return out


def _dtype(model):
    return getattr(model.cfg, "dtype", torch.float32) or torch.float32


@torch.no_grad()
def icl_task_vector(
    model,
    task: Task,
    layers: int | Sequence[int],
    *,
    shots: int = 5,
    n_prompts: int = 32,
    template: str | Template = "arrow",
    batch_size: int = 16,
    seed: int = 0,
) -> TaskVector:
    """Hendel's ICL task vector at one or several layers (one vector per layer).

    Args:
        layers: a layer or layers (the vector for each is that layer's mean residual).
        shots: K demonstrations per prompt (Hendel: 5).
        n_prompts: N prompts averaged (dummy queries drawn from the train split).
        seed: prompt sampling seed.

    Returns:
        A replace-mode :class:`TaskVector` at position ``"last"``, ``[L, 1, d_model]``.
    """
    layers = _layers(model, layers)
    template = get_template(template)
    queries = dummy_queries(task, shots, n_prompts, seed)
    examples = make_examples(queries, task.train, shots=shots, seed=seed)
    mean = mean_last_residual(model, examples, layers, template, batch_size).to(_dtype(model))
    return TaskVector(
        vectors=mean.unsqueeze(1),
        layers=tuple(layers),
        positions=("last",),
        model=fingerprint(model),
        mode="replace",
        method="icl-tv",
        hyperparameters={"shots": shots, "n_prompts": n_prompts, "template": template.demo, "seed": seed},
        task=task.name,
    )


@torch.no_grad()
def vanilla_task_vector(
    model,
    task: Task,
    layers: int | Sequence[int],
    *,
    shots: int = 5,
    n_prompts: int = 32,
    template: str | Template = "arrow",
    batch_size: int = 16,
    seed: int = 0,
) -> TaskVector:
    """The vanilla task vector: mean ICL residual minus mean zero-shot residual (add mode).

    Same prompts as :func:`icl_task_vector` with the same arguments (so
    ``vanilla == icl_tv − mean zero-shot residual`` exactly); the zero-shot prompts are
    the same N dummy queries without demonstrations.

    Returns:
        An add-mode :class:`TaskVector` at position ``"last"``, ``[L, 1, d_model]``.
    """
    layers = _layers(model, layers)
    template = get_template(template)
    queries = dummy_queries(task, shots, n_prompts, seed)
    icl = make_examples(queries, task.train, shots=shots, seed=seed)
    zero = make_examples(queries, shots=0)
    diff = (mean_last_residual(model, icl, layers, template, batch_size)
            - mean_last_residual(model, zero, layers, template, batch_size))
    return TaskVector(
        vectors=diff.to(_dtype(model)).unsqueeze(1),
        layers=tuple(layers),
        positions=("last",),
        model=fingerprint(model),
        mode="add",
        method="vanilla",
        hyperparameters={"shots": shots, "n_prompts": n_prompts, "template": template.demo, "seed": seed},
        task=task.name,
    )
