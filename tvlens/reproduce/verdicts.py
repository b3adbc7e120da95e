"""How a finding's verdict follows from its numbers: the rule every report states.

A finding's paper claim is written as one or more :class:`Claim` comparisons
``left > right`` between measured values (or a value and a constant). For each
comparison the difference ``d = left − right`` gets a 95% interval:

- **one seed**: the conservative interval ``[left.ci_low − right.ci_high,
  left.ci_high − right.ci_low]`` from the two values' own intervals (a constant has a
  zero-width interval);
- **several seeds**: the per-seed differences ``d_s``, averaged with their Student-t
  interval, widened to cover the average of the seeds' own conservative intervals (seeds
  that share evaluation items do not show the items' sampling error in their spread) and
  kept within the range the difference can take (``[−1, 1]`` for two rates)
  (:func:`tvlens.stats.replicate_interval`).

Each value's mean over seeds gets the same interval, within the value's own range (a
rate lies in ``[0, 1]``; a finding declares any other range).

The comparison **holds** when the interval lies above 0, **fails** when it lies below
0, and is **unclear** when it contains 0. The verdict of the finding:

- ``reproduces``: every comparison holds;
- ``does not reproduce``: every comparison fails;
- ``partially``: at least one holds and at least one does not;
- ``inconclusive``: none holds and at least one is unclear.

A finding whose method refuses a model (e.g. the OV decomposition on Gemma-3's
post-attention norms) is reported as ``refused``, with the method's reason, not judged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tvlens.errors import TvlensError
from tvlens.stats import replicate_interval

VERDICTS = ("reproduces", "partially", "does not reproduce", "inconclusive")
RULE = __doc__.split("\n\n", 1)[1].strip()
RATE = (0.0, 1.0)  # the range of every value a finding does not declare otherwise

Runs = Sequence[Mapping[str, Mapping[str, float]]]
RangeOf = Callable[[str], tuple[float, float]]


def _rates(name: str) -> tuple[float, float]:
    return RATE


@dataclass(frozen=True)
class Claim:
    """``left > right``: ``left`` names a measured value; ``right`` a value or a constant."""

    text: str
    left: str
    right: str | float

    def names(self) -> list[str]:
        return [self.left] + ([self.right] if isinstance(self.right, str) else [])


def _side(runs: Runs, side: str | float, s: int) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) of one side of a claim in seed ``s``'s values."""
    if not isinstance(side, str):
        return float(side), float(side), float(side)
    v = runs[s][side]
    return float(v["value"]), float(v["ci_low"]), float(v["ci_high"])


def _range(side: str | float, range_of: RangeOf) -> tuple[float, float]:
    return range_of(side) if isinstance(side, str) else (float(side), float(side))


def difference(claim: Claim, runs: Runs, range_of: RangeOf = _rates) -> dict:
    """The interval of ``left − right`` over the seeds' values (module docstring);
    ``range_of(name)`` is a value's range (default: a rate's ``[0, 1]``)."""
    if not runs:
        raise TvlensError("no runs to judge")
    missing = [n for n in claim.names() if any(n not in r for r in runs)]
    if missing:
        raise TvlensError(f"claim {claim.text!r} needs values {missing} that a run did not measure")
    if len(runs) == 1:
        lv, ll, lh = _side(runs, claim.left, 0)
        rv, rl, rh = _side(runs, claim.right, 0)
        return {"mean": lv - rv, "ci_low": ll - rh, "ci_high": lh - rl, "seeds": [lv - rv],
                "interval": "conservative, from the run's own intervals"}
    sides = [(_side(runs, claim.left, s), _side(runs, claim.right, s)) for s in range(len(runs))]
    (left_lo, left_hi), (right_lo, right_hi) = _range(claim.left, range_of), _range(claim.right, range_of)
    diffs = [lv - rv for (lv, _, _), (rv, _, _) in sides]
    iv = replicate_interval(diffs, own=[(ll - rh, lh - rl) for (_, ll, lh), (_, rl, rh) in sides],
                            bounds=(left_lo - right_hi, left_hi - right_lo))
    return {"mean": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "seeds": diffs,
            "interval": f"Student-t over {len(runs)} seeds, ≥ their own intervals, within range"}


def outcome(diff: Mapping[str, float]) -> str:
    """``holds`` / ``fails`` / ``unclear`` from a difference interval."""
    lo, hi = diff["ci_low"], diff["ci_high"]
    if any(math.isnan(float(x)) for x in (lo, hi)):
        return "unclear"
    if lo > 0:
        return "holds"
    if hi < 0:
        return "fails"
    return "unclear"


def verdict(outcomes: Sequence[str]) -> str:
    """The finding's verdict from its comparisons' outcomes (module docstring)."""
    if not outcomes:
        raise TvlensError("a finding needs at least one claim to judge")
    holds = sum(o == "holds" for o in outcomes)
    fails = sum(o == "fails" for o in outcomes)
    if holds == len(outcomes):
        return "reproduces"
    if fails == len(outcomes):
        return "does not reproduce"
    if holds:
        return "partially"
    return "inconclusive"


def judge(claims: Sequence[Claim], runs: Runs, range_of: RangeOf = _rates) -> dict:
    """Every claim's difference and outcome, and the verdict: ``{"claims": [...], "verdict"}``."""
    rows = []
    for claim in claims:
        d = difference(claim, runs, range_of)
        rows.append({"text": claim.text, "left": claim.left, "right": claim.right,
                     "difference": d, "outcome": outcome(d)})
    return {"claims": rows, "verdict": verdict([r["outcome"] for r in rows])}


def aggregate(runs: Runs, range_of: RangeOf = _rates) -> dict[str, dict]:
    """Each value over the seeds: ``mean``, a 95% interval (the run's own for one seed;
    for several, Student-t over seeds, ≥ their own intervals, within ``range_of(name)``)
    and the seeds' values."""
    out = {}
    for name in runs[0]:
        vals = [float(r[name]["value"]) for r in runs]
        if len(runs) == 1:
            v = runs[0][name]
            out[name] = {"mean": vals[0], "ci_low": float(v["ci_low"]), "ci_high": float(v["ci_high"]),
                         "n": v.get("n"), "seeds": vals, "interval": v.get("interval", "the run's own")}
        else:
            iv = replicate_interval(vals, own=[(r[name]["ci_low"], r[name]["ci_high"]) for r in runs],
                                    bounds=range_of(name))
            out[name] = {"mean": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high,
                         "n": runs[0][name].get("n"), "seeds": vals,
                         "interval": f"Student-t over {len(runs)} seeds, ≥ their own intervals, "
                                     "within range"}
    return out
