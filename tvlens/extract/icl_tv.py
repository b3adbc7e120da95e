"""ICL task vectors (Hendel, Geva, Globerson 2023, "In-Context Learning Creates Task Vectors").

For layer l, run N ICL prompts (K demonstrations and a *dummy* query each) and average
the residual stream after layer l at the last token:

    θ_l = (1/N) Σ_i h_l(prompt_i)[last]

Injected by **replacing** the residual after layer l at the zero-shot query's last token.
The dummy queries are train items, so no test item leaks into the vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tvlens.activations import residuals
from tvlens.errors import TvlensError
from tvlens.models.loading import fingerprint
from tvlens.prompts import Template, get_template, make_examples, tokenize
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector


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
    layers = [layers] if isinstance(layers, int) else list(layers)
    template = get_template(template)
    train = task.train
    if n_prompts < 1:
        raise TvlensError(f"n_prompts must be at least 1, got {n_prompts}")
    if len(train) < shots + 1:
        raise TvlensError(
            f"task {task.name!r} has {len(train)} train items; {shots} shots need {shots + 1}"
        )
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(train), (n_prompts,), generator=rng).tolist()
    examples = make_examples([train[i] for i in picks], train, shots=shots, seed=seed)
    total = None
    for start in range(0, len(examples), batch_size):
        batch = tokenize(model, examples[start : start + batch_size], template)
        resid = residuals(model, batch, layers, "last").float().sum(dim=0)  # [L, d_model]
        total = resid if total is None else total + resid
    mean = (total / len(examples)).to(model.cfg.dtype if hasattr(model.cfg, "dtype") else torch.float32)
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
