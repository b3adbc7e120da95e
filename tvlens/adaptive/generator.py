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

The generator is an intervention (:mod:`tvlens.interventions`): per batch, its hooks are
a ``ResidualEdit(layers, (position,), vectors=[batch, L, 1, d_model], mode="add",
scale=λ)``. Gradients flow through it into the expansion and the encoder.
``tvlens.evaluate(model, task, vector=gen)`` scores it on prompts in ``gen.template``
(the target's format); :meth:`AdaptiveGenerator.task_vector` returns each query's vector
as a :class:`~tvlens.vector.TaskVector`. Settings come from :class:`~tvlens.methods.ATVConfig`.

Reference: Kang et al., "Adaptive Task Vectors for Large Language Models" (2025).
The released code uses λ = 0.001 on Llama-3-8B with the default (random) init of the
expansion, at every position of every layer — ``recipe_config("reference")`` follows it
rule by rule (:mod:`tvlens.adaptive.config`). tvlens's ``"fast"`` recipe (the default)
uses λ = 1 on the normalized hidden state with a zero-initialised expansion (training
starts exactly at the zero-shot model), the last token and one template.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tvlens.errors import TvlensError
from tvlens.interventions import Intervention, ResidualEdit, check_layer
from tvlens.io import load_tensors, read_json, save_tensors, write_json
from tvlens.methods import ATVConfig
from tvlens.models.loading import ModelFingerprint, fingerprint
from tvlens.prompts import PromptBatch

from tvlens.adaptive.config import (DEFAULT_QUERY_TEMPLATE, AdaptiveConfig,  # noqa: F401
                                    atv_settings, check_scale)
from tvlens.adaptive.encoders import POOLINGS, BridgeEncoder, build_encoder

POSITIONS = ("last", "all")
WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_KEY = "tvlens_atv"  # the config, as JSON, in the weights file's header too
_DEFAULTS = ATVConfig()


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


class AdaptiveGenerator(nn.Module, Intervention):
    """Encoder + expansion: query strings → per-layer vectors for one target model.

    An intervention (``hooks(model, batch)``): ``evaluate(model, task, vector=gen)``
    writes the prompts in ``gen.template`` and composes with others (``gen + patch``).
    """

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
    def made_for(self) -> ModelFingerprint:
        """The target model's fingerprint (composition checks read it)."""
        return self.target

    @property
    def template(self) -> str:
        """The target's prompt format (``evaluate`` uses it unless told otherwise)."""
        return self.config.target_template

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
        return self.generate_texts(self.queries(list(xs)))

    def generate_texts(self, texts: list[str]) -> Float[Tensor, "batch layer d_model"]:
        """``V(t)`` for texts the generator reads as they are (no ``query_template``)."""
        if len(texts) == 0:
            raise TvlensError("no queries to generate vectors for")
        return self.expansion(self.encoder.encode(list(texts)).float())

    def reading_prompts(self, *, position: str = "last", scale: float | None = None) -> PromptReading:
        """This generator as the released ATV evaluation applies it: it reads each target
        prompt itself (the natural template with its answer cue, ``ATV_evaluate.py:545``)
        rather than ``query_template(x)``, and adds ``λ·V`` at ``position`` (the released
        evaluation: the last token, ``idx=-1``, :555)."""
        return PromptReading(self, position, self.scale if scale is None else check_scale(scale))

    def spec(self, xs: list[str], *, scale: float | None = None) -> ResidualEdit:
        return self.edit(self.generate(xs), scale=scale)

    def edit(self, v: Float[Tensor, "batch layer d_model"], *, position: str | None = None,
             scale: float | None = None) -> ResidualEdit:
        """The write of generated vectors ``v``: added at every target layer, at ``position``
        (default: the config's), times λ (default: the trained one)."""
        return ResidualEdit(self.layers, (position or self.config.position,), v.unsqueeze(2), "add",
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
        return self.spec([e.x for e in batch.examples], scale=scale).hooks(model, batch)

    def scaled(self, scale: float) -> ScaledGenerator:
        """A view injecting with λ = ``scale`` (for λ sweeps); shares the weights."""
        return ScaledGenerator(self, check_scale(scale))

    @torch.no_grad()
    def task_vector(self, xs: str | list[str], *, task: str | None = None):
        """The generated vector(s) as a :class:`TaskVector`: ``[L, 1, d]`` for one query
        string, ``[batch, L, 1, d]`` for a list (add mode, scale λ; its ``template`` is
        the target's format)."""
        from tvlens.vector import TaskVector

        single = isinstance(xs, str)
        v = self.generate([xs] if single else list(xs)).unsqueeze(2)
        return TaskVector(v[0] if single else v, self.layers, (self.config.position,), self.target,
                          mode="add", scale=self.scale, method="atv", task=task,
                          hyperparameters={**self.config.settings.to_dict(), "template": self.template,
                                           "queries": [xs] if single else list(xs),
                                           "encoder": self.config.encoder.get("kind")})

    # ----- parameters and files ------------------------------------------------------
    def expansion_parameters(self) -> int:
        return sum(p.numel() for p in self.expansion.parameters())

    def _named_tensors(self) -> dict[str, Tensor]:
        return {n: p.detach().cpu().contiguous().clone() for n, p in self.named_parameters()}

    def save(self, folder: str | Path, *, history: dict | None = None) -> Path:
        """Write ``generator.safetensors`` (encoder + expansion, with the config in its
        header) and ``config.json`` into ``folder``, each atomically (:mod:`tvlens.io`)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise TvlensError(f"{str(folder)!r} is a file; give a folder to save the generator in")
        if not folder.parent.exists():
            raise TvlensError(f"folder {str(folder.parent)!r} does not exist; create it first")
        folder.mkdir(exist_ok=True)
        cfg = self.config if history is None else replace(self.config, history=history)
        save_tensors(folder / WEIGHTS_FILE, self._named_tensors(), {"config": cfg.to_dict()},
                     key=WEIGHTS_KEY)
        write_json(folder / CONFIG_FILE, cfg.to_dict())
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
        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise TvlensError(f"{str(folder)!r} holds no saved generator ({CONFIG_FILE} and "
                              f"{WEIGHTS_FILE}); train one with `tvlens adaptive train`")
        data = read_json(cfg_path, what="generator config")
        try:
            config = AdaptiveConfig.from_dict(data)
        except (TvlensError, TypeError) as err:
            raise TvlensError(f"{str(cfg_path)!r} is not a valid generator config: {err}") from None
        tensors, meta = load_tensors(w_path, key=WEIGHTS_KEY, what="tvlens ATV generator")
        if meta.get("config") != data:
            raise TvlensError(f"{WEIGHTS_FILE} and {CONFIG_FILE} in {str(folder)!r} come from "
                              "different saves (an interrupted save?); save the generator again")
        saved = ModelFingerprint.from_dict(config.target)
        if fingerprint(target) != saved:
            raise TvlensError(
                f"the generator in {str(folder)!r} was trained for {saved.describe()}, not for "
                f"{fingerprint(target).describe()}; load it with that model or train a new one"
            )
        encoder = build_encoder(config.encoder, config.pooling, device=target.cfg.device,
                                hidden=config.hidden)
        gen = cls(encoder, config).to(target.cfg.device)
        gen.load_weights(tensors)
        return gen


class ScaledGenerator(Intervention):
    """``gen`` injected with another λ (what :meth:`AdaptiveGenerator.scaled` returns)."""

    method = "atv"

    def __init__(self, gen: AdaptiveGenerator, scale: float):
        self.gen, self.scale = gen, scale

    @property
    def made_for(self) -> ModelFingerprint:
        return self.gen.made_for

    @property
    def template(self) -> str:
        return self.gen.template

    def hooks(self, model, batch: PromptBatch):
        return self.gen.hooks(model, batch, scale=self.scale)


class PromptReading(ScaledGenerator):
    """``gen`` reading each row's whole prompt text (:meth:`AdaptiveGenerator.reading_prompts`)."""

    def __init__(self, gen: AdaptiveGenerator, position: str, scale: float):
        if position not in POSITIONS:
            raise TvlensError(f"unknown position {position!r}; use one of {POSITIONS}")
        super().__init__(gen, scale)
        self.position = position

    @property
    def last_token_only(self) -> bool:
        return self.position == "last"

    def describe(self) -> str:
        return f"ATV reading the prompts (position {self.position}, λ {self.scale:g})"

    def hooks(self, model, batch: PromptBatch):
        self.gen.check_model(model)
        v = self.gen.generate_texts(list(batch.prompts))
        return self.gen.edit(v, position=self.position, scale=self.scale).hooks(model, batch)


def _rng_fork(device):
    """``torch.random.fork_rng`` over the CPU and ``device``'s generator: seeding inside
    leaves the caller's global RNG state as it was."""
    dev = torch.device(device)
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def make_generator(
    target,
    generator="native",
    *,
    config: ATVConfig | None = None,
    layers=None,
    position: str = _DEFAULTS.position,
    scale: float = _DEFAULTS.scale,
    rank: int | None = _DEFAULTS.rank,
    pooling: str = _DEFAULTS.pooling,
    query_template: str = _DEFAULTS.query_template,
    target_template: str = _DEFAULTS.target_template,
    init: str = _DEFAULTS.init,
    texts: list[str] | None = None,
    native: dict | None = None,
    seed: int = _DEFAULTS.seed,
) -> AdaptiveGenerator:
    """Build an untrained generator for ``target``.

    Args:
        generator: ``"native"`` (a tiny LM over ``texts``, shaped by ``native`` kwargs of
            ``tiny_model``), ``"minilm"``, or a model name for ``load_model`` (e.g.
            ``"smollm2-135m"``: a separate copy, so the target stays frozen).
        config: the settings as an :class:`~tvlens.methods.ATVConfig`; the keywords below
            that differ from their defaults override it.
        layers: target layers (default: all of them).
        texts: for ``"native"``: strings its word tokenizer must cover (the queries).
        seed: seeds the native encoder's and the expansion's initialisation (in a forked
            RNG: the caller's global RNG state is left as it was).
    """
    if generator is target:
        raise TvlensError("the generator must be a separate model from the frozen target; "
                          "pass a model name so a copy is loaded")
    cfg = atv_settings(config, position=position, scale=scale, rank=rank, pooling=pooling,
                       query_template=query_template, target_template=target_template,
                       init=init, seed=seed)
    check_scale(cfg.scale)
    n = int(target.cfg.n_layers)
    layers = tuple(range(n)) if layers is None else tuple(int(x) for x in layers)
    if not layers:
        raise TvlensError("no target layers; give at least one (default: all layers)")
    for layer in layers:
        check_layer(target, layer, what="target layer")
    device = target.cfg.device
    if generator == "native":
        if not texts:
            raise TvlensError("a native generator needs texts=[...] (the queries it will read)")
        kwargs = {"n_layers": 2, "d_model": 64, "n_heads": 4, "seed": cfg.seed, **(native or {})}
        spec = {"kind": "native",
                "texts": sorted({cfg.query_template.replace("{x}", t) for t in texts}),
                "kwargs": kwargs}
    elif generator == "minilm":
        spec = {"kind": "minilm"}
    elif isinstance(generator, str):
        spec = {"kind": "bridge", "name": generator}
    else:
        raise TvlensError(f"generator must be 'native', 'minilm' or a model name, got {generator!r}")
    config = AdaptiveConfig(encoder=spec, layers=layers, target=fingerprint(target).to_dict(),
                            settings=cfg.replace(scale=float(cfg.scale)))
    with _rng_fork(device):
        torch.manual_seed(cfg.seed)
        encoder = build_encoder(spec, cfg.pooling, device=device, hidden=cfg.hidden)
        torch.manual_seed(cfg.seed)
        return AdaptiveGenerator(encoder, config, init=cfg.init).to(device)


__all__ = ["AdaptiveConfig", "AdaptiveGenerator", "BridgeEncoder", "Expansion", "ScaledGenerator",
           "atv_settings", "check_scale", "expansion_parameter_count", "make_generator"]
