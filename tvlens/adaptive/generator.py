"""Adaptive task vectors (ATV): a generator that writes one task vector per query.

A small model reads the query ``q`` (template ``"Q: {x}\\nA:"``) and returns
``e(q) ∈ R^{d_gen}`` (see :mod:`tvlens.adaptive.encoders`). One linear expansion maps it
to a vector per target layer::

    V(q) = reshape(W e(q) + b)  ∈ R^{L × d_model},      W ∈ R^{(L·d_model) × d_gen}
    low rank (rank r):  V(q) = reshape(B (A e(q)) + b),  A ∈ R^{r × d_gen}, B ∈ R^{(L·d_model) × r}

and each target layer ``l_i`` gets ``λ · V(q)_i`` **added** to its output
(``blocks.{l_i}.hook_resid_post``) at

- ``position="last"``: the query's last token (the ATV paper's text), or
- ``position="all"``: every token, answer tokens included (the released ATV code).

Parameters of the expansion: ``d_gen·L·d_model + L·d_model`` (full) or
``d_gen·r + r·L·d_model + L·d_model`` (low rank) — :func:`expansion_parameter_count`.

Injection goes through :mod:`tvlens.injection` only: per batch, an
``InjectionSpec(layers, (position,), vectors=[batch, L, 1, d_model], mode="add", scale=λ)``.
Gradients flow through the spec into the expansion and the encoder. Because the
generator has ``hooks(model, batch)``, ``tvlens.evaluate(model, task, vector=gen,
template=gen.config.target_template)`` scores it; :meth:`AdaptiveGenerator.task_vector`
returns the vector of each query as a :class:`~tvlens.vector.TaskVector`.

Reference: Kang et al., "Adaptive Task Vectors for Large Language Models" (2025).
The released code uses λ = 0.001 on Llama-3-8B's raw hidden states with the default
(random) init of the expansion; tvlens defaults to λ = 1 on the normalized hidden state
with a zero-initialised expansion (training starts exactly at the zero-shot model): at the
paper's lr 5e-4, 40 Adam steps lift SmolLM2-135M from ≈ 0 zero-shot to 0.35–0.40 in-domain
accuracy (docs/results/adaptive.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tvlens.errors import TvlensError
from tvlens.injection import InjectionSpec, check_layer, injection_hooks
from tvlens.models.loading import ModelFingerprint, fingerprint
from tvlens.prompts import PromptBatch

from tvlens.adaptive.encoders import POOLINGS, BridgeEncoder, build_encoder

POSITIONS = ("last", "all")
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_QUERY_TEMPLATE = "Q: {x}\nA:"


def check_scale(scale) -> float:
    """λ must be a finite non-zero number (λ = 0 would inject nothing and learn nothing)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TvlensError(f"λ (scale) must be a finite number, got {scale!r}")
    if scale == 0:
        raise TvlensError("λ (scale) = 0 injects nothing and gives no gradient; use e.g. 1.0")
    return float(scale)


@dataclass(frozen=True)
class AdaptiveConfig:
    """How an adaptive generator was built; saved as ``config.json`` next to its weights.

    Attributes:
        encoder: JSON spec rebuilding the encoder (see :func:`build_encoder`).
        layers: target layers receiving a vector.
        position: ``"last"`` or ``"all"``.
        scale: λ.
        rank: low-rank bottleneck of the expansion (``None``: full).
        pooling: ``"last"`` or ``"mean"``.
        query_template: how the generator reads a query (must contain ``{x}``).
        target_template: the template of the target's prompts (a tvlens template name or
            demo string); pass it to ``evaluate``.
        target: fingerprint of the target model.
    """

    encoder: dict[str, Any]
    layers: tuple[int, ...]
    target: dict[str, Any]
    position: str = "last"
    scale: float = 1.0
    rank: int | None = None
    pooling: str = "last"
    query_template: str = DEFAULT_QUERY_TEMPLATE
    target_template: str = "qa"
    history: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


class Expansion(nn.Module):
    """``R^{d_gen} → R^{L × d_model}``, full or through a rank-``r`` bottleneck."""

    def __init__(self, d_gen: int, n_layers: int, d_model: int, rank: int | None = None,
                 init: str = "zeros"):
        super().__init__()
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise TvlensError(f"rank must be a positive integer or None, got {rank!r}")
        self.n_layers, self.d_model = n_layers, d_model
        out = n_layers * d_model
        self.down = None if rank is None else nn.Linear(d_gen, rank, bias=False)
        self.up = nn.Linear(d_gen if rank is None else rank, out, bias=True)
        if init == "zeros":  # V(q) = 0 at step 0: training starts from the zero-shot model
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        elif init != "default":
            raise TvlensError(f"unknown init {init!r}; use 'zeros' or 'default'")

    def forward(self, e: Float[Tensor, "batch d_gen"]) -> Float[Tensor, "batch layer d_model"]:
        h = e if self.down is None else self.down(e)
        return self.up(h).reshape(e.shape[0], self.n_layers, self.d_model)


def expansion_parameter_count(d_gen: int, n_layers: int, d_model: int, rank: int | None = None) -> int:
    """``d_gen·L·d + L·d`` (full) or ``d_gen·r + r·L·d + L·d`` (rank ``r``)."""
    out = n_layers * d_model
    return d_gen * out + out if rank is None else d_gen * rank + rank * out + out


class AdaptiveGenerator(nn.Module):
    """Encoder + expansion: query strings → per-layer vectors for one target model."""

    method = "atv"

    def __init__(self, encoder: nn.Module, config: AdaptiveConfig, init: str = "zeros"):
        super().__init__()
        if config.position not in POSITIONS:
            raise TvlensError(f"unknown position {config.position!r}; use one of {POSITIONS}")
        if config.pooling not in POOLINGS:
            raise TvlensError(f"unknown pooling {config.pooling!r}; use one of {POOLINGS}")
        if "{x}" not in config.query_template:
            raise TvlensError(f"query template {config.query_template!r} must contain {{x}}")
        check_scale(config.scale)
        self.encoder = encoder
        self.config = config
        fp = ModelFingerprint.from_dict(config.target)
        self.expansion = Expansion(encoder.d_gen, len(config.layers), fp.d_model, config.rank, init)

    # ----- generating -------------------------------------------------------------
    @property
    def target(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.config.target)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.config.layers)

    @property
    def scale(self) -> float:
        return float(self.config.scale)

    def queries(self, xs: list[str]) -> list[str]:
        return [self.config.query_template.replace("{x}", x) for x in xs]

    def generate(self, xs: list[str]) -> Float[Tensor, "batch layer d_model"]:
        """``V(q)`` for each query input ``x`` (unscaled; the injection multiplies by λ)."""
        if len(xs) == 0:
            raise TvlensError("no queries to generate vectors for")
        return self.expansion(self.encoder.encode(self.queries(list(xs))).float())

    def spec(self, xs: list[str], *, scale: float | None = None) -> InjectionSpec:
        v = self.generate(xs).unsqueeze(2)  # [B, L, 1, d_model]
        return InjectionSpec(self.layers, (self.config.position,), v, "add",
                             self.scale if scale is None else check_scale(scale))

    def check_model(self, model) -> None:
        theirs = fingerprint(model)
        if theirs != self.target:
            raise TvlensError(
                f"this generator was trained for {self.target.describe()}, not for "
                f"{theirs.describe()}; train a generator for this model"
            )

    def hooks(self, model, batch: PromptBatch, *, scale: float | None = None):
        """``fwd_hooks`` adding each example's own ``λ·V(x_b)`` to ``batch`` (``evaluate`` calls this)."""
        self.check_model(model)
        return injection_hooks(model, batch, self.spec([e.x for e in batch.examples], scale=scale))

    def scaled(self, scale: float) -> ScaledGenerator:
        """A view injecting with λ = ``scale`` (for λ sweeps); shares the weights."""
        return ScaledGenerator(self, check_scale(scale))

    @torch.no_grad()
    def task_vector(self, xs: str | list[str], *, task: str | None = None):
        """The generated vector(s) as a :class:`TaskVector`: ``[L, 1, d]`` for one query
        string, ``[batch, L, 1, d]`` for a list (add mode, scale λ)."""
        from tvlens.vector import TaskVector

        single = isinstance(xs, str)
        v = self.generate([xs] if single else list(xs)).unsqueeze(2)
        return TaskVector(v[0] if single else v, self.layers, (self.config.position,), self.target,
                          mode="add", scale=self.scale, method="atv", task=task,
                          hyperparameters={"queries": [xs] if single else list(xs),
                                           "encoder": self.config.encoder.get("kind")})

    # ----- parameters and files ------------------------------------------------------
    def expansion_parameters(self) -> int:
        return sum(p.numel() for p in self.expansion.parameters())

    def _named_tensors(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().contiguous().clone() for n, p in self.named_parameters()}

    def save(self, folder: str | Path, *, history: dict | None = None) -> Path:
        """Write ``generator.safetensors`` (encoder + expansion) and ``config.json`` into ``folder``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise TvlensError(f"{str(folder)!r} is a file; give a folder to save the generator in")
        if not folder.parent.exists():
            raise TvlensError(f"folder {str(folder.parent)!r} does not exist; create it first")
        folder.mkdir(exist_ok=True)
        cfg = self.config if history is None else replace(self.config, history=history)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(self._named_tensors(), str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
        return folder

    def load_weights(self, tensors: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise TvlensError(f"generator weights lack {len(missing)} tensors (e.g. {missing[0]!r}); "
                              "the file does not match this generator's config")
        with torch.no_grad():
            for n, p in params.items():
                if tuple(tensors[n].shape) != tuple(p.shape):
                    raise TvlensError(f"weight {n!r} has shape {tuple(tensors[n].shape)}, "
                                      f"expected {tuple(p.shape)}")
                p.copy_(tensors[n].to(p.device, p.dtype))

    @classmethod
    def load(cls, folder: str | Path, target) -> AdaptiveGenerator:
        """Rebuild a saved generator for ``target``; refuse one trained for another model."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise TvlensError(f"{str(folder)!r} holds no saved generator ({CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}); train one with `tvlens adaptive train`")
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
            data["layers"] = tuple(data["layers"])
            config = AdaptiveConfig(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise TvlensError(f"{str(cfg_path)!r} is not a valid generator config: {err}") from None
        saved = ModelFingerprint.from_dict(config.target)
        if fingerprint(target) != saved:
            raise TvlensError(
                f"the generator in {str(folder)!r} was trained for {saved.describe()}, not for "
                f"{fingerprint(target).describe()}; load it with that model or train a new one"
            )
        encoder = build_encoder(config.encoder, config.pooling, device=target.cfg.device)
        gen = cls(encoder, config).to(target.cfg.device)
        gen.load_weights(load_file(str(w_path)))
        return gen


class ScaledGenerator:
    """``gen`` injected with another λ (what :meth:`AdaptiveGenerator.scaled` returns)."""

    method = "atv"

    def __init__(self, gen: AdaptiveGenerator, scale: float):
        self.gen, self.scale = gen, scale

    def hooks(self, model, batch: PromptBatch):
        return self.gen.hooks(model, batch, scale=self.scale)


def make_generator(
    target,
    generator="native",
    *,
    layers=None,
    position: str = "last",
    scale: float = 1.0,
    rank: int | None = None,
    pooling: str = "last",
    query_template: str = DEFAULT_QUERY_TEMPLATE,
    target_template: str = "qa",
    init: str = "zeros",
    texts: list[str] | None = None,
    native: dict | None = None,
    seed: int = 0,
) -> AdaptiveGenerator:
    """Build an untrained generator for ``target``.

    Args:
        generator: ``"native"`` (a tiny LM over ``texts``, shaped by ``native`` kwargs of
            ``tiny_model``), ``"minilm"``, or a model name for ``load_model`` (e.g.
            ``"smollm2-135m"``: a separate copy, so the target stays frozen).
        layers: target layers (default: all of them).
        texts: for ``"native"``: strings its word tokenizer must cover (the queries).
        seed: seeds the native encoder's and the expansion's initialisation.
    """
    if generator is target:
        raise TvlensError("the generator must be a separate model from the frozen target; "
                          "pass a model name so a copy is loaded")
    n = int(target.cfg.n_layers)
    layers = tuple(range(n)) if layers is None else tuple(int(x) for x in layers)
    if not layers:
        raise TvlensError("no target layers; give at least one (default: all layers)")
    for layer in layers:
        check_layer(target, layer, what="target layer")
    device = target.cfg.device
    torch.manual_seed(seed)
    if generator == "native":
        if not texts:
            raise TvlensError("a native generator needs texts=[...] (the queries it will read)")
        kwargs = {"n_layers": 2, "d_model": 64, "n_heads": 4, "seed": seed, **(native or {})}
        spec = {"kind": "native", "texts": sorted({query_template.replace("{x}", t) for t in texts}),
                "kwargs": kwargs}
    elif generator == "minilm":
        spec = {"kind": "minilm"}
    elif isinstance(generator, str):
        spec = {"kind": "bridge", "name": generator}
    else:
        raise TvlensError(f"generator must be 'native', 'minilm' or a model name, got {generator!r}")
    encoder = build_encoder(spec, pooling, device=device)
    config = AdaptiveConfig(encoder=spec, layers=layers, target=fingerprint(target).to_dict(),
                            position=position, scale=check_scale(scale), rank=rank, pooling=pooling,
                            query_template=query_template, target_template=target_template)
    torch.manual_seed(seed)
    return AdaptiveGenerator(encoder, config, init=init).to(device)


__all__ = ["AdaptiveConfig", "AdaptiveGenerator", "BridgeEncoder", "Expansion", "ScaledGenerator",
           "check_scale", "expansion_parameter_count", "make_generator"]
