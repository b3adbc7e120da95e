"""One result type per kind of answer, each with ``to_frame()``, ``to_dict()`` (what
``--json`` prints) and, where a picture helps, ``figure()``.

- :class:`~tvlens.stats.Accuracy` — a rate with its interval (``evaluate`` returns the
  richer :class:`~tvlens.evaluation.EvalResult`, whose ``interval`` is one).
- :class:`HeadTable` — one number per ``(layer, head)``: indirect effects, saliency,
  ablation effects, DLA. NaN marks heads not measured.
- :class:`LayerCurve` — one accuracy (with interval) per layer, plus reference lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.stats import Accuracy


def accuracy_frame(accuracies: dict[str, Accuracy]) -> pd.DataFrame:
    """One row per named condition: ``condition, accuracy, ci_low, ci_high, n``."""
    return pd.DataFrame([{"condition": k, **a.to_dict()} for k, a in accuracies.items()])


@dataclass
class HeadTable:
    """``values[l, h]`` for every head, with what they measure and how they were made."""

    values: Float[Tensor, "layer head"]
    measure: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)

    def top(self, k: int | None = None, *, percent: float | None = None) -> list[tuple[int, int]]:
        """The ``k`` largest heads (or the top ``percent`` %, at least one), largest first;
        NaN heads last, ties in layer-major order."""
        L, H = self.values.shape
        if (k is None) == (percent is None):
            raise TvlensError("give exactly one of k or percent")
        if percent is not None:
            if not (isinstance(percent, (int, float)) and 0 < percent <= 100):
                raise TvlensError(f"percent must be in (0, 100], got {percent!r}")
            k = max(1, int(round(L * H * percent / 100)))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L * H:
            raise TvlensError(f"k={k!r} heads asked, but there are {L} × {H} = {L * H} heads; "
                              f"use 1 <= k <= {L * H}")
        flat = torch.nan_to_num(self.values.flatten().float(), nan=-float("inf"))
        idx = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
        return [(i // H, i % H) for i in idx]

    def to_frame(self) -> pd.DataFrame:
        L, H = self.values.shape
        return pd.DataFrame([{"layer": l, "head": h, self.measure: float(self.values[l, h])}
                             for l in range(L) for h in range(H)])

    def to_dict(self) -> dict[str, Any]:
        return {"measure": self.measure, "values": self.values.tolist(), **self.meta}

    def figure(self, title: str | None = None):
        from tvlens.attribution.figures import head_heatmap

        return head_heatmap(self.values, title=title or self.measure)


@dataclass
class LayerCurve:
    """Accuracy by layer (``layer``, ``accuracy``, ``ci_low``, ``ci_high``, ``n``) and
    named reference accuracies (zero-shot, ICL) measured on the same items."""

    name: str
    rows: list[dict[str, Any]]
    references: dict[str, Accuracy] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        """The layer of highest accuracy (the earliest among ties)."""
        best = max(r["accuracy"] for r in self.rows)
        return int(next(r["layer"] for r in self.rows if r["accuracy"] == best))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best_layer": self.best_layer, "curve": self.rows,
                "references": {k: a.to_dict() for k, a in self.references.items()}, **self.meta}

    def figure(self, title: str | None = None):
        from tvlens import plots

        return plots.accuracy_by_layer({self.name: self.to_frame()},
                                       {k: a.as_tuple() for k, a in self.references.items()},
                                       title=title or self.name)
