"""One way to read activations: residuals (or any hook) at resolved prompt positions.

Every method that extracts something from a forward pass goes through here, so the
left-padding rule (positions come from the attention mask) lives in one place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.injection import Hook, check_layer, resid_hook_name
from tvlens.prompts import Position, PromptBatch


def capture(model, batch: PromptBatch, names: Sequence[str],
            hooks: Sequence[Hook] = ()) -> dict[str, Tensor]:
    """Full activations ``{hook name: [batch, seq, ...]}`` of one forward over ``batch``.

    ``hooks`` (an injection, an ablation) are active during the forward. Gradients are
    kept if the caller has them enabled.
    """
    store: dict[str, Tensor] = {}

    def saver(name):
        def fn(act, hook=None):
            store[name] = act
            return act
        return fn

    capture_hooks = [(n, saver(n)) for n in names]
    device = model.cfg.device
    model.run_with_hooks(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                         fwd_hooks=list(hooks) + capture_hooks)
    return store


def at_position(acts: Tensor, batch: PromptBatch, position: Position = "last") -> Tensor:
    """``acts[b, col_b]`` for the column of ``position`` in each row: ``[batch, ...]``."""
    cols = batch.position_index(position).to(acts.device)
    return acts[torch.arange(acts.shape[0], device=acts.device), cols]


def residuals(model, batch: PromptBatch, layers: Sequence[int], position: Position = "last",
              hooks: Sequence[Hook] = ()) -> Float[Tensor, "batch layer d_model"]:
    """The residual stream after each of ``layers`` at ``position`` of every prompt."""
    for layer in layers:
        check_layer(model, layer)
    names = [resid_hook_name(layer) for layer in layers]
    store = capture(model, batch, names, hooks)
    return torch.stack([at_position(store[n], batch, position) for n in names], dim=1)
