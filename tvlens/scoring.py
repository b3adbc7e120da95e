"""Moved: :mod:`tvlens.runner` (forward primitives) and :mod:`tvlens.stats` (intervals).
Transitional re-exports while the redesign lands; removed before the release."""

from tvlens.runner import (answer_logprobs, answer_nll, greedy_answers,  # noqa: F401
                           last_token_logits)
from tvlens.runner import pad_id as _pad_id  # noqa: F401
from tvlens.stats import bootstrap_ci  # noqa: F401
