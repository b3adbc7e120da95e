"""What the attribution analyses share: one-vector checks and the head / percent arguments.

Prompts, forwards and scores come from the ground floor (:class:`tvlens.prompts.PromptSet`,
:func:`tvlens.runner.run`, :func:`tvlens.evaluation.evaluate`); heads are enumerated and
validated by :mod:`tvlens.heads`.
"""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.heads import Head
from tvlens.vector import TaskVector


def single_vector(model, vector: TaskVector) -> tuple[int, object, Float[Tensor, " d_model"]]:
    """``(layer, position, c)`` of a one-layer, one-position, shared vector.

    ``c = scale · θ`` is the value the injection writes (added, or replacing the residual).
    Refuses a vector made for another model, a per-example vector, or several layers.
    """
    if not isinstance(vector, TaskVector):
        raise TvlensError(f"expected a TaskVector, got {type(vector).__name__}")
    vector.check_model(model)
    if vector.per_example:
        raise TvlensError("this analysis needs one shared vector, not per-example vectors; "
                          "average them first (vectors.mean(0))")
    if len(vector.layers) != 1 or len(vector.positions) != 1:
        raise TvlensError(
            f"this analysis takes a vector at one layer and one position, got layers "
            f"{vector.layers} and positions {vector.positions}; slice it with "
            "tv.select(layers=[layer], positions=[pos])"
        )
    if vector.positions[0] == "all":
        raise TvlensError("position 'all' has no single injected position; use a vector at one position")
    c = vector.vectors[0, 0].detach().float().to(model.cfg.device) * float(vector.scale)
    return vector.layers[0], vector.positions[0], c


def parse_heads(text: str) -> list[Head]:
    """``"12.3,14.0"`` → ``[(12, 3), (14, 0)]``."""
    heads = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            layer, h = item.split(".")
            heads.append((int(layer), int(h)))
        except ValueError:
            raise TvlensError(f"cannot read head {item!r}: write heads as LAYER.HEAD, e.g. 12.3,14.0") from None
    if not heads:
        raise TvlensError("no heads given: write them as LAYER.HEAD,LAYER.HEAD")
    return heads


def check_percent(percent: float) -> float:
    """``percent`` if it is in ``(0, 100]``, else a clear error."""
    if isinstance(percent, bool) or not (isinstance(percent, (int, float)) and 0 < percent <= 100):
        raise TvlensError(f"percent must be in (0, 100], got {percent!r}")
    return float(percent)


def ci_list(acc) -> list[float]:
    """``[ci_low, ci_high]`` of an :class:`~tvlens.stats.Accuracy` (NaNs for None), for JSON."""
    return [float("nan"), float("nan")] if acc is None else [acc.ci_low, acc.ci_high]


__all__ = ["check_percent", "ci_list", "parse_heads", "single_vector"]
