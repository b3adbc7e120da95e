"""Frozen activations: hook points set to values recorded in another run.

``Freeze({name: acts})`` replaces the activation at each hook point ``name`` by ``acts``
(``[batch, ...]``, the shape the hook sees), e.g. attention patterns and norm scales from a
run *with* a task vector, frozen into a run without it — "vector minus its effect through
everything but the OV path" is then one expression. :meth:`Freeze.record` captures them
through the runner.
"""

from __future__ import annotations

from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.interventions.base import Hook, Intervention


class Freeze(Intervention):
    """Set each hook point in ``acts`` to its recorded tensor (see the module docstring)."""

    def __init__(self, acts: dict[str, Tensor], *, made_for=None):
        self.acts = dict(acts)
        self.made_for = made_for

    @classmethod
    def record(cls, model, prompts, names, interventions=None) -> Freeze:
        """The activations at ``names`` of one forward over ``prompts`` (whole, no grad)."""
        from tvlens.runner import run

        out = run(model, prompts, interventions, capture=names, capture_at=None, logits=None,
                  batch_size=None, progress=False)
        return cls(out.captured)

    def replaced_sites(self) -> set:
        return {(name, "all") for name in self.acts}

    def describe(self) -> str:
        return f"Freeze({', '.join(self.acts)})"

    def for_rows(self, rows) -> Freeze:
        idx = list(rows)
        return Freeze({n: a[idx[0] : idx[-1] + 1] for n, a in self.acts.items()}, made_for=self.made_for)

    def hooks(self, model, batch) -> list[Hook]:
        def make(name, value):
            def fn(act, hook=None):
                if tuple(act.shape) != tuple(value.shape):
                    raise TvlensError(f"frozen {name} has shape {tuple(value.shape)} but this forward's "
                                      f"is {tuple(act.shape)}; record it over the same prompts")
                return value.to(device=act.device, dtype=act.dtype)
            return fn
        return [(name, make(name, value)) for name, value in self.acts.items()]
