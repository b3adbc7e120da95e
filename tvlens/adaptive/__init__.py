"""Adaptive task vectors (ATV): a generator writes a task vector for each query.

- :mod:`~tvlens.adaptive.encoders`: what reads the query (tiny native LM, a loaded LM, MiniLM).
- :mod:`~tvlens.adaptive.config`: :class:`AdaptiveConfig`, the saved config (architecture,
  target, the :class:`~tvlens.methods.ATVConfig` settings, versions), and the recipes
  ``fast`` / ``reference`` (:func:`recipe_config`; the released code's rules, file:line).
- :mod:`~tvlens.adaptive.generator`: encoder + linear expansion → per-layer vectors, an
  intervention (a ``ResidualEdit`` per batch); save / load.
- :mod:`~tvlens.adaptive.training`: joint training on many tasks, target frozen.
- :mod:`~tvlens.adaptive.analysis`: in-domain / unseen comparison, norms, similarity,
  2-D projection, λ sweep.
"""

from tvlens.adaptive.generator import (
    AdaptiveConfig,
    AdaptiveGenerator,
    Expansion,
    check_scale,
    expansion_parameter_count,
    make_generator,
)
from tvlens.adaptive.config import RECIPES, recipe_config
from tvlens.adaptive.training import (check_unseen, input_overlap, target_templates, train_generator,
                                      training_loss, training_pairs)

__all__ = [
    "AdaptiveConfig", "AdaptiveGenerator", "Expansion", "check_scale", "check_unseen", "input_overlap",
    "expansion_parameter_count", "make_generator", "RECIPES", "recipe_config", "target_templates",
    "train_generator", "training_loss", "training_pairs",
]
