"""Reading activations: residuals (or any hook) at resolved prompt positions.

Thin conveniences over :func:`tvlens.runner.run` (which does every forward), so the
left-padding rule — positions come from the attention mask — lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.interventions.residual import check_layer, resid_hook_name
from tvlens.prompts import Position, PromptBatch
from tvlens.runner import run


def capture(model, batch, names: Sequence[str], interventions=None, *,
            batch_size: int | None = None) -> dict[str, Tensor]:
    """Full activations ``{hook name: [batch, seq, ...]}`` over ``batch`` (a PromptBatch or
    PromptSet), with ``interventions`` (or raw ``fwd_hooks``) active. Gradients are kept if
    the caller has them enabled."""
    out = run(model, batch, interventions, capture=names, capture_at=None, logits=None,
              batch_size=batch_size, grad=torch.is_grad_enabled(), progress=False)
    return out.captured


def at_position(acts: Tensor, batch: PromptBatch, position: Position = "last") -> Tensor:
    """``acts[b, col_b]`` for the column of ``position`` in each row: ``[batch, ...]``."""
    cols = batch.position_index(position).to(acts.device)
    return acts[torch.arange(acts.shape[0], device=acts.device), cols]


def residuals(model, batch, layers: Sequence[int], position: Position = "last",
              interventions=None, *, batch_size: int | None = None
              ) -> Float[Tensor, "batch layer d_model"]:
    """The residual stream after each of ``layers`` at ``position`` of every prompt."""
    for layer in layers:
        check_layer(model, layer)
    names = [resid_hook_name(layer) for layer in layers]
    out = run(model, batch, interventions, capture=names, capture_at=position, logits=None,
              batch_size=batch_size, grad=torch.is_grad_enabled(), progress=False)
    return torch.stack([out.captured[n] for n in names], dim=1)
