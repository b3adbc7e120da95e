"""Extracted task vectors: ICL task vectors (Hendel), vanilla difference vectors, function
vectors (Todd), and layer sweeps over any of them."""

from tvlens.extract.fv import (
    function_vector,
    fv_from_heads,
    indirect_effects,
    indirect_effects_loop,
    mean_head_outputs,
    post_norm_scales,
    query_pool,
    shuffled_prompts,
)
from tvlens.extract.icl_tv import icl_task_vector, vanilla_task_vector
from tvlens.extract.sweep import METHOD_DEFAULTS, Extraction, LayerSweep, extract, layer_sweep

__all__ = [
    "METHOD_DEFAULTS", "Extraction", "LayerSweep", "extract", "function_vector", "fv_from_heads",
    "icl_task_vector", "indirect_effects", "indirect_effects_loop", "layer_sweep",
    "mean_head_outputs", "post_norm_scales", "query_pool", "shuffled_prompts", "vanilla_task_vector",
]
