"""ICL task vectors (Hendel, Geva, Globerson 2023, "In-Context Learning Creates Task Vectors")
and the vanilla difference vector (the baseline of Yang et al. 2025, "Task Vectors, Learned
Not Extracted").

For layer l, run N ICL prompts (K demonstrations and a *dummy* query each) and average
the residual stream after layer l at the last token:

    θ_l = (1/N) Σ_i h_l(prompt_i)[last]                                    (ICL-TV)

Injected by **replacing** the residual after layer l at the zero-shot query's last token.
The vanilla vector subtracts the mean zero-shot residual of the same N dummy queries,

    θ_l = (1/N) Σ_i h_l(prompt_i)[last] − (1/N) Σ_i h_l(x_i)[last]         (vanilla)

and is injected by **adding**. The dummy queries are train items
(:func:`tvlens.prompts.sample_queries`), so no test item leaks into either vector. The
prompts are one :class:`~tvlens.prompts.PromptSet`; the residuals are read by
:func:`tvlens.runner.run` and summed in float32, chunk by chunk. Each vector records its
:class:`~tvlens.methods.ICLTVConfig` / :class:`~tvlens.methods.VanillaConfig` (the
template by name) as its ``hyperparameters``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.interventions import check_layer, resid_hook_name
from tvlens.kv_cache import model_dtype
from tvlens.methods import DEFAULT_TEMPLATES, ICLTVConfig, VanillaConfig
from tvlens.models.loading import fingerprint
from tvlens.prompts import PromptSet, sample_queries
from tvlens.runner import run
from tvlens.tasks.task import Task
from tvlens.templates import Template, template_name
from tvlens.vector import TaskVector


def chunk_sum(x: Float[Tensor, "n ..."], batch_size: int | None) -> Float[Tensor, "..."]:
    """Σ over the first dimension in float32, ``batch_size`` rows at a time (the order in
    which the sums were accumulated when each chunk was its own forward)."""
    step = len(x) if batch_size is None else batch_size
    total = None
    for start in range(0, len(x), step):
        part = x[start : start + step].float().sum(dim=0)
        total = part if total is None else total + part
    return total


def mean_last_residual(model, prompts: PromptSet, layers: Sequence[int],
                       batch_size: int | None = 16) -> Float[Tensor, "layer d_model"]:
    """(1/N) Σ_i h_l(prompt_i)[last] for every l in ``layers`` (float32 accumulation)."""
    names = [resid_hook_name(layer) for layer in layers]
    out = run(model, prompts, capture=names, capture_at="last", logits=None,
              batch_size=batch_size, desc="residuals")
    resid = torch.stack([out.captured[n] for n in names], dim=1)  # [N, L, d_model]
    return chunk_sum(resid, batch_size) / len(prompts)


def _layers(model, layers) -> list[int]:
    out = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else list(layers)
    if not out:
        raise TvlensError("no layers given: pass a layer or a list of layers")
    for layer in out:
        check_layer(model, layer)
    return out


def _prompts(model, task: Task, cfg, template, *, shots: int) -> PromptSet:
    """The ``cfg.n_prompts`` dummy queries of ``cfg.seed`` with ``shots`` demonstrations."""
    queries = sample_queries(task, cfg.n_prompts, seed=cfg.seed, shots=cfg.shots)
    return PromptSet.build(model, task, queries=queries, shots=shots, template=template,
                           seed=cfg.seed)


@torch.no_grad()
def icl_task_vector(
    model,
    task: Task,
    layers: int | Sequence[int],
    *,
    shots: int = 5,
    n_prompts: int = 32,
    template: str | Template = DEFAULT_TEMPLATES["icl-tv"],
    batch_size: int = 16,
    seed: int = 0,
) -> TaskVector:
    """Hendel's ICL task vector at one or several layers (one vector per layer).

    Args:
        layers: a layer or layers (the vector for each is that layer's mean residual).
        shots: K demonstrations per prompt (Hendel: 5).
        n_prompts: N prompts averaged (dummy queries drawn from the train split).
        seed: prompt sampling seed.
        batch_size: prompts per forward (bounds memory; not part of the config).

    Returns:
        A replace-mode :class:`TaskVector` at position ``"last"``, ``[L, 1, d_model]``.
    """
    layers = _layers(model, layers)
    cfg = ICLTVConfig(shots=shots, n_prompts=n_prompts, template=template_name(template), seed=seed)
    mean = mean_last_residual(model, _prompts(model, task, cfg, template, shots=shots), layers,
                              batch_size)
    return TaskVector(
        vectors=mean.to(model_dtype(model)).unsqueeze(1),
        layers=tuple(layers),
        positions=("last",),
        model=fingerprint(model),
        mode="replace",
        method=cfg.method,
        hyperparameters=cfg.to_dict(),
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
    template: str | Template = DEFAULT_TEMPLATES["vanilla"],
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
    cfg = VanillaConfig(shots=shots, n_prompts=n_prompts, template=template_name(template), seed=seed)
    icl = _prompts(model, task, cfg, template, shots=shots)
    zero = _prompts(model, task, cfg, template, shots=0)
    diff = (mean_last_residual(model, icl, layers, batch_size)
            - mean_last_residual(model, zero, layers, batch_size))
    return TaskVector(
        vectors=diff.to(model_dtype(model)).unsqueeze(1),
        layers=tuple(layers),
        positions=("last",),
        model=fingerprint(model),
        mode="add",
        method=cfg.method,
        hyperparameters=cfg.to_dict(),
        task=task.name,
    )
