"""The TVP method's config (registered as ``"tvp"``), its presets, and the model it sizes.

:class:`TVPConfig` is a :class:`tvlens.methods.base.MethodConfig`: it round-trips through
JSON (``to_dict`` / ``from_dict``, which refuses unknown fields by name), and
``tvlens tvp train`` takes one flag per field (``n_layers`` → ``--n-layers``; ``families``
is comma-separated). :func:`build_model` makes the seeded native model a config describes
without touching the caller's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tvlens.emergence.synthetic import FAMILIES, SyntheticTask, Vocab, task_split
from tvlens.errors import TvlensError
from tvlens.methods.base import MethodConfig, register


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@register
@dataclass(frozen=True)
class TVPConfig(MethodConfig):
    """Everything that defines a run (saved with every checkpoint as ``config.json``).

    Data: ``n_values`` values, ``families``, ``n_heldout`` held-out parameters per family,
    ``n_permutations`` training permutations, ``n_pairs`` pairs per training sequence,
    ``ood_pairs`` pairs for the long-context test. Model: ``n_layers``, ``d_model``,
    ``n_heads``, ``positional`` (``"rotary"`` / ``"standard"``), ``n_ctx`` (default
    ``4·max(n_pairs, ood_pairs)``). Loss: ``tvp_layer`` ℓ and ``tvp_lambda`` λ.
    Optimisation: ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup``, ``seed``.
    Logging: evaluate every ``eval_every`` steps on ``n_eval`` prompts (0: never),
    checkpoint every ``checkpoint_every`` steps (0: only at the end).
    """

    method: ClassVar[str] = "tvp"

    n_values: int = _f(16, "values V of the synthetic vocabulary (ids 0..V-1)")
    families: tuple[str, ...] = _f(("offset",), "task families: " + ",".join(FAMILIES))
    n_heldout: int = _f(3, "held-out task parameters per family (out-of-distribution tasks)")
    n_permutations: int = _f(8, "training permutations of the permutation family")
    n_pairs: int = _f(8, "pairs K per training sequence")
    ood_pairs: int = _f(16, "pairs in the long-context test")
    n_layers: int = _f(4, "transformer layers")
    d_model: int = _f(64, "residual width")
    n_heads: int = _f(4, "attention heads")
    positional: str = _f("rotary", "positional embedding", choices=["rotary", "standard"])
    n_ctx: int | None = _f(None, "context length (None: 4·max(n_pairs, ood_pairs))")
    tvp_layer: int = _f(1, "layer ℓ whose residual the TVP loss transplants")
    tvp_lambda: float = _f(1.0, "weight λ of the TVP loss (0: the plain ICL baseline)")
    steps: int = _f(1000, "optimiser steps")
    batch_size: int = _f(64, "sequences per step")
    lr: float = _f(1e-3, "AdamW peak learning rate")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup: int = _f(50, "linear warm-up steps")
    seed: int = _f(0, "seed of the tasks, the initial weights and the data")
    eval_every: int = _f(0, "evaluate every this many steps (0: never)")
    checkpoint_every: int = _f(0, "checkpoint every this many steps (0: only at the end)")
    n_eval: int = _f(256, "prompts per evaluation")

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))

    @property
    def context(self) -> int:
        return self.n_ctx if self.n_ctx is not None else 4 * max(self.n_pairs, self.ood_pairs)

    def validate(self) -> TVPConfig:
        """Raise :class:`TvlensError` naming the first bad field and its fix."""
        if not isinstance(self.tvp_lambda, (int, float)) or not self.tvp_lambda >= 0:
            raise TvlensError(f"tvp_lambda must be >= 0 (0 turns TVP off), got {self.tvp_lambda!r}")
        if not 0 <= self.tvp_layer < self.n_layers:
            raise TvlensError(
                f"tvp_layer {self.tvp_layer} is outside the model: it has layers 0..{self.n_layers - 1}"
            )
        for f in self.families:
            if f not in FAMILIES:
                raise TvlensError(f"unknown task family {f!r}; use some of {FAMILIES}")
        if self.positional not in ("rotary", "standard"):
            raise TvlensError(f"positional must be 'rotary' or 'standard', got {self.positional!r}")
        need = 4 * max(self.n_pairs, self.ood_pairs)
        if need > self.context:
            raise TvlensError(
                f"{max(self.n_pairs, self.ood_pairs)} pairs need {need} tokens, beyond n_ctx="
                f"{self.context}; raise n_ctx or use fewer pairs"
            )
        for name in ("n_pairs", "ood_pairs", "steps", "batch_size", "n_layers", "n_eval"):
            if getattr(self, name) < 1:
                raise TvlensError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise TvlensError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        self.tasks()  # vocabulary checks
        return self

    def tasks(self) -> tuple[list[SyntheticTask], list[SyntheticTask]]:
        """(train tasks, held-out tasks) of this config."""
        return task_split(self.families, self.n_values, n_heldout=self.n_heldout,
                          n_permutations=self.n_permutations, seed=self.seed)


PRESETS: dict[str, TVPConfig] = {
    # ~20 s per arm on one shared CPU core: a pool of 5 offsets mod 8, a 3-layer model.
    "tiny": TVPConfig(n_values=8, families=("offset",), n_heldout=2, n_pairs=4, ood_pairs=8,
                      n_layers=3, d_model=32, n_heads=4, tvp_layer=1, steps=400,
                      batch_size=32, lr=3e-3, warmup=10, eval_every=100, n_eval=256),
    # 7 offsets mod 10 (2 held out), a 4-layer model, ℓ = 1; minutes on one CPU core.
    "default": TVPConfig(n_values=10, families=("offset",), n_heldout=2, n_pairs=6,
                         ood_pairs=12, n_layers=4, d_model=48, n_heads=4, tvp_layer=1,
                         steps=800, batch_size=32, lr=3e-3, warmup=20, eval_every=100,
                         n_eval=512),
}


def get_preset(name: str) -> TVPConfig:
    if name not in PRESETS:
        raise TvlensError(f"unknown preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_model(cfg: TVPConfig):
    """A fresh native model (``tvlens.tiny_model``) sized by ``cfg``, seeded by ``cfg.seed``.

    The initialisation runs inside :func:`torch.random.fork_rng` with the CPU generator
    seeded by ``cfg.seed``: the weights depend on the seed alone and the caller's global
    RNG state is the same afterwards.
    """
    from tvlens.models.loading import tiny_model

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.seed)
        return tiny_model(d_vocab=Vocab(cfg.n_values).d_vocab, n_layers=cfg.n_layers,
                          d_model=cfg.d_model, n_heads=cfg.n_heads, n_ctx=cfg.context,
                          positional=cfg.positional, seed=cfg.seed, name="tvp-synthetic")
