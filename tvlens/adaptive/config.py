"""The adaptive generator's saved config: the architecture, the target, the method's
:class:`~tvlens.methods.ATVConfig` settings and the versions that made it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from tvlens.errors import TvlensError
from tvlens.io import versions
from tvlens.methods import ATVConfig

_DEFAULTS = ATVConfig()
DEFAULT_QUERY_TEMPLATE = _DEFAULTS.query_template


def check_scale(scale) -> float:
    """λ must be a finite non-zero number (λ = 0 would inject nothing and learn nothing)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TvlensError(f"λ (scale) must be a finite number, got {scale!r}")
    if scale == 0:
        raise TvlensError("λ (scale) = 0 injects nothing and gives no gradient; use e.g. 1.0")
    return float(scale)


@dataclass(frozen=True)
class AdaptiveConfig:
    """How an adaptive generator was built; saved as ``config.json`` next to its weights.

    Attributes:
        encoder: JSON spec rebuilding the encoder (see :func:`build_encoder`).
        layers: target layers receiving a vector.
        target: fingerprint of the target model.
        settings: the method's :class:`~tvlens.methods.ATVConfig` — ``position``
            (``"last"`` / ``"all"``), ``scale`` (λ), ``rank``, ``pooling``,
            ``query_template`` (how the generator reads a query), ``target_template`` (the
            target's prompt format, which ``evaluate`` uses), ``init``, ``seed`` and, once
            :func:`~tvlens.adaptive.train_generator` ran, the training settings; each is
            also readable as an attribute (``config.scale``).
        history: the training history saved with the weights.
        versions: :func:`tvlens.io.versions` of the libraries that made it.
    """

    encoder: dict[str, Any]
    layers: tuple[int, ...]
    target: dict[str, Any]
    settings: ATVConfig = field(default_factory=ATVConfig)
    history: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)

    def __getattr__(self, name: str):  # config.position, config.scale, ... from settings
        if name != "settings" and name in {f.name for f in fields(ATVConfig)}:
            return getattr(self.settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder, "layers": list(self.layers), "target": self.target,
                "settings": self.settings.to_dict(), "history": self.history,
                "versions": self.versions}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptiveConfig:
        """Rebuild from :meth:`to_dict`; unknown keys (a newer tvlens) are refused by name."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TvlensError(f"generator config has unknown field(s) {', '.join(map(repr, unknown))}: "
                              "it was written by another (newer?) tvlens; upgrade tvlens")
        try:
            return cls(encoder=data["encoder"], layers=tuple(data["layers"]), target=data["target"],
                       settings=ATVConfig.from_dict(data.get("settings", {})),
                       history=data.get("history", {}), versions=data.get("versions", {}))
        except KeyError as err:
            raise TvlensError(f"generator config lacks {err}") from None


def atv_settings(config: ATVConfig | None = None, **given) -> ATVConfig:
    """``config`` with the keywords that differ from the defaults on top
    (:meth:`MethodConfig.merged`)."""
    return ATVConfig.merged(config, **given)


__all__ = ["AdaptiveConfig", "DEFAULT_QUERY_TEMPLATE", "atv_settings", "check_scale"]
