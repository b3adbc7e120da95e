"""Head patches: set (or add to) the output ``z`` of chosen heads at chosen positions.

``blocks.{l}.attn.hook_z`` holds every query head's output before ``W_O``,
``z[b, t, h, :]`` (``d_head`` wide; per *query* head also under grouped-query attention).
A :class:`HeadPatch` changes it for a set of heads at one position spec (see
:mod:`tvlens.prompts`), in every row of the batch or only in given rows:

    set:  z[b, t, h] ← value          add:  z[b, t, h] ← z[b, t, h] + value

with ``value`` shared by the rows (``[d_head]`` per head) or one per row
(``[batch, d_head]`` per head). This one mechanism is

- **zero / mean ablation** (``HeadPatch.zero(heads)``, ``HeadPatch.mean(heads, means)``),
- **FV's activation patching** (head ``(l, h)``'s mean output written into a prompt),
- **saliency**'s probe: a zero tensor requiring grad *added* to ``z`` (``mode="add"``),
  whose gradient is ``∂p/∂z``.

:meth:`HeadPatch.stack` merges patches that act on different copies of a batch (prompt
``i``'s copy ``j`` is row ``i·c + j``) into one patch with one ``index_put`` per layer:
that is how :func:`tvlens.runner.run_variants` evaluates many heads in one forward.
The update is out of place, so gradients flow into ``value``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.heads import Head, check_heads
from tvlens.interventions.base import Hook, Intervention
from tvlens.prompts import Position, PromptBatch


def _fingerprint(model):
    from tvlens.models.loading import fingerprint

    return fingerprint(model)


def z_hook_name(layer: int) -> str:
    """The hook point of every head's output before ``W_O`` in block ``layer``."""
    return f"blocks.{layer}.attn.hook_z"


@dataclass(frozen=True, eq=False)
class _Entry:
    layer: int
    head: int
    value: Tensor | None  # [d_head] shared, [rows, d_head] per row; None: zero
    rows: Tensor | None  # rows of the batch it acts on (None: every row)


class HeadPatch(Intervention):
    """``z`` of ``heads`` at ``position`` := (or +=) ``values``; see the module docstring.

    Args:
        heads: ``(layer, head)`` pairs.
        values: ``0`` (zero ablation), or one tensor per head — ``[d_head]`` shared by the
            rows or ``[batch, d_head]`` per row — as a sequence or a tensor whose first
            dimension runs over ``heads``.
        position: where in each prompt (default the last token).
        mode: ``"set"`` or ``"add"``.
        rows: per head, the batch rows it acts on (default: all rows).
    """

    def __init__(self, heads: Sequence[Sequence[int]], values=0, *, position: Position = "last",
                 mode: Literal["set", "add"] = "set", rows: Sequence[Sequence[int]] | None = None,
                 made_for=None):
        if mode not in ("set", "add"):
            raise TvlensError(f"head patch mode must be 'set' or 'add', got {mode!r}")
        heads = [(int(a), int(b)) for a, b in heads]
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            if values != 0:
                raise TvlensError("a scalar head value must be 0 (zero ablation); give tensors otherwise")
            vals: list = [None] * len(heads)
        else:
            vals = list(values)
            if len(vals) != len(heads):
                raise TvlensError(f"{len(vals)} head values given for {len(heads)} heads")
        if rows is not None and len(rows) != len(heads):
            raise TvlensError(f"{len(rows)} row sets given for {len(heads)} heads")
        self.entries = [
            _Entry(layer, h, v, None if rows is None else torch.as_tensor(list(rows[i]), dtype=torch.long))
            for i, ((layer, h), v) in enumerate(zip(heads, vals))
        ]
        self.position = position
        self.mode = mode
        self.made_for = made_for

    # ----- the usual patches --------------------------------------------------------
    @classmethod
    def zero(cls, model, heads: Sequence[Sequence[int]], *, position: Position = "last") -> HeadPatch:
        """Zero ablation of ``heads`` (validated against ``model``, and made for it)."""
        return cls(check_heads(model, heads), 0, position=position, made_for=_fingerprint(model))

    @classmethod
    def mean(cls, model, heads: Sequence[Sequence[int]], means: Tensor, *,
             position: Position = "last") -> HeadPatch:
        """Mean ablation: ``z[l, h] ← means[l, h]`` (``means``: ``[n_layers, n_heads, d_head]``)."""
        heads = check_heads(model, heads)
        return cls(heads, [means[layer, h] for layer, h in heads], position=position,
                   made_for=_fingerprint(model))

    @classmethod
    def ablation(cls, model, heads, mode: str = "zero", means: Tensor | None = None, *,
                 position: Position = "last") -> HeadPatch:
        """``mode`` ``"zero"`` or ``"mean"`` (then ``means`` is required)."""
        if mode == "zero":
            return cls.zero(model, heads, position=position)
        if mode == "mean":
            if means is None:
                raise TvlensError("mean ablation needs the head means (head_means(model, batch, vector))")
            return cls.mean(model, heads, means, position=position)
        raise TvlensError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")

    @classmethod
    def stack(cls, patches: Sequence[HeadPatch], batch_size: int) -> HeadPatch:
        """Patch ``j`` of ``c`` patches acting on copy ``j`` of a batch of ``batch_size`` rows
        repeated row by row (``batch.repeat_interleave(c)``: prompt ``i``'s copy ``j`` is row
        ``i·c + j``, the layout a KV cache's ``batch_repeat_interleave`` gives)."""
        if not patches:
            raise TvlensError("no head patches to stack")
        first = patches[0]
        out = cls([], [], position=first.position, mode=first.mode, made_for=first.made_for)
        for j, p in enumerate(patches):
            if p.position != first.position or p.mode != first.mode:
                raise TvlensError("stacked head patches must share position and mode")
            for e in p.entries:
                rows = torch.arange(batch_size) if e.rows is None else e.rows
                out.entries.append(_Entry(e.layer, e.head, e.value, rows * len(patches) + j))
        return out

    def for_rows(self, rows) -> HeadPatch:
        """This patch on the sub-batch of ``rows`` (consecutive): per-row values and row
        sets are cut and renumbered; shared values apply as before."""
        rows = list(rows)
        lo, n = rows[0], len(rows)
        out = HeadPatch([], [], position=self.position, mode=self.mode, made_for=self.made_for)
        for e in self.entries:
            r = torch.arange(n) if e.rows is None else e.rows[(e.rows >= lo) & (e.rows < lo + n)] - lo
            if e.rows is not None and len(r) == 0:
                continue
            value = e.value
            if value is not None and value.ndim == 2:  # one value per row of its row set
                src = (r + lo) if e.rows is None else torch.nonzero(
                    (e.rows >= lo) & (e.rows < lo + n), as_tuple=True)[0]
                value = value[src.to(value.device)]
            out.entries.append(_Entry(e.layer, e.head, value, None if e.rows is None else r))
        return out

    # ----- protocol -----------------------------------------------------------------
    @property
    def heads(self) -> list[Head]:
        return [(e.layer, e.head) for e in self.entries]

    @property
    def last_token_only(self) -> bool:
        return self.position in ("last", -1)

    def replaced_sites(self) -> set:
        if self.mode != "set":
            return set()
        return {(f"{z_hook_name(e.layer)}[head {e.head}]", self.position) for e in self.entries}

    def describe(self) -> str:
        shown = ", ".join(f"{a}.{b}" for a, b in self.heads[:6]) + (" ..." if len(self.entries) > 6 else "")
        return f"HeadPatch({self.mode} {shown} at {self.position!r})"

    def hooks(self, model, batch: PromptBatch) -> list[Hook]:
        L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
        for e in self.entries:
            if not (0 <= e.layer < L and 0 <= e.head < H):
                raise TvlensError(f"head {e.layer}.{e.head} is out of range: this model has layers "
                                  f"0..{L - 1} and heads 0..{H - 1}")
        pos_rows, pos_cols = batch.position_entries(self.position)  # every (row, col) selected
        n_rows = len(batch)
        col_of = [[] for _ in range(n_rows)]
        for r, c in zip(pos_rows.tolist(), pos_cols.tolist()):
            col_of[r].append(c)
        by_layer: dict[int, list[_Entry]] = {}
        for e in self.entries:
            by_layer.setdefault(e.layer, []).append(e)
        return [(z_hook_name(layer), self._layer_hook(entries, col_of, n_rows))
                for layer, entries in by_layer.items()]

    def _layer_hook(self, entries: list[_Entry], col_of: list[list[int]], n_rows: int):
        rows_l, cols_l, heads_l, pick = [], [], [], []  # pick: (entry, row-in-entry) per write
        for k, e in enumerate(entries):
            rows = range(n_rows) if e.rows is None else e.rows.tolist()
            for i, r in enumerate(rows):
                if not 0 <= r < n_rows:
                    raise TvlensError(f"head patch row {r} is outside the batch of {n_rows} rows")
                for c in col_of[r]:
                    rows_l.append(r)
                    cols_l.append(c)
                    heads_l.append(e.head)
                    pick.append((k, i))
        rows_t = torch.tensor(rows_l, dtype=torch.long)
        cols_t = torch.tensor(cols_l, dtype=torch.long)
        heads_t = torch.tensor(heads_l, dtype=torch.long)
        accumulate = self.mode == "add"
        picks_of = [[] for _ in entries]  # per entry: its row-in-entry index per write, in order
        for k, i in pick:
            picks_of[k].append(i)
        picks_t = [torch.tensor(p, dtype=torch.long) for p in picks_of]

        def values(z: Tensor) -> Tensor:  # [n_writes, d_head], in the order of rows_l
            d = z.shape[-1]
            blocks = []
            for e, idx in zip(entries, picks_t):
                if len(idx) == 0:
                    continue
                if e.value is None:
                    blocks.append(torch.zeros(len(idx), d, device=z.device, dtype=z.dtype))
                    continue
                v = e.value.to(device=z.device, dtype=z.dtype)
                blocks.append(v.expand(len(idx), d) if v.ndim == 1 else v[idx.to(z.device)])
            return torch.cat(blocks)

        def hook(z: Tensor, hook=None) -> Tensor:
            if z.shape[0] != n_rows:
                raise TvlensError(f"head patch bound to a batch of {n_rows} prompts ran on a batch "
                                  f"of {z.shape[0]}; bind it to the batch you run")
            if not rows_l:
                return z
            dev = z.device
            return z.index_put((rows_t.to(dev), cols_t.to(dev), heads_t.to(dev)), values(z),
                               accumulate=accumulate)

        return hook
