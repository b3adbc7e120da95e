"""Moved: :mod:`tvlens.interventions` (residual edits) and :mod:`tvlens.runner` (forwards).
Transitional re-exports while the redesign lands; removed before the release."""

from tvlens.interventions.base import Hook, hooks_applied  # noqa: F401
from tvlens.interventions.residual import (InjectionSpec, Mode, ResidualEdit, check_layer,  # noqa: F401
                                           injected, injection_hooks, resid_hook_name, validate_spec)
from tvlens.runner import forward, run_logits  # noqa: F401
