"""Learned task vectors (LTV): train θ by gradient descent at any layers and positions.

- :func:`learn_task_vector` — the trainer (prefix caching, early stopping, checkpoints);
- :mod:`tvlens.learn.prefix` — skip the blocks below the injection layer;
- :mod:`tvlens.learn.experiments` — the LTV paper's configurations, composition, sweeps.
"""

from tvlens.learn.trainer import learn_task_vector

__all__ = ["learn_task_vector"]
