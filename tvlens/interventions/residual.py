"""Residual edits, the one injection engine: put vectors into the residual stream at (layer, position).

"Layer l" is the residual stream after block ``l``: the hook ``blocks.{l}.hook_resid_post``
for ``l`` in ``0..n_layers-1``. At each selected layer and each resolved token position
``(b, t)`` of a prompt batch, with ``v`` the vector for that (layer, position) — shared
by the batch or one per example — the residual ``h`` becomes

    add:      h[b, t] ← h[b, t] + scale · v
    replace:  h[b, t] ← scale · v

The update is out of place (``index_put``), so gradients flow into ``v`` (learned and
adaptive vectors train through it) and the model's own tensors are never mutated.

Generation: positions are columns of the *prompt*; a forward over the prompt plus
appended tokens (our greedy decoder re-runs the whole sequence) keeps those columns, so
the vector sits at the same tokens. An incremental KV-cached step (a forward shorter
than the prompt) gets only ``"all"``, on its new tokens: the prompt's positions were
injected in its prefill. ``"all"`` covers appended tokens either way (the released ATV code
adds at every position).

A :class:`ResidualEdit` is an intervention (:mod:`tvlens.interventions.base`): its
``hooks(model, batch)`` are what :func:`tvlens.runner.run` registers. Use as a context
manager, ``with injected(model, batch, spec): ...``, or take the ``fwd_hooks`` list from
:func:`injection_hooks` for ``run_with_hooks`` / ``model.hooks``; every hook is removed on
exit, also when the body raises. ``InjectionSpec`` is the same class under its 0.1 name.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.interventions.base import Hook, Intervention, hooks_applied
from tvlens.prompts import Position, PromptBatch

Mode = Literal["add", "replace"]


def resid_hook_name(layer: int) -> str:
    """The hook point that tvlens calls "the residual stream after layer ``layer``"."""
    return f"blocks.{layer}.hook_resid_post"


def check_layer(model, layer: int, *, what: str = "layer") -> int:
    """Return ``layer`` if it names a block of ``model``, else a clear error."""
    n = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise TvlensError(
            f"{what} {layer!r} is out of range: this model has layers 0..{n - 1}"
        )
    return layer


@dataclass(frozen=True, eq=False)
class ResidualEdit(Intervention):
    """What to inject: vectors at layers × positions, with a mode and a scale.

    Attributes:
        layers: ``L`` layer indices.
        positions: ``P`` position specs (see :mod:`tvlens.prompts`).
        vectors: ``[L, P, d_model]`` shared by every example, or
            ``[batch, L, P, d_model]`` one set per example.
        mode: ``"add"`` or ``"replace"``.
        scale: multiplies every vector.
    """

    layers: tuple[int, ...]
    positions: tuple[Position, ...]
    vectors: Float[Tensor, "... layer pos d_model"]
    mode: Mode = "add"
    scale: float = 1.0

    @property
    def per_example(self) -> bool:
        return self.vectors.ndim == 4

    @property
    def last_token_only(self) -> bool:
        """Whether every write is at each row's last token (a KV cache of the prefix stays valid)."""
        return all(p in ("last", -1) for p in self.positions)

    @classmethod
    def stackable(cls, edits: Sequence) -> bool:
        """Whether :meth:`stack` can merge ``edits``: ResidualEdits sharing layers, positions,
        mode and scale."""
        if not edits or not all(type(e) is cls for e in edits):
            return False
        key = lambda e: (e.layers, e.positions, e.mode, e.scale)  # noqa: E731
        return all(key(e) == key(edits[0]) for e in edits)

    @classmethod
    def stack(cls, edits: Sequence[ResidualEdit], n_prompts: int) -> ResidualEdit:
        """Edit ``j`` of ``c`` edits acting on copy ``j`` of ``n_prompts`` prompts repeated row
        by row (prompt ``i``'s copy ``j`` is row ``i·c + j``, as in
        :meth:`~tvlens.interventions.heads.HeadPatch.stack`): one per-example edit
        ``[n_prompts · c, L, P, d]``, so each layer is one ``index_put``."""
        if not cls.stackable(edits):
            raise TvlensError("stacked residual edits must share layers, positions, mode and scale")
        per = [e.vectors if e.per_example else e.vectors.expand(n_prompts, *e.vectors.shape)
               for e in edits]
        if any(v.shape[0] != n_prompts for v in per):
            raise TvlensError(f"a per-example edit to stack has {per[0].shape[0]} rows, not one "
                              f"per prompt ({n_prompts})")
        vectors = torch.stack(per, 1).reshape(n_prompts * len(edits), *per[0].shape[1:])
        first = edits[0]
        return cls(first.layers, first.positions, vectors, first.mode, first.scale)

    def hooks(self, model, batch: PromptBatch) -> list[Hook]:
        return injection_hooks(model, batch, self)

    def write(self, resid: Tensor, li: int, sites) -> Tensor:
        """``resid`` with layer ``li``'s vectors written at ``sites``: per position index
        ``pi``, the ``(rows, cols)`` it covers in this forward (add or replace, scaled)."""
        rows_l, cols_l, vals_l = [], [], []
        for pi, rows, cols in sites:
            rows, cols = rows.to(resid.device), cols.to(resid.device)
            if self.per_example:
                vals = self.vectors[:, li, pi].to(resid.device)[rows]
            else:
                vals = self.vectors[li, pi].expand(rows.shape[0], -1)
            rows_l.append(rows)
            cols_l.append(cols)
            vals_l.append(vals)
        if not rows_l:
            return resid
        vals = torch.cat(vals_l).to(device=resid.device, dtype=resid.dtype) * self.scale
        return resid.index_put((torch.cat(rows_l), torch.cat(cols_l)), vals,
                               accumulate=self.mode == "add")

    def for_rows(self, rows) -> ResidualEdit:
        """Per-example vectors of ``rows`` only (shared vectors: unchanged)."""
        if not self.per_example:
            return self
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.vectors.device)
        return ResidualEdit(self.layers, self.positions, self.vectors[idx], self.mode, self.scale)

    def replaced_sites(self) -> set:
        if self.mode != "replace":
            return set()
        return {(resid_hook_name(layer), p) for layer in self.layers for p in self.positions}

    def describe(self) -> str:
        return f"{self.mode} at layers {self.layers}, positions {self.positions}"


InjectionSpec = ResidualEdit


def validate_spec(model, spec: InjectionSpec, batch_size: int | None = None) -> None:
    """Check layers, shapes, width, mode and finiteness against ``model``; raise clearly."""
    if len(spec.layers) == 0:
        raise TvlensError("no layers to inject at: give at least one layer")
    if len(spec.positions) == 0:
        raise TvlensError("no positions to inject at: give at least one position")
    for layer in spec.layers:
        check_layer(model, layer)
    if len(set(spec.layers)) != len(spec.layers):
        raise TvlensError(f"layers {spec.layers} repeat a layer; list each layer once")
    if spec.mode not in ("add", "replace"):
        raise TvlensError(f"unknown injection mode {spec.mode!r}; use 'add' or 'replace'")
    v = spec.vectors
    d_model = int(model.cfg.d_model)
    expected = (len(spec.layers), len(spec.positions), d_model)
    if v.ndim not in (3, 4) or tuple(v.shape[-3:]) != expected:
        raise TvlensError(
            f"vector of shape {tuple(v.shape)} does not fit {len(spec.layers)} layer(s) × "
            f"{len(spec.positions)} position(s) × d_model {d_model} of this model "
            f"(expected {expected}, or with a leading batch dimension)"
        )
    if v.ndim == 4 and batch_size is not None and v.shape[0] != batch_size:
        raise TvlensError(
            f"per-example vectors for {v.shape[0]} examples given to a batch of {batch_size}"
        )
    if not torch.isfinite(v.detach()).all():
        raise TvlensError("the vector contains NaN or Inf; refusing to inject it")
    if not (isinstance(spec.scale, (int, float)) and torch.isfinite(torch.tensor(float(spec.scale)))):
        raise TvlensError(f"scale must be a finite number, got {spec.scale!r}")


def injection_hooks(model, batch: PromptBatch, spec: InjectionSpec) -> list[Hook]:
    """``fwd_hooks`` that inject ``spec`` into forwards over ``batch`` (validated first)."""
    validate_spec(model, spec, len(batch))
    entries = []  # per position: (rows, cols) in the prompt batch
    for p in spec.positions:
        rows, cols = batch.position_entries(p)
        entries.append((p == "all", rows, cols))
    mask = batch.attention_mask
    prompt_len = batch.seq_len
    hooks = []
    for li, layer in enumerate(spec.layers):
        hooks.append((resid_hook_name(layer),
                      _make_hook(spec, li, entries, mask, prompt_len, len(batch))))
    return hooks


def _make_hook(spec: InjectionSpec, li: int, entries, mask, prompt_len: int, batch_size: int):
    def hook(resid: Tensor, hook=None) -> Tensor:
        if resid.shape[0] != batch_size:
            raise TvlensError(
                f"injection bound to a batch of {batch_size} prompts ran on a batch of "
                f"{resid.shape[0]}; bind it to the batch you run"
            )
        T = resid.shape[1]
        sites = []
        for pi, (is_all, rows, cols) in enumerate(entries):
            if T < prompt_len:  # a KV-cached step: the prefill injected the prompt's positions;
                if not is_all:  # "all" also covers the T new tokens
                    continue
                rows = torch.arange(batch_size, device=resid.device).repeat_interleave(T)
                cols = torch.arange(T, device=resid.device).repeat(batch_size)
            elif is_all and T > prompt_len:  # appended tokens are real too
                extra = torch.arange(prompt_len, T, device=resid.device)
                rows = torch.cat([rows.to(resid.device),
                                  torch.arange(batch_size, device=resid.device).repeat_interleave(T - prompt_len)])
                cols = torch.cat([cols.to(resid.device), extra.repeat(batch_size)])
            sites.append((pi, rows, cols))
        return spec.write(resid, li, sites)

    return hook


@contextmanager
def injected(model, batch: PromptBatch, spec: InjectionSpec):
    """Context manager: forwards of ``model`` over ``batch`` inside the body carry ``spec``.

    Example::

        spec = InjectionSpec(layers=(10,), positions=("last",), vectors=v[None, None])
        with injected(model, batch, spec):
            logits = forward(model, batch)
    """
    hooks = injection_hooks(model, batch, spec)
    with hooks_applied(model, hooks):
        yield model
