"""Accuracy with heads ablated, against random head sets of the same size and no ablation.

:func:`ablate_heads` scores, on one :class:`~tvlens.prompts.PromptSet` and through
:func:`tvlens.evaluation.condition_correct` (the conditions along the batch; each rate has
the bootstrap CI :func:`tvlens.evaluate` would give it):

- ``baseline``: the prompts under ``vector`` (or ICL prompts without one);
- ``ablated``: the same with ``heads`` ablated (``vector + HeadPatch.ablation(...)``);
- ``random``: ``random_control`` random head sets of the same size (:func:`random_head_sets`,
  seeded). By default (``random_from="layers"``) each set has the ablated heads' layer
  distribution: with ``c_l`` ablated heads in layer ``l`` it holds ``c_l`` other heads of
  layer ``l`` (the control differs in *which* heads, not *where*; a layer with more
  ablated heads than others fills up with its own ablated heads, counted in
  ``random_overlap``); ``random_from="all"`` draws from every head not ablated. With
  ``c_{r,b} ∈ {0, 1}`` whether draw ``r`` answers prompt ``b`` correctly, the value is
  ``mean_r acc_r = mean_b f_b`` with ``f_b = mean_r c_{r,b}`` (the fraction of draws that
  get prompt ``b`` right), and its CI the bootstrap over prompts of ``f``
  (:func:`tvlens.stats.accuracy`): the prompts, not the few draws, are the sample.

:func:`key_head_analysis` chains saliency → key heads (top ``percent`` % of the heads after
the injection layer, :func:`~tvlens.attribution.key_heads.readable_heads`) → these
controls per ablation mode, on the vector's zero-shot prompts **and** on plain
``shots``-shot ICL prompts of the same task without a vector (the same heads, the same
random sets): a drop under the vector only says the heads carry θ; a drop in plain ICL as
well says they are heads the model needs for the task anyway. Plus the exhaustive ground
truth over the ranked heads (:mod:`tvlens.attribution.key_heads`).
"""

from __future__ import annotations

import random as _random
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tvlens.attribution.common import check_percent, ci_list
from tvlens.attribution.key_heads import (
    ablation_effects, agreement, head_means, head_saliency, injection_layer, select_key_heads,
    layer_histogram, readable_heads,
)
from tvlens.errors import TvlensError
from tvlens.evaluation import condition_correct, resolve_template
from tvlens.heads import Head, all_heads, check_heads
from tvlens.interventions import HeadPatch
from tvlens.prompts import PromptSet
from tvlens.results import HeadTable
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task


@dataclass
class AblationResult:
    """Accuracy with ``heads`` ablated vs random head sets of the same size vs none.

    ``random`` is the mean over draws with its CI over prompts (module docstring); None
    without draws. ``random_heads`` lists the heads of each draw, drawn as ``random_from``
    says (``"layers"``: the ablated heads' per-layer counts; ``"all"``: anywhere);
    ``random_overlap[r]`` is how many ablated heads draw ``r`` had to reuse (0 unless a
    layer has more ablated heads than others). ``scores`` holds the per-prompt scores
    behind ``baseline``, ``ablated`` and ``random`` (the fraction of draws correct), for
    pooling prompt sets with :func:`tvlens.stats.accuracy`.
    """

    heads: list[Head]
    mode: str
    baseline: Accuracy
    ablated: Accuracy
    random: Accuracy | None = None
    random_accuracies: list[float] = field(default_factory=list)
    random_heads: list[list[Head]] = field(default_factory=list)
    template: str = "arrow"
    random_from: str = "layers"
    random_overlap: list[int] = field(default_factory=list)
    scores: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # per prompt

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
                "random_from": self.random_from,
                "random_heads": [[list(h) for h in pick] for pick in self.random_heads],
                "random_overlap": self.random_overlap, "template": self.template}

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


def random_head_sets(model, heads: Sequence[Head], draws: int, *, seed: int = 0,
                     random_from: str = "layers") -> list[list[Head]]:
    """``draws`` random head sets of ``len(heads)`` heads each (``random.Random(seed)``).

    ``random_from="layers"``: for each layer ``l`` holding ``c_l`` of ``heads`` (layers in
    increasing order), ``c_l`` heads sampled without replacement from layer ``l``'s other
    heads — so every set has ``heads``' layer histogram; when a layer has fewer than
    ``c_l`` other heads, all of them plus a sample of its own ``heads``.
    ``random_from="all"``: ``min(len(heads), |pool|)`` heads from every head not in ``heads``.
    """
    heads = check_heads(model, heads)
    if random_from not in ("layers", "all"):
        raise TvlensError(f"random_from must be 'layers' (same layers as the heads) or 'all', "
                          f"got {random_from!r}")
    rng, chosen = _random.Random(seed), set(heads)
    if random_from == "all":
        pool = [hd for hd in all_heads(model) if hd not in chosen]
        return [rng.sample(pool, min(len(heads), len(pool))) for _ in range(draws)]
    counts, H = Counter(layer for layer, _ in heads), int(model.cfg.n_heads)
    picks = []
    for _ in range(draws):
        pick: list[Head] = []
        for layer in sorted(counts):
            others = [(layer, h) for h in range(H) if (layer, h) not in chosen]
            need = counts[layer]
            if len(others) >= need:
                pick += rng.sample(others, need)
            else:
                own = [hd for hd in heads if hd[0] == layer]
                pick += others + rng.sample(own, need - len(others))
        picks.append(pick)
    return picks


def ablate_heads(model, task: Task, heads: Sequence[Head], mode: str = "zero", vector=None,
                 random_control: int = 5, *, n: int = 32, shots: int = 5, split: str = "test",
                 template=None, seed: int = 0, prompts: PromptSet | None = None,
                 batch_size: int = 64, random_from: str = "layers") -> AblationResult:
    """Accuracy of ``task`` with ``heads`` ablated (see the module docstring).

    With ``vector`` the prompts are zero-shot queries carrying it; without, ``shots``-shot
    ICL prompts (``prompts`` overrides both). ``template=None``: the vector's own format,
    else ``"arrow"``. ``random_control`` random head sets of the same size
    (:func:`random_head_sets` with ``seed`` and ``random_from``) give the control; 0 skips
    it. Every condition runs through :func:`~tvlens.evaluation.condition_correct` (the
    head sets along the batch; on a Hugging Face model, with a vector at the last token or
    none, one KV cache of the prompts' prefix); ``batch_size``: rows per forward.
    """
    heads = check_heads(model, heads)
    if isinstance(random_control, bool) or not isinstance(random_control, int) or random_control < 0:
        raise TvlensError(f"random_control must be an integer >= 0, got {random_control!r}")
    picks = random_head_sets(model, heads, random_control, seed=seed, random_from=random_from)
    if prompts is None:
        prompts = _prompts(model, task, vector, template, n=n, shots=shots, split=split, seed=seed,
                           what="ablate_heads")
    means = head_means(model, prompts, vector) if mode == "mean" else None

    conditions = {"baseline": None, "ablated": HeadPatch.ablation(model, heads, mode, means)}
    conditions.update({f"random{r}": HeadPatch.ablation(model, pick, mode, means)
                       for r, pick in enumerate(picks)})
    scores = condition_correct(model, prompts, conditions, common=vector, batch_size=batch_size)
    correct = [scores.pop(f"random{r}") for r in range(len(picks))]
    rand = accuracy(np.mean(correct, axis=0), seed=seed) if correct else None
    overlap = [len(set(pick) & set(heads)) for pick in picks]
    if any(overlap):
        warnings.warn(f"ablate_heads: {max(overlap)} of the {len(heads)} heads had to be reused in a "
                      "random set (a layer has more ablated heads than other heads); see "
                      "random_overlap, or use random_from='all'", UserWarning, stacklevel=2)
    if correct:
        scores["random"] = np.mean(correct, axis=0)
    return AblationResult(heads, mode, accuracy(scores["baseline"], seed=seed),
                          accuracy(scores["ablated"], seed=seed), rand,
                          [float(c.mean()) for c in correct], picks, prompts.template_name,
                          random_from, overlap, scores)


@dataclass
class KeyHeadResult:
    """Saliency, key heads, ablation controls per mode (under the vector and in plain ICL),
    and the ground truth (if run).

    ``candidates`` are the heads that were ranked (after ``injection_layer`` with
    ``rank="after"``, all with ``rank="all"``); ``key_heads_before_injection`` flags the key
    heads at layers ``≤ injection_layer``, which cannot read θ (empty under ``"after"``).
    ``to_dict()`` is the CLI's JSON: ``key_heads``, ``k``, ``layer_histogram`` (``[L]``
    counts, summing to ``k``), ``rank``, ``injection_layer``, ``n_candidates``,
    ``baseline_accuracy`` (+ ``_ci``), ``ablate_key_accuracy`` (+ ``ablate_key_ci``),
    ``ablate_random_accuracy``, ``ablate_random_ci`` (first mode), the same with an
    ``icl_`` prefix for plain ``icl_shots``-shot ICL, per-mode results under ``ablation``
    and ``icl``, ``spearman`` and ``top_overlap`` (saliency vs ground truth over the
    candidates, zero ablation), ``saliency``, ``attribution`` and ``ground_truth`` ([L, H]
    lists), ``template``.
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
    rank: str = "after"
    injection_layer: int | None = None
    candidates: list[Head] = field(default_factory=list)
    icl: dict[str, AblationResult] | None = None
    icl_shots: int = 0

    @property
    def first(self) -> AblationResult:
        return next(iter(self.ablation.values()))

    @property
    def n(self) -> int:
        return self.first.n

    @property
    def k(self) -> int:
        return len(self.key_heads)

    @property
    def layer_histogram(self) -> list[int]:
        """How many key heads sit in each layer (``[n_layers]``, sums to ``k``)."""
        return layer_histogram(self.key_heads, self.saliency.shape[0])

    @property
    def key_heads_before_injection(self) -> list[Head]:
        """Key heads at layers ``≤ injection_layer``: they cannot read θ."""
        l0 = self.injection_layer
        return [] if l0 is None else [hd for hd in self.key_heads if hd[0] <= l0]

    def _readable(self, layer: int) -> bool:
        return self.injection_layer is None or layer > self.injection_layer

    def to_dict(self) -> dict:
        first = self.first
        out: dict = {"task": self.task, "n": self.n, "percent": self.percent, "rank": self.rank,
                     "injection_layer": self.injection_layer,
                     "n_candidates": len(self.candidates),
                     "key_heads": [list(h) for h in self.key_heads], "k": self.k,
                     "layer_histogram": self.layer_histogram,
                     "key_heads_before_injection": [list(h) for h in self.key_heads_before_injection],
                     "saliency": self.saliency.values.tolist(),
                     "attribution": self.attribution.values.tolist(),
                     "ablation": {m: r.to_dict() for m, r in self.ablation.items()},
                     "baseline_accuracy": first.baseline_accuracy,
                     "ablate_key_accuracy": first.ablated_accuracy,
                     "ablate_random_accuracy": first.random_mean,
                     "ablate_random_ci": list(first.random_ci),
                     "baseline_ci": ci_list(first.baseline), "ablate_key_ci": ci_list(first.ablated),
                     "random_from": first.random_from, "template": self.template}
        if self.icl:
            icl = next(iter(self.icl.values()))
            out.update({"icl_shots": self.icl_shots,
                        "icl": {m: r.to_dict() for m, r in self.icl.items()},
                        "icl_baseline_accuracy": icl.baseline_accuracy,
                        "icl_baseline_ci": ci_list(icl.baseline),
                        "icl_ablate_key_accuracy": icl.ablated_accuracy,
                        "icl_ablate_key_ci": ci_list(icl.ablated),
                        "icl_ablate_random_accuracy": icl.random_mean,
                        "icl_ablate_random_ci": list(icl.random_ci)})
        if self.ground_truth is not None:
            out["ground_truth"] = self.ground_truth.values.tolist()
            out.update(self.agreement or {})
        return out

    def to_frame(self, what: str = "heads"):
        """``"heads"``: one row per head — saliency, attribution, ground truth (if run),
        ``readable`` (after the injection layer), ``key``; ``"layers"``: one row per layer —
        ``key_heads`` (the histogram), ``saliency`` summed over heads, ``readable``;
        ``"ablation"``: one row per setting (``vector`` / ``icl``) × mode × condition
        (``baseline`` / ``ablated`` / ``random``) with accuracy, CI and n."""
        import pandas as pd

        if what == "heads":
            df = self.saliency.to_frame().merge(self.attribution.to_frame(), on=["layer", "head"])
            if self.ground_truth is not None:
                df = df.merge(self.ground_truth.to_frame(), on=["layer", "head"])
            keys = set(map(tuple, self.key_heads))
            df["readable"] = [self._readable(l) for l in df["layer"]]
            df["key"] = [(l, h) in keys for l, h in zip(df["layer"], df["head"])]
            return df
        if what == "layers":
            sal = self.saliency.values.float().sum(1).tolist()
            return pd.DataFrame([{"layer": l, "key_heads": c, "saliency": sal[l],
                                  "readable": self._readable(l)}
                                 for l, c in enumerate(self.layer_histogram)])
        if what == "ablation":
            frames = []
            for setting, results in (("vector", self.ablation), ("icl", self.icl or {})):
                for mode, r in results.items():
                    f = r.to_frame()
                    f.insert(0, "mode", mode)
                    f.insert(0, "setting", setting)
                    frames.append(f)
            return pd.concat(frames, ignore_index=True)
        raise TvlensError(f"to_frame takes 'heads', 'layers' or 'ablation', got {what!r}")

    def figure(self, title: str = "head saliency"):
        from tvlens.attribution.figures import head_heatmap

        return head_heatmap(self.saliency.values, title, key_heads=self.key_heads,
                            injected_layer=self.injection_layer)


def key_head_analysis(model, task: Task, vector=None, *, percent: float = 10.0, n: int = 32,
                      random_control: int = 5, modes=("zero", "mean"), ground_truth: bool = True,
                      shots: int = 5, template=None, seed: int = 0, batch_size: int = 512,
                      rank: str = "after", icl: bool = True, random_from: str = "layers"
                      ) -> KeyHeadResult:
    """Saliency → key heads → ablation controls (+ plain ICL, + the exhaustive ground truth).

    One prompt set (zero-shot with ``vector``, ``shots``-shot ICL without; the vector's
    own format unless ``template`` says otherwise) serves the saliency, the ablations and
    the ground truth. ``rank="after"`` (default) ranks only the heads after the vector's
    injection layer (a vector at the last layer is refused), ``"all"`` every head (key
    heads that cannot read θ are then listed in ``key_heads_before_injection``); key heads
    are the top ``percent`` % of the ranked heads. With a vector and ``icl``, the same
    ablations (same heads, same random sets: same ``seed``) are scored on ``shots``-shot
    ICL prompts of the same queries in the same format without the vector, i.e.
    ``ablate_heads(model, task, keys, mode, None, random_control, n=n, shots=shots,
    template=<that format>, seed=seed)``. ``batch_size``: rows per forward of the ground
    truth, which covers the ranked heads only.
    """
    check_percent(percent)
    modes = tuple(modes)
    if not modes:
        raise TvlensError("no ablation modes given: use modes=('zero',), ('mean',) or both")
    candidates = readable_heads(model, vector, rank)
    layer0 = injection_layer(vector) if vector is not None else None
    fmt = resolve_template(vector, template, what="key_head_analysis")  # one format for both
    prompts = _prompts(model, task, vector, fmt, n=n, shots=shots, split="test", seed=seed,
                       what="key_head_analysis")
    sal, attr = head_saliency(model, prompts, vector)
    saliency = HeadTable(sal, "saliency", {"task": task.name, "rank": rank})
    keys = select_key_heads(sal, percent, candidates)

    def ablations(v, ps):
        return {mode: ablate_heads(model, task, keys, mode, v, random_control, seed=seed, prompts=ps,
                                   random_from=random_from) for mode in modes}

    ablation = ablations(vector, prompts)
    icl_res = None
    if icl and vector is not None:
        icl_prompts = PromptSet.build(model, task, split="test", n=n, shots=shots,
                                      template=fmt, seed=seed)
        icl_res = ablations(None, icl_prompts)
    gt = agr = None
    if ground_truth:
        effects = ablation_effects(model, prompts.batch, vector, mode="zero", batch_size=batch_size,
                                   heads=candidates)
        gt = HeadTable(effects, "ablation effect", {"mode": "zero"})
        agr = agreement(sal, effects, percent, candidates)
    return KeyHeadResult(task.name, percent, prompts.template_name, keys, saliency,
                         HeadTable(attr, "attribution"), ablation, gt, agr, rank, layer0,
                         candidates, icl_res, shots if icl_res else 0)


__all__ = ["AblationResult", "KeyHeadResult", "ablate_heads", "key_head_analysis", "random_head_sets"]
