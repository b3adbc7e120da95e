"""Interventions: objects whose ``hooks(model, batch)`` change a forward, and compose.

- :mod:`~tvlens.interventions.base` — the protocol, :class:`Compose`, hook registration.
- :mod:`~tvlens.interventions.residual` — :class:`ResidualEdit` (add / replace vectors in
  the residual stream at layers × positions; what a TaskVector applies).
- :mod:`~tvlens.interventions.heads` — :class:`HeadPatch` (set / add ``z`` of heads:
  zero and mean ablation, FV's patching, saliency's probe).
- :mod:`~tvlens.interventions.freeze` — :class:`Freeze` (hook points set to recorded
  activations: frozen attention patterns, frozen norm scales).
"""

from tvlens.interventions.base import (Compose, HasHooks, Hook, Intervention, as_intervention,
                                       hooks_applied, intervention_hooks)
from tvlens.interventions.freeze import Freeze
from tvlens.interventions.heads import HeadPatch, z_hook_name
from tvlens.interventions.residual import (InjectionSpec, Mode, ResidualEdit, check_layer, injected,
                                           injection_hooks, resid_hook_name, validate_spec)

__all__ = ["Compose", "Freeze", "HasHooks", "HeadPatch", "Hook", "InjectionSpec", "Intervention", "Mode",
           "ResidualEdit", "as_intervention", "check_layer", "hooks_applied", "injected",
           "injection_hooks", "intervention_hooks", "resid_hook_name", "validate_spec", "z_hook_name"]
