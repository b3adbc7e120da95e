"""Prefix caching: train a vector injected at layer l without re-running blocks 0..l.

An additive vector θ injected at ``blocks.{l}.hook_resid_post`` (tvlens's "layer l", for
the smallest layer l = min 𝓛 of the layer set) cannot change anything computed before
that hook point. So for a fixed (teacher-forced) batch the residual

    h_l = block_l ∘ … ∘ block_0 ∘ embed (ids)          [batch, seq, d_model]

is a constant of training. It is captured once, without gradients, by
:func:`tvlens.runner.run` (``capture=[blocks.{l}.hook_resid_post]``, ``capture_at=None``,
``logits="answer"``: the same teacher-forced rows the loss runs on) with blocks l+1 … L−1
skipped (so only blocks 0..l run; the logits of that forward are discarded), and every
training step then runs only blocks l+1 … L−1 (plus the final norm, and the unembedding
of the answer-predicting columns only: :func:`tvlens.forward.run_logits`):

- blocks 0..l are *skipped*: each block's wrapped layer is swapped for
  :class:`SkipBlock` (through :func:`tvlens.compat.swap_original_component`), which
  returns its hidden-states input unchanged, in the same form the real layer returns it
  (a bare tensor for the HF Llama decoder layer in transformers 5, a 1-tuple for the
  TransformerLens-native block);
- a hook at ``blocks.{l}.hook_resid_post``, registered *before* the injection hooks at
  that point, replaces the (now meaningless) residual by the cached h_l; the injection
  hooks then add θ exactly as in the full forward.

TransformerLens's own ``start_at_layer`` still executes the early blocks inside the
bridge (it only discards their output), so it gives no speed-up; the swap does. Every
swapped module is restored in a ``finally``.

The cache is exact (same inputs, same frozen weights), so the loss and ∂loss/∂θ agree
with the full forward up to floating-point reordering (≤ 1e-5, tested). It is refused,
and training falls back to the full forward, where it does not hold or does not pay:
the model's blocks wrap no swappable layer (:func:`tvlens.compat.has_original_component`),
or the cache would not fit the memory budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tvlens.compat import has_original_component, original_component, swap_original_component
from tvlens.interventions import Hook, resid_hook_name
from tvlens.forward import TeacherForcedBatch
from tvlens.prompts import PromptBatch
from tvlens.runner import run

CACHE_BUDGET_BYTES = 2 * 1024**3


class SkipBlock(nn.Module):
    """Stands in for a decoder block: returns the hidden states it is given.

    ``as_tuple`` mirrors the replaced block's return convention (``(h,)`` vs ``h``);
    ``None`` reads it, at call time, from ``form["tuple"]`` (noted by an earlier block).
    """

    def __init__(self, as_tuple: bool | None, form: dict | None = None):
        super().__init__()
        self.as_tuple = as_tuple
        self.form = form

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        as_tuple = self.as_tuple if self.as_tuple is not None else self.form["tuple"]
        return (hidden_states,) if as_tuple else hidden_states


def prefix_cache_support(model, layer: int) -> tuple[bool, str]:
    """Whether blocks 0..``layer`` of ``model`` can be skipped, and why not if not."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return False, "the model has no .blocks list"
    for i in range(layer + 1):
        if not has_original_component(blocks[i]):
            return False, f"block {i} ({type(blocks[i]).__name__}) has no original_component to skip"
    return True, ""


def cache_nbytes(n_rows: int, seq: int, d_model: int, dtype=torch.float32) -> int:
    return n_rows * seq * d_model * torch.tensor([], dtype=dtype).element_size()


@torch.no_grad()
def capture_prefix(model, batch: TeacherForcedBatch | PromptBatch, layer: int
                   ) -> tuple[Float[Tensor, "batch seq d_model"], bool]:
    """h_l = ``blocks.{layer}.hook_resid_post`` over the teacher-forced rows of ``batch``,
    and whether block 0's wrapped layer returns a tuple.

    ``batch`` is a :class:`TeacherForcedBatch` (its prompts are used: the runner appends
    the answers the same way) or a prompt batch. Returns ``[batch, prompt + answer
    columns, d_model]`` on the model's device, columns aligned with ``with_answers(batch)``.
    Blocks after ``layer`` are skipped during the capture (they never run). One forward
    over all rows: the runner's chunks are each teacher-forced to their own answer width,
    so whole-sequence captures of several chunks do not line up.
    """
    prompts = batch.prompt if isinstance(batch, TeacherForcedBatch) else batch
    name = resid_hook_name(layer)
    later = range(layer + 1, int(model.cfg.n_layers))
    with _block_form(model) as form, skipped_blocks(model, later, None, form):
        out = run(model, prompts, capture=[name], capture_at=None, logits="answer",
                  batch_size=None, progress=False)
    cache = out.captured[name].to(model.cfg.device)
    if isinstance(batch, TeacherForcedBatch) and cache.shape[:2] != batch.input_ids.shape:
        raise RuntimeError(f"captured residual {tuple(cache.shape)} does not match the "
                           f"teacher-forced batch {tuple(batch.input_ids.shape)}")
    return cache, form.get("tuple", False)


@contextmanager
def _block_form(model):
    """Note, in the yielded dict, whether block 0's wrapped layer returns a tuple."""
    form: dict[str, bool] = {}

    def note(_module, _args, output):
        form.setdefault("tuple", isinstance(output, tuple))

    handle = original_component(model.blocks[0]).register_forward_hook(note)
    try:
        yield form
    finally:
        handle.remove()


@contextmanager
def skipped_blocks(model, layers: Sequence[int], as_tuple: bool | None, form: dict | None = None):
    """Swap the wrapped layer of ``model.blocks[i]`` for a :class:`SkipBlock` in the body."""
    saved = {}
    try:
        for i in layers:
            saved[i] = swap_original_component(model.blocks[i], SkipBlock(as_tuple, form))
        yield model
    finally:
        for i, module in saved.items():
            swap_original_component(model.blocks[i], module)


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
