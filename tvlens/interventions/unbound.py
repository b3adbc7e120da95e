"""Residual edits bound to no batch: positions resolved per forward, from its attention mask.

``with tv.apply(model): ...`` (no batch) injects a :class:`~tvlens.interventions.residual.ResidualEdit`
into whatever forwards the body runs — ``model(ids, attention_mask=mask)``,
``run_with_hooks``, ``run_with_cache``, ``model.generate(...)`` — without a
:class:`~tvlens.prompts.PromptBatch` built first. Each forward's token positions are
resolved inside the hooks from the 0/1 attention mask the bridge hands the wrapped model
(a forward pre-hook on ``model.original_model`` records it; no mask: every column is a
real token). For a forward over ``T`` new columns after ``n_past`` cached ones, with
``mask[b, n_past + t]`` the mask of row ``b``'s column ``t`` and ``n_b`` its real prompt
tokens, the edit acts on

============  ==========================================================================
spec          columns ``t`` of row ``b``
============  ==========================================================================
``"last"``    the column of the prompt's ``n_b``-th real token (same as ``-1``)
``-k``        the column of its ``(n_b - k + 1)``-th real token
``"all"``     every ``t`` with ``mask[b, n_past + t] = 1`` (prompt and generated tokens)
============  ==========================================================================

and applies ``h[b, t] ← h[b, t] + scale·v`` (add) or ``h[b, t] ← scale·v`` (replace), as the
batch-bound hooks do (same ``index_put``, so gradients reach ``v``).

*The prompt* is the forward's own columns, except during ``model.generate`` (wrapped
while the context is open): there the prompt is the first forward's (the prefill's)
columns, so a re-run over prompt + generated tokens (generation without a KV cache) keeps
``"last"`` on the prompt's last token, and a KV-cached step (``T`` new columns after the
cache) gets only ``"all"`` — the prompt positions were injected in the prefill. Outside
``generate``, a forward with a cache also gets only ``"all"``. Cached and uncached greedy
generation therefore see the same injected residuals.

Absolute positions (``i >= 0``) and ``"separator"`` depend on how the prompt was built
(BOS, the query's input), which a forward does not say: they need the batch,
``tv.apply(model, batch)``, and :func:`check_unbound_positions` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.interventions.base import hooks_applied
from tvlens.interventions.residual import ResidualEdit, resid_hook_name, validate_spec
from tvlens.prompts import Position

UNBOUND_POSITIONS = '"last", negative offsets and "all"'


def check_unbound_positions(positions: Sequence[Position]) -> None:
    """Refuse positions that need a prompt batch (absolute indices, ``"separator"``)."""
    for p in positions:
        if p in ("last", "all"):
            continue
        if isinstance(p, int) and not isinstance(p, bool) and p < 0:
            continue
        if p == "separator" or (isinstance(p, int) and not isinstance(p, bool)):
            raise TvlensError(
                f"position {p!r} needs the prompt batch (where the prompt starts and where its "
                f"query ends are not in a forward's inputs); without a batch only "
                f"{UNBOUND_POSITIONS} resolve: use tv.apply(model, batch)")
        raise TvlensError(f"unknown position {p!r}: without a batch use {UNBOUND_POSITIONS}")


@dataclass
class _Forward:
    """What one forward's positions resolve to: ``(rows, cols)`` per position (None: skip)."""

    shape: tuple[int, int]
    entries: list[tuple[Tensor, Tensor] | None]


class _Tracker:
    """Records each forward of the wrapped model and resolves the edit's positions in it."""

    def __init__(self, edit: ResidualEdit):
        self.edit = edit
        self.current: _Forward | None = None
        self.generating = False
        self.prompt_len: int | None = None  # columns of the generation's prompt (its prefill)

    # torch forward pre-hook (with_kwargs=True) on model.original_model
    def record(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise TvlensError("an unbound vector needs the forward's input ids or embeddings; "
                              "apply it with a batch: tv.apply(model, batch)")
        B, T = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.long, device=ids.device)
        if mask.ndim != 2 or mask.shape[0] != B or mask.shape[1] < T:
            raise TvlensError(f"an unbound vector reads a [batch, seq] 0/1 attention mask, got "
                              f"shape {tuple(mask.shape)} for inputs of shape {(B, T)}; pass a "
                              "2-D mask or apply it with a batch: tv.apply(model, batch)")
        n_past = int(mask.shape[1]) - T
        mask = mask[:, n_past:]  # this forward's own columns
        if n_past == 0:  # a mask over the new columns only, after a cache
            n_past = _cache_length(kwargs.get("past_key_values"))
        if self.generating and self.prompt_len is None and n_past == 0:
            self.prompt_len = T  # the prefill of a generate call
        if self.generating and self.prompt_len is not None:
            n_prompt = min(max(self.prompt_len - n_past, 0), T)
        else:
            n_prompt = T if n_past == 0 else 0
        if self.edit.per_example and self.edit.vectors.shape[0] != B:
            raise TvlensError(f"per-example vectors for {self.edit.vectors.shape[0]} examples "
                              f"applied to a forward over {B} rows")
        self.current = _Forward((B, T), resolve(mask.long(), n_prompt, self.edit.positions))

    def clear(self, *args, **kwargs):  # forward hook, always called
        self.current = None

    def hook(self, li: int):
        edit = self.edit

        def fn(resid: Tensor, hook=None) -> Tensor:
            f = self.current
            if f is None:
                raise TvlensError(
                    "an unbound vector resolves positions from the attention mask of the "
                    "model's forward, which this call did not go through; apply it with a "
                    "batch: tv.apply(model, batch)")
            if tuple(resid.shape[:2]) != f.shape:
                raise TvlensError(f"the residual has shape {tuple(resid.shape[:2])} but the "
                                  f"forward's inputs {f.shape}; apply the vector with a batch")
            return edit.write(resid, li, [(pi, *entry) for pi, entry in enumerate(f.entries)
                                          if entry is not None])

        return fn

    def wrap_generate(self, generate):
        def wrapped(*args, **kwargs):
            self.generating, self.prompt_len = True, None
            try:
                return generate(*args, **kwargs)
            finally:
                self.generating, self.prompt_len = False, None

        return wrapped


def _cache_length(cache) -> int:
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


def resolve(mask: Int[Tensor, "batch seq"], n_prompt: int, positions: Sequence[Position]
            ) -> list[tuple[Tensor, Tensor] | None]:
    """``(rows, cols)`` per position in a forward whose first ``n_prompt`` columns are prompt.

    ``mask`` covers the forward's own columns. ``"all"``: every real column; ``"last"`` /
    ``-k``: one column per row, counted among the real prompt columns (any padding side),
    None when the forward holds no prompt columns.
    """
    out: list[tuple[Tensor, Tensor] | None] = []
    B = mask.shape[0]
    for p in positions:
        if p == "all":
            rows, cols = torch.nonzero(mask.bool(), as_tuple=True)
            out.append((rows, cols))
            continue
        if n_prompt == 0:
            out.append(None)
            continue
        pm = mask[:, :n_prompt]
        n = pm.sum(1)
        k = 1 if p == "last" else -int(p)
        i = n - k  # index among the row's real tokens
        bad = torch.nonzero(i < 0).flatten()
        if bad.numel():
            row = int(bad[0])
            raise TvlensError(f"position {p!r} falls outside prompt {row} ({int(n[row])} tokens); "
                              "use a position within every prompt, e.g. a smaller offset")
        rank = pm.cumsum(1) - 1
        cols = ((rank == i[:, None]) & pm.bool()).long().argmax(1)
        out.append((torch.arange(B, device=mask.device), cols))
    return out


@contextmanager
def unbound_applied(model, edit: ResidualEdit):
    """Context manager: every forward of ``model`` in the body carries ``edit`` (module docstring).

    Every hook (the residual hooks, the pre/post hooks on ``model.original_model``, the
    ``generate`` wrapper) is removed on exit, also when the body raises.
    """
    validate_spec(model, edit)
    check_unbound_positions(edit.positions)
    try:
        wrapped = model.original_model
    except AttributeError as err:
        raise TvlensError(f"an unbound vector needs the bridge's wrapped module ({err}); apply "
                          "it with a batch: tv.apply(model, batch)") from None
    tracker = _Tracker(edit)
    hooks = [(resid_hook_name(layer), tracker.hook(li)) for li, layer in enumerate(edit.layers)]
    with ExitStack() as stack:
        pre = wrapped.register_forward_pre_hook(tracker.record, with_kwargs=True)
        stack.callback(pre.remove)
        post = wrapped.register_forward_hook(tracker.clear, always_call=True)
        stack.callback(post.remove)
        missing = object()
        before = model.__dict__.get("generate", missing)
        model.generate = tracker.wrap_generate(model.generate)  # shadows the method in here
        stack.callback(_restore_generate, model, before, missing)
        stack.enter_context(hooks_applied(model, hooks))
        yield model


def _restore_generate(model, before, missing) -> None:
    if before is missing:
        model.__dict__.pop("generate", None)
    else:
        model.__dict__["generate"] = before
