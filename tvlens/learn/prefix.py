"""Prefix caching: train a vector injected at layer l without re-running blocks 0..l.

An additive vector θ injected at ``blocks.{l}.hook_resid_post`` (tvlens's "layer l", for
the smallest layer l = min 𝓛 of the layer set) cannot change anything computed before
that hook point. So for a fixed (teacher-forced) batch the residual

    h_l = block_l ∘ … ∘ block_0 ∘ embed (ids)          [batch, seq, d_model]

is a constant of training. It is computed once, without gradients (the forward stops at
the hook by raising a private exception), and every training step then runs only blocks
l+1 … L−1 (plus the final norm and unembedding):

- blocks 0..l are *skipped*: each ``model.blocks[i].original_component`` is swapped for
  :class:`SkipBlock`, which returns its hidden-states input unchanged, in the same form
  the real block returns it (a bare tensor for the HF Llama decoder layer in
  transformers 5, a 1-tuple for the TransformerLens-native block);
- a hook at ``blocks.{l}.hook_resid_post``, registered *before* the injection hooks at
  that point, replaces the (now meaningless) residual by the cached h_l; the injection
  hooks then add θ exactly as in the full forward.

TransformerLens's own ``start_at_layer`` still executes the early blocks inside the
bridge (it only discards their output), so it gives no speed-up; the swap does. Every
swapped module is restored in a ``finally``.

The cache is exact (same inputs, same frozen weights), so the loss and ∂loss/∂θ agree
with the full forward up to floating-point reordering (≤ 1e-5, tested). It is refused,
and training falls back to the full forward, where it does not hold or does not pay:
the model's blocks are not ``BlockBridge`` wrappers with an ``original_component`` (no
way to skip them), or the cache would not fit the memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from tvlens.injection import Hook, resid_hook_name

CACHE_BUDGET_BYTES = 2 * 1024**3


class _StopForward(Exception):
    """Raised by the capture hook once the cached residual is stored."""


class SkipBlock(nn.Module):
    """Stands in for a decoder block: returns the hidden states it is given.

    ``as_tuple`` mirrors the replaced block's return convention (``(h,)`` vs ``h``).
    """

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


def prefix_cache_support(model, layer: int) -> tuple[bool, str]:
    """Whether blocks 0..``layer`` of ``model`` can be skipped, and why not if not."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return False, "the model has no .blocks list"
    for i in range(layer + 1):
        block = blocks[i]
        if "_original_component" not in getattr(block, "_modules", {}):
            return False, f"block {i} ({type(block).__name__}) has no original_component to skip"
    return True, ""


def cache_nbytes(n_rows: int, seq: int, d_model: int, dtype=torch.float32) -> int:
    return n_rows * seq * d_model * torch.tensor([], dtype=dtype).element_size()


@torch.no_grad()
def capture_prefix(model, input_ids: Int[Tensor, "batch seq"],
                   attention_mask: Int[Tensor, "batch seq"], layer: int,
                   *, chunk: int = 32) -> tuple[Float[Tensor, "batch seq d_model"], bool]:
    """h_l = ``blocks.{layer}.hook_resid_post`` for every row, and the block return form.

    The forward stops right after the hook (blocks > ``layer`` never run). Returns the
    residual ``[batch, seq, d_model]`` and whether block 0 returns a tuple.
    """
    name = resid_hook_name(layer)
    device = model.cfg.device
    out: list[Tensor] = []
    form: dict[str, bool] = {}

    def grab(act, hook=None):
        out.append(act.detach().clone())
        raise _StopForward

    def note_form(_module, _args, output):
        form.setdefault("tuple", isinstance(output, tuple))

    handle = model.blocks[0].original_component.register_forward_hook(note_form)
    try:
        for start in range(0, input_ids.shape[0], chunk):
            with model.hooks(fwd_hooks=[(name, grab)]):
                try:
                    model(input_ids[start : start + chunk].to(device),
                          attention_mask=attention_mask[start : start + chunk].to(device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return torch.cat(out, dim=0), form.get("tuple", False)


@contextmanager
def skipped_blocks(model, layers: Sequence[int], as_tuple: bool):
    """Swap ``model.blocks[i].original_component`` for a :class:`SkipBlock` in the body."""
    saved = {}
    try:
        for i in layers:
            block = model.blocks[i]
            saved[i] = block._modules["_original_component"]
            block._modules["_original_component"] = SkipBlock(as_tuple)
        yield model
    finally:
        for i, module in saved.items():
            model.blocks[i]._modules["_original_component"] = module


def replace_resid_hook(layer: int, cached: Float[Tensor, "batch seq d_model"]) -> Hook:
    """A hook putting ``cached`` in place of the residual after ``layer`` (register first)."""

    def hook(resid: Tensor, hook=None) -> Tensor:
        if resid.shape != cached.shape:
            raise RuntimeError(f"cached residual {tuple(cached.shape)} does not match the "
                               f"forward's {tuple(resid.shape)}")
        return cached.to(device=resid.device, dtype=resid.dtype)

    return (resid_hook_name(layer), hook)


@contextmanager
def cached_forward(model, layer: int, cached: Tensor, as_tuple: bool):
    """Body forwards skip blocks 0..``layer``; yields the hook to register *first*."""
    with skipped_blocks(model, range(layer + 1), as_tuple):
        yield replace_resid_hook(layer, cached)
