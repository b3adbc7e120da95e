"""Helpers shared by the attribution analyses: prompts, vectors, heads, answer scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.heads import Head, all_heads, check_heads  # noqa: F401  (re-exported)
from tvlens.evaluation import build_examples
from tvlens.injection import Hook
from tvlens.prompts import PromptBatch, Template, tokenize
from tvlens.scoring import last_token_logits
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector



def query_batch(model, task: Task, *, n: int | None = 32, shots: int = 0, split: str = "test",
                template: str | Template = "arrow", seed: int = 0) -> PromptBatch:
    """The first ``n`` items of ``split`` as one left-padded batch (``shots`` demos each)."""
    return tokenize(model, build_examples(task, shots=shots, split=split, n=n, seed=seed), template)


def single_vector(model, vector: TaskVector) -> tuple[int, object, Float[Tensor, " d_model"]]:
    """``(layer, position, c)`` of a one-layer, one-position, shared vector.

    ``c = scale · θ`` is the value the injection writes (added, or replacing the residual).
    Refuses a vector made for another model, a per-example vector, or several layers.
    """
    if not isinstance(vector, TaskVector):
        raise TvlensError(f"expected a TaskVector, got {type(vector).__name__}")
    vector.check_model(model)
    if vector.per_example:
        raise TvlensError("this analysis needs one shared vector, not per-example vectors; "
                          "average them first (vectors.mean(0))")
    if len(vector.layers) != 1 or len(vector.positions) != 1:
        raise TvlensError(
            f"this analysis takes a vector at one layer and one position, got layers "
            f"{vector.layers} and positions {vector.positions}; slice it with "
            "TaskVector.single(model, tv.at(layer, pos), layer, pos, mode=tv.mode)"
        )
    if vector.positions[0] == "all":
        raise TvlensError("position 'all' has no single injected position; use a vector at one position")
    c = vector.vectors[0, 0].detach().float().to(model.cfg.device) * float(vector.scale)
    return vector.layers[0], vector.positions[0], c


def vector_hooks(model, vector: TaskVector | None, batch: PromptBatch) -> list[Hook]:
    return [] if vector is None else list(vector.hooks(model, batch))


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"12.3,14.0"`` → ``[(12, 3), (14, 0)]``."""
    heads = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            layer, h = item.split(".")
            heads.append((int(layer), int(h)))
        except ValueError:
            raise TvlensError(f"cannot read head {item!r}: write heads as LAYER.HEAD, e.g. 12.3,14.0") from None
    if not heads:
        raise TvlensError("no heads given: write them as LAYER.HEAD,LAYER.HEAD")
    return heads


def check_percent(percent: float) -> float:
    if not (isinstance(percent, (int, float)) and 0 < percent <= 100):
        raise TvlensError(f"percent must be in (0, 100], got {percent!r}")
    return float(percent)


def answer_prob(logits: Float[Tensor, "batch vocab"], batch: PromptBatch) -> Float[Tensor, " batch"]:
    """p(first answer token) from last-token logits."""
    target = batch.first_answer_ids.to(logits.device)
    return logits.float().softmax(-1)[torch.arange(len(batch), device=logits.device), target]


def accuracy(model, batch: PromptBatch, hooks: Sequence[Hook] = ()) -> float:
    """First-token top-1 accuracy of ``batch`` under ``hooks``."""
    with torch.no_grad():
        logits = last_token_logits(model, batch, hooks)
    return float((logits.argmax(-1).cpu() == batch.first_answer_ids.cpu()).float().mean())


def repeat_batch(batch: PromptBatch, copies: int) -> PromptBatch:
    """``copies`` stacked copies of ``batch`` (copy j holds rows ``j·B .. (j+1)·B − 1``)."""
    return batch.select(list(range(len(batch))) * copies)


def with_vectors(vector: TaskVector, vectors: Tensor, layers, positions, mode: str = "add") -> TaskVector:
    """A vector with the provenance of ``vector`` but new values / layers (for re-injection)."""
    return replace(vector, vectors=vectors, layers=tuple(layers), positions=tuple(positions),
                   mode=mode, scale=1.0, history={})
