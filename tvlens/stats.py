"""The one place tvlens computes an interval: accuracy (or any mean score) with a 95% CI.

Two interval methods, chosen by what is known about the scores:

- ``"bootstrap"`` (the default for every accuracy tvlens reports): the percentile
  bootstrap of the mean over the examples, seeded. It needs the per-example scores and
  works for fractional scores too (a prompt's fraction of correct random-control draws).
- ``"exact"``: the Clopper–Pearson interval of a binomial proportion (``scipy.stats``),
  for 0/1 scores, or when only the count of successes and trials survives (the
  emergence runs log accuracy and n, not records).

- ``replicate_interval(values)``: the Student-t interval of the mean of independent
  replicates (one value per seed of a whole experiment, as ``tvlens reproduce`` reports),
  never narrower than the replicates' own intervals and within the quantity's range.

``accuracy(scores)`` returns an :class:`Accuracy` (value, interval, n); every analysis
that reports a rate calls it, so ablated, re-injected and random-control accuracies carry
intervals computed the same way as ``evaluate``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tvlens.errors import TvlensError

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def bootstrap_ci(scores: Sequence[float] | np.ndarray, *, n_resamples: int = N_RESAMPLES,
                 confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``scores`` (NaN for no scores); seeded."""
    x = np.asarray(scores, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def exact_ci(successes: int, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper–Pearson interval of ``successes / n`` (NaN for ``n = 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise TvlensError(f"{successes} successes out of {n} trials is not a proportion")
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class Accuracy:
    """A mean score with its interval: ``value`` in ``[ci_low, ci_high]`` over ``n`` examples."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    method: str = "bootstrap"

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}

    def as_tuple(self) -> tuple[float, float, float]:
        return self.value, self.ci_low, self.ci_high

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def accuracy(scores: Sequence[float] | np.ndarray, *, method: str = "bootstrap", seed: int = 0,
             confidence: float = CONFIDENCE) -> Accuracy:
    """The mean of per-example ``scores`` with its interval (see the module docstring)."""
    x = np.asarray(scores, dtype=float)
    value = float(x.mean()) if x.size else float("nan")
    if method == "bootstrap":
        lo, hi = bootstrap_ci(x, seed=seed, confidence=confidence)
    elif method == "exact":
        if not np.isin(x, (0.0, 1.0)).all():
            raise TvlensError("the exact binomial interval needs 0/1 scores; use method='bootstrap'")
        lo, hi = exact_ci(int(x.sum()), int(x.size), confidence=confidence)
    else:
        raise TvlensError(f"unknown interval method {method!r}; use 'bootstrap' or 'exact'")
    return Accuracy(value, lo, hi, int(x.size), method)


def proportion(p: float, n: int, *, confidence: float = CONFIDENCE) -> Accuracy:
    """A rate known only as ``p`` over ``n`` trials, with its exact (Clopper–Pearson) interval."""
    k = int(round(p * n))
    lo, hi = exact_ci(k, n, confidence=confidence)
    return Accuracy(float(p), lo, hi, int(n), "exact")


def replicate_interval(values: Sequence[float], *,
                       own: Sequence[tuple[float, float]] | None = None,
                       bounds: tuple[float, float] = (-math.inf, math.inf),
                       confidence: float = CONFIDENCE) -> Accuracy:
    """The mean of independent replicates (e.g. one value per seed) with its interval.

    The interval is the Student-t interval ``mean ± t_{(1+c)/2, n-1} · sd / √n``, then

    - widened to cover ``own``, the replicates' own intervals averaged bound by bound
      (``[mean of lows, mean of highs]``): replicates that share their evaluation items
      do not show the items' sampling error in their spread, so three seeds that agree to
      the digit must not give a zero-width interval; NaN own bounds are left out;
    - intersected with ``bounds``, the range the quantity can take (``[0, 1]`` for a
      rate): the true mean lies in it, so the intersection keeps the coverage.

    One replicate gives its own interval (NaN without ``own``: one run says nothing about
    the spread). A value outside ``bounds`` is an error, not clipped: the range was
    declared wrongly.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise TvlensError("no replicates to average")
    low, high = (float(b) for b in bounds)
    outside = x[(x < low) | (x > high)]
    if outside.size:
        raise TvlensError(f"replicate value {outside[0]:g} lies outside its declared range "
                          f"[{low:g}, {high:g}]; declare the quantity's real range")
    mean = float(x.mean())
    lo = hi = float("nan")
    if x.size > 1:
        from scipy.stats import t

        half = float(t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
        lo, hi = mean - half, mean + half
    if own is not None:
        own_lows, own_highs = np.asarray(own, dtype=float).reshape(-1, 2).T
        own_lows, own_highs = own_lows[~np.isnan(own_lows)], own_highs[~np.isnan(own_highs)]
        if own_lows.size:
            lo = float(np.fmin(lo, own_lows.mean()))  # fmin/fmax: a NaN t-bound yields
        if own_highs.size:
            hi = float(np.fmax(hi, own_highs.mean()))  # to the own bound
    if not math.isnan(lo):
        lo = max(lo, low)
    if not math.isnan(hi):
        hi = min(hi, high)
    return Accuracy(mean, lo, hi, int(x.size), "t")
