"""The methods' configs and their defaults: the one table of per-method conventions.

=========  =======  =====  ========  ==========================================
method     mode     K      template  source of the default
=========  =======  =====  ========  ==========================================
icl-tv     replace  5      hendel    Hendel et al. 2023 (K = 5, N = 32 here)
vanilla    add      5      hendel    Yang et al. 2025's baseline, on Hendel's prompts
fv         add      10     fv        Todd et al. 2024 (``"Q: {x}\\nA: {y}\\n\\n"``; N = 100,
                                     M = 25, ICL-correct dev queries, bias per head)
ltv        add      0      qa        Yang et al. 2025 (zero-shot training; Todd's tasks, Todd's Q/A format)
atv        add      0      atv       Kang et al. 2025 (target ``"Q: {x}\\nA:"``; per task: atv_templates)
=========  =======  =====  ========  ==========================================

``TEMPLATES["hendel"]`` and ``["fv"]`` (:mod:`tvlens.templates`) are the papers' formats
byte for byte; tvlens 0.1 defaulted icl-tv and vanilla to ``"arrow"`` (``"{x} -> {y}\\n"``,
no paper's format), on which Hendel's vectors fail on SmolLM2 (issue 13). LTV defaulted
to ``arrow`` until issue 14; it now trains on Todd's ``"Q: {x}\\nA:"`` queries (``qa``,
the bytes of ``fv``: the LTV paper works on Todd's tasks and compares with FV on them;
its code is unreleased), whose prompts are long enough for its early position 4. ATV's
own ``atv`` format is issue 13's. Only settings that change a
result are config fields; batch sizes that only bound memory are arguments of the calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from tvlens.methods.base import MethodConfig, register

# the default prompt format of each method (see the module docstring)
DEFAULT_TEMPLATES: dict[str, str] = {
    "icl-tv": "hendel",  # icl_task_vectors: core/data/datasets/few_shot_format.py
    "vanilla": "hendel",  # the same prompts as icl-tv (Yang et al. 2025's baseline)
    "fv": "fv",  # function_vectors: src/utils/prompt_utils.py ("Q:" / "\nA:" / "\n\n")
    "ltv": "qa",  # Todd's format (the LTV paper's tasks are Todd's); "arrow" until issue 14
    "atv": "atv",  # ATV_training.py:996, utils/data_utils.py:90-137 (tvlens.templates)
}


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@register
@dataclass(frozen=True)
class ICLTVConfig(MethodConfig):
    """Hendel's ICL task vector: the mean residual at the last token of K-shot prompts."""

    method: ClassVar[str] = "icl-tv"
    shots: int = _f(5, "demonstrations per prompt")
    n_prompts: int = _f(32, "prompts averaged (dummy queries from the train split)")
    template: str = _f(DEFAULT_TEMPLATES["icl-tv"], "prompt format: a TEMPLATES name or a demo string")
    seed: int = _f(0, "prompt sampling seed")


@register
@dataclass(frozen=True)
class VanillaConfig(ICLTVConfig):
    """The vanilla difference vector: mean K-shot residual minus mean zero-shot residual,
    over the same prompts as :class:`ICLTVConfig` (so the same settings)."""

    method: ClassVar[str] = "vanilla"


@register
@dataclass(frozen=True)
class FVConfig(MethodConfig):
    """Todd's function vector: Σ of the top-k heads' mean outputs by indirect effect."""

    method: ClassVar[str] = "fv"
    k: int = _f(10, "heads summed into the vector")
    shots: int = _f(10, "demonstrations per prompt")
    n_prompts: int = _f(100, "clean prompts for the mean head outputs (Todd's 100)")
    n_ie_prompts: int = _f(25, "shuffled-label prompts for the indirect effects (Todd's 25)")
    template: str = _f(DEFAULT_TEMPLATES["fv"], "prompt format: a TEMPLATES name or a demo string")
    query_split: str = _f("dev", "split the queries are drawn from (Todd: valid = our dev)",
                          choices=["train", "dev", "test"])
    icl_filter: bool = _f(True, "keep only queries that K-shot ICL answers correctly (Todd's filter)")
    bias: str = _f("per_head", "output bias b_O added once per head (Todd) or once per layer",
                   choices=["per_head", "per_layer"])
    seed: int = _f(0, "prompt sampling seed")


@register
@dataclass(frozen=True)
class LTVConfig(MethodConfig):
    """Learned task vector: θ at layers × positions trained on the answer loss (AdamW)."""

    method: ClassVar[str] = "ltv"
    shots: int = _f(0, "demonstrations in each training prompt (0: zero-shot)")
    steps: int = _f(500, "maximum optimiser steps (early stopping on dev normally ends sooner)")
    lr: float = _f(0.05, "AdamW learning rate (in residual-RMS units when relative_lr)")
    batch_size: int = _f(16, "training prompts per step")
    init: str = _f("zero", "θ's initialisation", choices=["zero", "random"])
    seed: int = _f(0, "batch sampling, init and demonstration seed")
    dev_every: int = _f(10, "steps between dev evaluations")
    patience: int = _f(3, "dev evaluations without improvement before stopping")
    n_dev: int | None = _f(48, "dev items scored at each evaluation")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    relative_lr: bool = _f(True, "scale θ by the residual RMS of each layer")
    template: str = _f(DEFAULT_TEMPLATES["ltv"], "prompt format: a TEMPLATES name or a demo string")


@register
@dataclass(frozen=True)
class ATVConfig(MethodConfig):
    """Adaptive task vectors: a small model maps each query to vectors for every layer.

    The defaults are the ``"fast"`` recipe; ``tvlens.adaptive.recipe_config("reference")``
    gives the released code's (``tvlens.adaptive.config.RECIPES``)."""

    method: ClassVar[str] = "atv"
    recipe: str = _f("fast", "the named preset these settings started from (fast / reference)")
    position: str = _f("last", "where vectors are added", choices=["last", "all"])
    scale: float = _f(1.0, "λ, multiplying the generated vectors (finite, > 0)")
    rank: int | None = _f(None, "low-rank bottleneck of the expansion (None: full)")
    pooling: str = _f("last", "how the generator pools its hidden states", choices=["last", "mean"])
    hidden: str = _f("normalized", "the generator's hidden state: its final norm before the gain "
                     "(normalized) or after it (final: HF's last_hidden_state, as ATV reads GPT-2)",
                     choices=["normalized", "final"])
    query_template: str = _f("Q: {x}\nA:", "how the generator reads a query")
    target_template: str = _f(DEFAULT_TEMPLATES["atv"], "the target's prompt format")
    natural_templates: bool = _f(False, "train on each task's natural-language ATV templates "
                                 "(tvlens.templates.atv_templates), the loss averaged over them")
    init: str = _f("zeros", "expansion initialisation", choices=["zeros", "default"])
    epochs: int = _f(3, "passes over the pooled training pairs")
    batch_size: int = _f(16, "training pairs per step")
    n_per_task: int | None = _f(None, "train pairs per task (None: all)")
    shuffle: bool = _f(True, "shuffle the pairs every epoch (False: task after task, as released)")
    lr: float = _f(5e-4, "Adam learning rate")
    weight_decay: float = _f(1e-5, "Adam weight decay")
    seed: int = _f(0, "the generator's initialisation seed (training's data order: train_generator(seed=))")
