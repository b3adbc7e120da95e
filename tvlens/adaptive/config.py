"""The adaptive generator's saved config (architecture, target, the method's
:class:`~tvlens.methods.ATVConfig` settings, versions) and the named recipes.

Recipes (:data:`RECIPES`, :func:`recipe_config`; ``tvlens adaptive train --recipe``):

``fast`` (the default): tvlens 0.1's — λ = 1 on a zero-initialised expansion (training
starts at the zero-shot model), the query's last token, one target template, shuffled
batches of 16, Adam 5e-4 / 1e-5; minutes on a CPU.

``reference``: the released code of Kang et al. (github MLAI-Yonsei/ATV), rule by rule:

- generator input: ``"Q: {input} \\n A: "`` (``ATV_training.py:1060``, applied at :1072 via
  ``prepare_query_text`` :588-600, which strips x, ``utils/data_utils.py:237``), tokenized
  with GPT-2's tokenizer defaults (no BOS); its ``last_hidden_state`` (after ``ln_f``, gain
  included) at the last real token (:1185-1190) → ``hidden="final"``, ``pooling="last"``;
- expansion: ``nn.Linear(d_gen, d_model·L)`` with PyTorch's default init and bias (:1140),
  viewed as ``[B, L, d_model]`` (:1194) → ``init="default"``;
- injection: every decoder layer ``model.layers.{l}`` (:1299, ``utils/model_utils.py:54``),
  ``h ← h + λ·v_l`` with λ = ``weight_fv`` = 0.001 (``scripts/ATV_training.sh``) and
  ``weight_ori`` 1 (``utils/intervention_utils.py:104-106``); the tuple branch adds to
  ``output[0]`` whole, i.e. **every position**, answer tokens included, the answer being
  appended for teacher forcing (:1288-1303) → ``position="all"``, ``scale=0.001``. (With
  transformers versions whose decoder layers return a tensor, not the pinned 4.53.0, the
  code falls to its "MAMBA" branch, ``intervention_utils.py:109-118``, and adds at
  position −1 only.);
- target prompts: each task's natural-language templates from
  ``dataset_files/natural_prompts_manual.json`` + ``"\\nA:"`` (:996, :1081-1085), answer
  ``" " + y`` (``data_utils.py:135-139``); target tokenizer defaults (Llama-3: BOS);
  labels −100 on the prompt's tokens (:1290-1297) → ``target_template="atv"``,
  ``natural_templates=True`` (:func:`tvlens.templates.atv_templates`);
- loss: HF's mean cross-entropy over the answer tokens per (example, template), averaged
  over the example's templates, then over the batch (:1305-1326);
- optimiser: Adam over the generator and the expansion, lr 5e-4, weight decay 1e-5 (:1142,
  ``ATV_training.sh``); generator in ``train()`` mode (dropout on, :1119, :1168), target
  frozen (:1123-1125); batch 1 (:1551), 15 epochs, up to 90 train examples per task
  (``--test_samples 90``; :314-315); the pooled data in a fixed order, task after task,
  no shuffling (:1177) → ``batch_size=1``, ``epochs=15``, ``n_per_task=90``, ``shuffle=False``.

What tvlens cannot copy: the generator is GPT-2 small (124 M, d 768) there; the nearest
model we ship is SmolLM2-135M (d 576, also a decoder LM), whose Llama blocks have no
dropout (attention dropout 0), so "dropout on" changes nothing. The released evaluation
(``ATV_evaluate.py:269, 518-548, 1020``) feeds the generator the target's natural prompt
(not its training input), adds the vector at the last token only, and scores 3 natural × 3
answer cues ("Answer:", "The answer is", "A:"): ``tvlens adaptive evaluate --protocol
reference`` does that (:func:`tvlens.templates.atv_eval_templates`,
:meth:`~tvlens.adaptive.generator.AdaptiveGenerator.reading_prompts`); the default
``--protocol train`` reads ``query_template`` as in training, and the benchmark scores the
three training templates.

Measured on SmolLM2-135M (target and generator; CPU, 1 thread on a shared 2-core machine;
train on antonym, uppercase, present_past, country_capital; 20 test items per task and
template; unseen next_letter, first_item; mean accuracy, zero-shot / 5-shot ICL beside):

=========================  =====  ======  ========  ==========================  ========================
recipe (schedule)          steps  s/step  peak RSS  in-domain ATV (0-shot/ICL)  unseen ATV (0-shot/ICL)
=========================  =====  ======  ========  ==========================  ========================
fast (1 epoch, 32/task)    8×16   17.0    4.3 GiB   0.45 (0.00 / 0.66)          0.05 (0.05 / 0.54)
reference, shortened       24×1   8.9     4.0 GiB   0.01 (0.01 / 0.71)          0.09 (0.04 / 0.54)
(1 epoch, 6/task)
=========================  =====  ======  ========  ==========================  ========================

``python benchmarks/bench_adaptive.py --recipe fast --epochs 1 --n-per-task 32 --n-eval 20``
and ``--recipe reference --epochs 1 --n-per-task 6 --n-eval 20`` (reference: pooled over
each task's 3 natural templates). The full reference schedule here is 266 pairs × 15
epochs = 3,990 steps ≈ 10 h at that speed, so it was not run: the shortened reference
(λ = 0.001, 24 steps) is still at zero-shot, which says nothing of the full schedule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from tvlens.errors import TvlensError
from tvlens.io import versions
from tvlens.methods import ATVConfig
from tvlens.templates import ATV_QUERY_TEMPLATE

_DEFAULTS = ATVConfig()
DEFAULT_QUERY_TEMPLATE = _DEFAULTS.query_template


def check_scale(scale) -> float:
    """λ must be a finite positive number (λ ≤ 0 injects nothing or the opposite vector)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TvlensError(f"λ (scale) must be a finite number > 0, got {scale!r}; use e.g. 1.0 "
                          "(fast recipe) or 0.001 (reference)")
    if scale <= 0:
        raise TvlensError(f"λ (scale) must be > 0, got {scale!r}: 0 injects nothing and gives no "
                          "gradient, < 0 flips the vectors; use e.g. 1.0 or 0.001")
    return float(scale)


# the named presets of ATVConfig (see the module docstring for the reference's sources)
RECIPES: dict[str, dict[str, Any]] = {
    "fast": {},  # ATVConfig's defaults
    "reference": {
        "scale": 0.001, "init": "default", "position": "all", "pooling": "last",
        "hidden": "final", "query_template": ATV_QUERY_TEMPLATE, "target_template": "atv",
        "natural_templates": True, "batch_size": 1, "epochs": 15, "n_per_task": 90,
        "shuffle": False, "lr": 5e-4, "weight_decay": 1e-5,
    },
}


def recipe_config(name: str = "fast", **overrides) -> ATVConfig:
    """The :class:`~tvlens.methods.ATVConfig` of recipe ``name`` (``recipe`` recorded),
    with ``overrides`` (field values) on top."""
    if not isinstance(name, str) or name not in RECIPES:
        raise TvlensError(f"unknown ATV recipe {name!r}; use one of {', '.join(RECIPES)}")
    unknown = sorted(set(overrides) - {f.name for f in fields(ATVConfig)})
    if unknown:
        raise TvlensError(f"ATVConfig has no field(s) {', '.join(map(repr, unknown))}")
    cfg = ATVConfig(**{**RECIPES[name], "recipe": name, **overrides})
    check_scale(cfg.scale)
    return cfg


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


__all__ = ["AdaptiveConfig", "DEFAULT_QUERY_TEMPLATE", "RECIPES", "atv_settings", "check_scale",
           "recipe_config"]
