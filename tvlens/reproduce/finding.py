"""What a finding of ``tvlens reproduce`` is: the paper's claim and numbers, the profiles,
and the context ``measure`` runs in (:mod:`tvlens.reproduce.findings` lists the findings).

A :class:`Finding` has the paper's claim in words, the paper's numbers with their
source, the comparisons its verdict is judged on (:mod:`tvlens.reproduce.verdicts`),
the settings of each profile (``quick``: minutes on a laptop; ``full``: the real
reproduction) and ``measure(ctx)``, which runs the finding for one model and seed through
tvlens's public API only (``tvlens.evaluate``, ``tvlens.extract``, ``tvlens.learn``, ...),
so the report exercises what users call. ``measure`` returns

    {"values": {name: {"value", "ci_low", "ci_high", "n"}},   # what the claims compare
     "tables": {name: [row, ...]},                              # for the report's tables
     }

Each value's interval is the one tvlens reports for it (bootstrap over items for
accuracies, :func:`tvlens.stats.accuracy`; exact for rates logged without records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvlens.errors import TvlensError
from tvlens.reproduce.verdicts import RATE, Claim
from tvlens.stats import Accuracy

PROFILES = ("quick", "full")


@dataclass(frozen=True)
class PaperValue:
    """A number a paper reports (``None``: the paper states the claim without a number we
    can cite), with where it is from."""

    value: float | None
    source: str


@dataclass(frozen=True)
class Finding:
    id: str
    title: str
    paper: str  # the claim in the paper's words (paraphrased), with the paper
    paper_values: dict[str, PaperValue]
    claims: tuple[Claim, ...]
    profiles: dict[str, dict[str, Any]]
    measure: Callable[[Context], dict]
    figure: Callable[[dict], Any] | None = None
    synthetic: bool = False  # trains its own model from scratch: run once, not per model
    ranges: tuple[tuple[str, tuple[float, float]], ...] = ()  # (name prefix, range); else a rate

    def value_range(self, name: str) -> tuple[float, float]:
        """The range a value can take: the first declared prefix of ``name``, else a rate's
        ``[0, 1]`` (the seeds' interval is kept within it, :mod:`~tvlens.reproduce.verdicts`)."""
        return next((r for prefix, r in self.ranges if name.startswith(prefix)), RATE)

    def settings(self, profile: str) -> dict[str, Any]:
        if profile not in self.profiles:
            raise TvlensError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        return dict(self.profiles[profile])


@dataclass
class Context:
    """What ``measure`` gets: the model (loaded once, shared by findings), the seed, the
    profile's settings and a folder for artefacts findings share (trained vectors)."""

    model_name: str
    seed: int
    settings: dict[str, Any]
    artifacts: Path
    load: Callable[[str], Any] = field(repr=False, default=None)

    @property
    def model(self):
        return self.load(self.model_name)

    def ltv(self, task, layer: int, **kw):
        """The LTV for ``task`` at ``layer`` (trained once per settings, then loaded)."""
        from tvlens.learn import learn_task_vector
        from tvlens.vector import TaskVector

        key = "-".join([task.name, f"L{layer}", f"seed{self.seed}"] +
                       [f"{k}{v}" for k, v in sorted(kw.items())])
        path = self.artifacts / f"ltv-{key}.safetensors"
        if path.exists():
            return TaskVector.load(path, self.model)
        tv = learn_task_vector(self.model, task, layer, seed=self.seed, progress=False, **kw)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        tv.save(path, overwrite=True)
        return tv


def value(acc: Accuracy) -> dict[str, float]:
    return {"value": acc.value, "ci_low": acc.ci_low, "ci_high": acc.ci_high, "n": acc.n}


def item_scores(result) -> np.ndarray:
    """Per-item first-token correctness of an :class:`~tvlens.evaluation.EvalResult`."""
    return result.records["correct"].to_numpy(dtype=float)


def base_layer(model) -> int:
    """LTV Table 1's base layer: 16 of Llama-3.1-8B's 32, i.e. the middle (``L // 2``)."""
    return int(model.cfg.n_layers) // 2


def resolve_layers(model, layers) -> list[int]:
    """A profile's layers for ``model``: ``"middle_half"`` (layers L/4 … 3L/4), or a list of
    fractions of the depth (``0.5`` → layer ``round(0.5 · (L − 1))``), so one profile fits
    models of any depth."""
    n = int(model.cfg.n_layers)
    if layers == "middle_half":
        return list(range(n // 4, (3 * n) // 4 + 1))
    return sorted({int(round(float(f) * (n - 1))) for f in layers})
