"""How a task vector acts: OV decomposition, key heads, rotation vs scaling (LTV analyses).

- :mod:`~tvlens.attribution.ov` — per-head OV terms of an injected vector, the direct and
  total MLP terms, their direct logit attribution.
- :mod:`~tvlens.attribution.reinjection` — those terms re-injected instead of the vector at
  every placement, and the controls (θ minus its OV terms; frozen attention).
- :mod:`~tvlens.attribution.key_heads` — saliency from one forward + backward, head
  means, the exhaustive batched ablation ground truth.
- :mod:`~tvlens.attribution.ablation` — accuracy with heads ablated (zero / mean) against
  random head sets and none, and the whole key-head analysis.
- :mod:`~tvlens.attribution.geometry` — fit of the linear map to the final residual,
  polar decomposition, logit lens, curves across layers.
- :mod:`~tvlens.attribution.common` — one-vector checks, ``parse_heads``, ``check_percent``.
- :mod:`~tvlens.attribution.figures` — plotly figures for each.

Every analysis takes any :class:`~tvlens.vector.TaskVector` (extracted, learned, adaptive
averaged) at one layer and position, writes prompts in the vector's own format unless told
otherwise, scores accuracy through :func:`tvlens.evaluation.evaluate` (so every rate has a
CI) and returns a result object whose ``to_dict()`` is plain JSON naming the ``template``.
"""

from tvlens.attribution.ablation import (
    AblationResult, KeyHeadResult, ablate_heads, key_head_analysis, random_head_sets,
)
from tvlens.attribution.common import check_percent, parse_heads, single_vector
from tvlens.attribution.geometry import (
    RotationScaling, final_change, fit_linear_map, geometry_sweep, logit_lens, polar, rotation_scaling,
)
from tvlens.attribution.key_heads import (
    ablation_effects, agreement, head_means, head_saliency, injection_layer, layer_histogram,
    readable_heads, select_key_heads, top_heads,
)
from tvlens.attribution.ov import (  # issue 14: like-for-like path terms
    KINDS, PACKAGED, OVDecomposition, PathTerms, mlp_direct_terms, mlp_path_terms, mlp_total_terms,
    norm_weight, ov_decomposition, path_terms,
)
from tvlens.attribution.reinjection import (  # issue 14: every placement, controls
    CONTROLS, PLACEMENTS, FrozenAttention, Reinjection, ReinjectionResult, reinjection_test,
)

__all__ = [
    "AblationResult", "KeyHeadResult", "OVDecomposition", "Reinjection", "ReinjectionResult",
    "RotationScaling", "ablate_heads", "ablation_effects", "agreement", "check_percent",
    "final_change", "fit_linear_map", "geometry_sweep", "head_means", "head_saliency",
    "key_head_analysis", "logit_lens", "mlp_path_terms", "ov_decomposition", "parse_heads",
    "polar", "reinjection_test", "rotation_scaling", "single_vector", "top_heads",
    "CONTROLS", "KINDS", "PACKAGED", "PLACEMENTS", "FrozenAttention", "PathTerms",
    "mlp_direct_terms", "mlp_total_terms", "norm_weight", "path_terms",
    "injection_layer", "layer_histogram", "random_head_sets", "readable_heads", "select_key_heads",
]
