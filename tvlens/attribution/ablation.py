"""Accuracy with heads ablated, against random head sets of the same size and no ablation.

:func:`ablate_heads` scores, on one :class:`~tvlens.prompts.PromptSet` and through
:func:`tvlens.evaluation.evaluate` (so each rate has its bootstrap CI):

- ``baseline``: the prompts under ``vector`` (or ICL prompts without one);
- ``ablated``: the same with ``heads`` ablated (``vector + HeadPatch.ablation(...)``);
- ``random``: ``random_control`` random head sets of the same size, drawn (seeded) from
  the heads not ablated. With ``c_{r,b} ∈ {0, 1}`` whether draw ``r`` answers prompt ``b``
  correctly, its value is ``mean_r acc_r = mean_b f_b`` with ``f_b = mean_r c_{r,b}`` (the
  fraction of draws that get prompt ``b`` right), and its CI the bootstrap over prompts of
  ``f`` (:func:`tvlens.stats.accuracy`): the prompts, not the few draws, are the sample.

:func:`key_head_analysis` chains saliency → key heads (top ``percent`` %) → these
controls, per ablation mode, and the exhaustive ground truth
(:mod:`tvlens.attribution.key_heads`).
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tvlens.attribution.common import check_percent, ci_list
from tvlens.attribution.key_heads import ablation_effects, agreement, head_means, head_saliency
from tvlens.errors import TvlensError
from tvlens.evaluation import evaluate, resolve_template
from tvlens.heads import Head, all_heads, check_heads
from tvlens.interventions import HeadPatch, as_intervention
from tvlens.prompts import PromptSet
from tvlens.results import HeadTable
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task


@dataclass
class AblationResult:
    """Accuracy with ``heads`` ablated vs random head sets of the same size vs none.

    ``random`` is the mean over draws with its CI over prompts (module docstring); None
    without draws. ``random_heads`` lists the heads of each draw.
    """

    heads: list[Head]
    mode: str
    baseline: Accuracy
    ablated: Accuracy
    random: Accuracy | None = None
    random_accuracies: list[float] = field(default_factory=list)
    random_heads: list[list[Head]] = field(default_factory=list)
    template: str = "arrow"

    @property
    def n(self) -> int:
        return self.baseline.n

    @property
    def baseline_accuracy(self) -> float:
        return self.baseline.value

    @property
    def ablated_accuracy(self) -> float:
        return self.ablated.value

    @property
    def random_mean(self) -> float:
        return self.random.value if self.random is not None else float("nan")

    @property
    def random_ci(self) -> tuple[float, float]:
        """95% bootstrap CI over prompts of the fraction of draws correct (NaN without draws)."""
        lo, hi = ci_list(self.random)
        return lo, hi

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "mode": self.mode, "n": self.n,
                "baseline_accuracy": self.baseline_accuracy,
                "ablated_accuracy": self.ablated_accuracy,
                "random_accuracy": self.random_mean, "random_ci": list(self.random_ci),
                "random_accuracies": self.random_accuracies,
                "baseline_ci": ci_list(self.baseline), "ablated_ci": ci_list(self.ablated),
                "template": self.template}

    def to_frame(self):
        """Accuracy with CI per condition: no ablation, the heads ablated, random heads."""
        from tvlens.results import accuracy_frame

        rows = {"baseline": self.baseline, "ablated": self.ablated}
        if self.random is not None:
            rows["random"] = self.random
        return accuracy_frame(rows)

    def figure(self, title: str = "head ablation"):
        from tvlens.attribution.figures import ablation_bars

        return ablation_bars(self.to_dict(), title)


def _prompts(model, task: Task, vector, template, *, n: int, shots: int, split: str, seed: int,
             what: str) -> PromptSet:
    """Zero-shot queries carrying ``vector``, or ``shots``-shot ICL prompts without one,
    in the vector's own format unless ``template`` says otherwise."""
    template = resolve_template(vector, template, what=what)
    return PromptSet.build(model, task, split=split, n=n, shots=0 if vector is not None else shots,
                           template=template, seed=seed)


def ablate_heads(model, task: Task, heads: Sequence[Head], mode: str = "zero", vector=None,
                 random_control: int = 5, *, n: int = 32, shots: int = 5, split: str = "test",
                 template=None, seed: int = 0, prompts: PromptSet | None = None,
                 batch_size: int = 16) -> AblationResult:
    """Accuracy of ``task`` with ``heads`` ablated (see the module docstring).

    With ``vector`` the prompts are zero-shot queries carrying it; without, ``shots``-shot
    ICL prompts (``prompts`` overrides both). ``template=None``: the vector's own format,
    else ``"arrow"``. ``random_control`` random head sets of the same size (seeded) give the
    control; 0 skips it. ``batch_size``: rows per forward.
    """
    heads = check_heads(model, heads)
    if isinstance(random_control, bool) or not isinstance(random_control, int) or random_control < 0:
        raise TvlensError(f"random_control must be an integer >= 0, got {random_control!r}")
    if prompts is None:
        prompts = _prompts(model, task, vector, template, n=n, shots=shots, split=split, seed=seed,
                           what="ablate_heads")
    means = head_means(model, prompts, vector) if mode == "mean" else None

    def score(pick):
        iv = as_intervention([vector, HeadPatch.ablation(model, pick, mode, means)] if pick is not None
                             else vector)
        return evaluate(model, task, vector=iv, prompts=prompts, batch_size=batch_size, seed=seed,
                        progress=False)

    base = score(None)
    abl = score(heads)
    rng = _random.Random(seed)
    pool = [hd for hd in all_heads(model) if hd not in set(heads)]
    picks = [rng.sample(pool, min(len(heads), len(pool))) for _ in range(random_control)]
    correct = [score(pick).records["correct"].to_numpy(dtype=float) for pick in picks]
    rand = accuracy(np.mean(correct, axis=0), seed=seed) if correct else None
    return AblationResult(heads, mode, base.interval, abl.interval, rand,
                          [float(c.mean()) for c in correct], picks, prompts.template_name)


@dataclass
class KeyHeadResult:
    """Saliency, key heads, ablation controls per mode, and the ground truth (if run).

    ``to_dict()`` is the CLI's JSON: ``key_heads``, ``baseline_accuracy`` (+ ``_ci``),
    ``ablate_key_accuracy`` (+ ``ablate_key_ci``), ``ablate_random_accuracy``,
    ``ablate_random_ci`` (first mode), per-mode results under ``ablation``, ``spearman``,
    ``top_overlap`` and ``k`` (saliency vs ground truth, zero ablation), ``saliency``,
    ``attribution`` and ``ground_truth`` ([L, H] lists), ``template``.
    """

    task: str
    percent: float | int
    template: str
    key_heads: list[Head]
    saliency: HeadTable
    attribution: HeadTable
    ablation: dict[str, AblationResult]
    ground_truth: HeadTable | None = None
    agreement: dict | None = None

    @property
    def first(self) -> AblationResult:
        return next(iter(self.ablation.values()))

    @property
    def n(self) -> int:
        return self.first.n

    def to_dict(self) -> dict:
        first = self.first
        out: dict = {"task": self.task, "n": self.n, "percent": self.percent,
                     "key_heads": [list(h) for h in self.key_heads],
                     "saliency": self.saliency.values.tolist(),
                     "attribution": self.attribution.values.tolist(),
                     "ablation": {m: r.to_dict() for m, r in self.ablation.items()},
                     "baseline_accuracy": first.baseline_accuracy,
                     "ablate_key_accuracy": first.ablated_accuracy,
                     "ablate_random_accuracy": first.random_mean,
                     "ablate_random_ci": list(first.random_ci),
                     "baseline_ci": ci_list(first.baseline), "ablate_key_ci": ci_list(first.ablated),
                     "template": self.template}
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth.values.tolist()
            out.update(self.agreement or {})
        return out

    def to_frame(self):
        """One row per head: saliency, attribution, ground truth (if run), key or not."""
        df = self.saliency.to_frame().merge(self.attribution.to_frame(), on=["layer", "head"])
        if self.ground_truth is not None:
            df = df.merge(self.ground_truth.to_frame(), on=["layer", "head"])
        keys = set(map(tuple, self.key_heads))
        df["key"] = [(l, h) in keys for l, h in zip(df["layer"], df["head"])]
        return df

    def figure(self, title: str = "head saliency"):
        from tvlens.attribution.figures import head_heatmap

        return head_heatmap(self.saliency.values, title, key_heads=self.key_heads)


def key_head_analysis(model, task: Task, vector=None, *, percent: float = 10.0, n: int = 32,
                      random_control: int = 5, modes=("zero", "mean"), ground_truth: bool = True,
                      shots: int = 5, template=None, seed: int = 0,
                      batch_size: int = 512) -> KeyHeadResult:
    """Saliency → key heads → ablation controls (+ the exhaustive ground truth).

    One prompt set (zero-shot with ``vector``, ``shots``-shot ICL without; the vector's
    own format unless ``template`` says otherwise) serves every step. ``batch_size``: rows
    per forward of the ground truth.
    """
    check_percent(percent)
    modes = tuple(modes)
    if not modes:
        raise TvlensError("no ablation modes given: use modes=('zero',), ('mean',) or both")
    prompts = _prompts(model, task, vector, template, n=n, shots=shots, split="test", seed=seed,
                       what="key_head_analysis")
    sal, attr = head_saliency(model, prompts, vector)
    saliency = HeadTable(sal, "saliency", {"task": task.name})
    keys = saliency.top(percent=percent)
    ablation = {mode: ablate_heads(model, task, keys, mode, vector, random_control, seed=seed,
                                   prompts=prompts) for mode in modes}
    gt = agr = None
    if ground_truth:
        effects = ablation_effects(model, prompts.batch, vector, mode="zero", batch_size=batch_size)
        gt = HeadTable(effects, "ablation effect", {"mode": "zero"})
        agr = agreement(sal, effects, percent)
    return KeyHeadResult(task.name, percent, prompts.template_name, keys, saliency,
                         HeadTable(attr, "attribution"), ablation, gt, agr)


__all__ = ["AblationResult", "KeyHeadResult", "ablate_heads", "key_head_analysis"]
