"""How a task vector acts: OV decomposition, key heads, rotation vs scaling (LTV analyses).

- :mod:`~tvlens.attribution.ov` — per-head OV terms of an injected vector, their direct
  logit attribution, and the re-injection test (OV weighted / packaged, MLP path).
- :mod:`~tvlens.attribution.key_heads` — saliency from one forward + backward, head
  ablation (zero / mean) with random controls, the exhaustive batched ground truth.
- :mod:`~tvlens.attribution.geometry` — fit of the linear map to the final residual,
  polar decomposition, logit lens, curves across layers.
- :mod:`~tvlens.attribution.figures` — plotly figures for each.

Every analysis takes any :class:`~tvlens.vector.TaskVector` (extracted, learned, adaptive
averaged) at one layer and position.
"""

from tvlens.attribution.geometry import (
    final_change, fit_linear_map, geometry_sweep, logit_lens, polar, rotation_scaling,
)
from tvlens.attribution.key_heads import (
    AblationResult, ablate_heads, ablation_effects, ablation_hooks, agreement, head_means,
    head_saliency, key_head_analysis, top_heads,
)
from tvlens.attribution.ov import OVDecomposition, mlp_path_terms, ov_decomposition, reinjection_test

__all__ = [
    "AblationResult", "OVDecomposition", "ablate_heads", "ablation_effects", "ablation_hooks",
    "agreement", "final_change", "fit_linear_map", "geometry_sweep", "head_means",
    "head_saliency", "key_head_analysis", "logit_lens", "mlp_path_terms", "ov_decomposition",
    "polar", "reinjection_test", "rotation_scaling", "top_heads",
]
