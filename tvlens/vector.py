"""``TaskVector``: a value that knows where it goes, how it was made, and applies itself.

A task vector is a tensor per (layer, position) pair, ``vectors[L, P, d_model]``, plus
what is needed to use and trust it: the injection ``mode`` (``"add"`` or ``"replace"``)
and ``scale``, the ``method`` and its ``hyperparameters``, the ``task``, the
:class:`~tvlens.models.ModelFingerprint` of the model it was made for, and a free-form
``history`` (training curves, indirect effects, ...).

Arithmetic composes vectors (the LTV paper adds vectors learned for two tasks):
``a + b``, ``a - b``, ``-a``, ``2 * a``, ``a / 2``. Operands must share layers,
positions, mode and model; anything but a number or a TaskVector is a ``TypeError``.

In a notebook: ``tv.select(layers=[10])`` is the sub-vector at some of its layers /
positions, ``tv.to(device, dtype)`` moves it, and ``with tv.apply(model): ...`` injects it
into any forward or ``model.generate(...)`` in the body — positions ``"last"``, ``-k`` and
``"all"`` resolved per forward from its attention mask
(:mod:`tvlens.interventions.unbound`); ``tv.apply(model, batch)`` binds it to one
left-padded batch (every position spec, ``"separator"`` and absolute indices too).

Files are safetensors (no pickle), written by :func:`tvlens.io.save_tensors`: the tensor
under ``"vectors"`` and the rest as JSON in the header's ``"tvlens"`` metadata entry,
``versions`` (tvlens, transformer-lens, transformers, torch that made it) included. The
write is atomic (a crash never leaves a half-written vector), the file gets the usual
mode, and an existing file is kept unless ``overwrite=True``. A file whose metadata has
fields this tvlens does not know (written by a newer one) is refused, naming them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.interventions.base import Intervention, hooks_applied
from tvlens.interventions.residual import Mode, ResidualEdit
from tvlens.interventions.unbound import unbound_applied
from tvlens.io import load_tensors, save_tensors, versions
from tvlens.models.loading import ModelFingerprint, fingerprint
from tvlens.prompts import Position, PromptBatch

FORMAT_VERSION = 1
META_KEY = "tvlens"
# metadata fields this tvlens reads (anything else was written by a newer one)
META_FIELDS = ("format_version", "layers", "positions", "mode", "scale", "method",
               "hyperparameters", "task", "model", "history", "versions")


@dataclass(frozen=True, eq=False)
class TaskVector(Intervention):
    """Vectors per (layer, position) with their provenance. See the module docstring.

    Attributes:
        vectors: ``[L, P, d_model]`` (``[batch, L, P, d_model]`` for per-query vectors).
        layers: the ``L`` layers ("after block l", ``blocks.{l}.hook_resid_post``).
        positions: the ``P`` position specs (see :mod:`tvlens.prompts`).
        mode, scale: how it is injected.
        model: fingerprint of the model it was made for.
        method, hyperparameters, task, history: provenance.
        versions: the versions of tvlens, transformer-lens, transformers and torch that
            made it (:func:`tvlens.io.versions`; ``{}`` for files older than the field).
    """

    vectors: Float[Tensor, "... layer pos d_model"]
    layers: tuple[int, ...]
    positions: tuple[Position, ...]
    model: ModelFingerprint
    mode: Mode = "add"
    scale: float = 1.0
    method: str = "custom"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    history: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "positions", tuple(self.positions))
        v = self.vectors
        if v.ndim not in (3, 4) or tuple(v.shape[-3:-1]) != (len(self.layers), len(self.positions)):
            raise TvlensError(
                f"vectors of shape {tuple(v.shape)} do not match {len(self.layers)} layer(s) "
                f"× {len(self.positions)} position(s)"
            )
        if v.shape[-1] != self.model.d_model:
            raise TvlensError(
                f"vectors have width {v.shape[-1]} but model {self.model.name!r} has d_model "
                f"{self.model.d_model}"
            )

    # ----- constructors -------------------------------------------------------------
    @classmethod
    def single(cls, model, vector: Float[Tensor, " d_model"], layer: int,
               position: Position = "last", **kwargs) -> TaskVector:
        """One vector at one (layer, position)."""
        return cls(vector.reshape(1, 1, -1), (layer,), (position,), fingerprint(model), **kwargs)

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def per_example(self) -> bool:
        return self.vectors.ndim == 4

    def at(self, layer: int, position: Position | None = None) -> Float[Tensor, " d_model"]:
        """The vector at ``layer`` (and ``position``; default: the only one)."""
        if layer not in self.layers:
            raise TvlensError(f"this vector has layers {self.layers}, not {layer}")
        if position is None:
            if len(self.positions) != 1:
                raise TvlensError(f"this vector has positions {self.positions}; name one")
            position = self.positions[0]
        if position not in self.positions:
            raise TvlensError(f"this vector has positions {self.positions}, not {position!r}")
        return self.vectors[..., self.layers.index(layer), self.positions.index(position), :]

    def select(self, layers: int | Sequence[int] | None = None,
               positions: Position | Sequence[Position] | None = None) -> TaskVector:
        """The sub-vector at ``layers`` × ``positions`` (None: all of them), in the order given.

        ``vectors[..., L', P', :]`` with ``L'``, ``P'`` the indices of the chosen layers and
        positions; every other field is kept. Raises :class:`TvlensError` naming a layer or
        position this vector does not have, or one listed twice.
        """
        layer_list = self.layers if layers is None else _as_tuple(layers, int)
        pos_list = self.positions if positions is None else _as_tuple(positions, (int, str))
        for what, chosen, have in (("layer", layer_list, self.layers),
                                   ("position", pos_list, self.positions)):
            missing = [c for c in chosen if c not in have]
            if missing:
                raise TvlensError(f"this vector has {what}s {have}, not {', '.join(map(repr, missing))}")
            if len(set(chosen)) != len(chosen) or not chosen:
                raise TvlensError(f"select {what}s {tuple(chosen)}: name each {what} once, at least one")
        li = torch.tensor([self.layers.index(x) for x in layer_list], device=self.vectors.device)
        pi = torch.tensor([self.positions.index(x) for x in pos_list], device=self.vectors.device)
        vectors = self.vectors.index_select(-3, li).index_select(-2, pi)
        return replace(self, vectors=vectors, layers=tuple(layer_list), positions=tuple(pos_list))

    def for_rows(self, rows: Sequence[int]) -> TaskVector:
        """Per-example vectors of ``rows`` only (a shared vector: itself); the runner cuts a
        per-example vector to each chunk with it."""
        if not self.per_example:
            return self
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.vectors.device)
        return replace(self, vectors=self.vectors[idx])

    def to(self, device=None, dtype=None) -> TaskVector:
        """The same vector with its tensor on ``device`` and / or in ``dtype``."""
        return replace(self, vectors=self.vectors.to(device=device, dtype=dtype))

    # ----- applying -----------------------------------------------------------------
    def check_model(self, model) -> None:
        """Refuse a model whose fingerprint differs from the one this vector was made for."""
        theirs = fingerprint(model)
        if theirs != self.model:
            raise TvlensError(
                f"this vector was made for {self.model.describe()}, not for "
                f"{theirs.describe()}; load or make a vector for this model"
            )

    @property
    def made_for(self) -> ModelFingerprint:
        return self.model

    @property
    def template(self) -> str | None:
        """The prompt format this vector was made with (None: it does not say)."""
        return self.hyperparameters.get("template")

    def describe(self) -> str:
        return f"TaskVector({self.method}, layers {self.layers}, positions {self.positions})"

    def replaced_sites(self) -> set:
        return self.spec().replaced_sites()

    @property
    def last_token_only(self) -> bool:
        return self.spec().last_token_only

    def spec(self, *, scale: float | None = None) -> ResidualEdit:
        return ResidualEdit(self.layers, self.positions, self.vectors, self.mode,
                            self.scale if scale is None else scale)

    def hooks(self, model, batch: PromptBatch, *, scale: float | None = None):
        """``fwd_hooks`` injecting this vector into forwards over ``batch``."""
        self.check_model(model)
        return self.spec(scale=scale).hooks(model, batch)

    @contextmanager
    def apply(self, model, batch: PromptBatch | None = None, *, scale: float | None = None):
        """Context manager: forwards in the body carry this vector; every hook is removed on exit.

        With ``batch``: forwards over that left-padded batch (any position spec). Without:
        any forward or ``model.generate(...)``, positions ``"last"``, ``-k`` and ``"all"``
        resolved per forward from its attention mask (:mod:`tvlens.interventions.unbound`);
        absolute positions and ``"separator"`` raise a :class:`TvlensError` asking for the batch.
        """
        if batch is None:
            self.check_model(model)
            with unbound_applied(model, self.spec(scale=scale)):
                yield model
            return
        with hooks_applied(model, self.hooks(model, batch, scale=scale)):
            yield model

    # ----- arithmetic ---------------------------------------------------------------
    def _check_compatible(self, other: TaskVector) -> None:
        for attr in ("layers", "positions", "mode", "model"):
            if getattr(self, attr) != getattr(other, attr):
                raise TvlensError(
                    f"cannot combine vectors with different {attr}: "
                    f"{getattr(self, attr)!r} vs {getattr(other, attr)!r}"
                )

    def _combined(self, vectors: Tensor, how: str, other: TaskVector | None = None) -> TaskVector:
        parts = [self.method] if other is None else [self.method, other.method]
        tasks = [t for t in (self.task, other.task if other else None) if t]
        return replace(self, vectors=vectors, method=how, task="+".join(tasks) or None,
                       hyperparameters={"operands": parts}, history={}, versions=versions())

    def __add__(self, other):
        if not isinstance(other, TaskVector):
            return Intervention.__add__(self, other)  # vector + ablation: a composition
        self._check_compatible(other)
        return self._combined(self.vectors + other.vectors, "sum", other)

    def __sub__(self, other):
        if not isinstance(other, TaskVector):
            return NotImplemented
        self._check_compatible(other)
        return self._combined(self.vectors - other.vectors, "difference", other)

    def __neg__(self):
        return self._combined(-self.vectors, "negation")

    def __mul__(self, k):
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            return NotImplemented
        return self._combined(self.vectors * k, f"scaled({k})")

    __rmul__ = __mul__

    def __truediv__(self, k):
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            return NotImplemented
        if k == 0:
            raise ZeroDivisionError("division of a task vector by zero")
        return self._combined(self.vectors / k, f"scaled({1 / k})")

    def __repr__(self) -> str:
        return (f"TaskVector(method={self.method!r}, task={self.task!r}, layers={self.layers}, "
                f"positions={self.positions}, mode={self.mode!r}, scale={self.scale}, "
                f"shape={tuple(self.vectors.shape)}, model={self.model.name!r})")

    # ----- files --------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "mode": self.mode,
            "scale": self.scale,
            "method": self.method,
            "hyperparameters": self.hyperparameters,
            "task": self.task,
            "model": self.model.to_dict(),
            "history": self.history,
            "versions": self.versions,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the vector to ``path`` (``.safetensors``) atomically; see the module docstring."""
        return save_tensors(path, {"vectors": self.vectors}, self.metadata(), key=META_KEY,
                            overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path, model=None, *, device=None) -> TaskVector:
        """Read a vector file; with ``model``, refuse it unless it was made for that model."""
        tensors, data = load_tensors(path, key=META_KEY, what="tvlens vector file")
        if "vectors" not in tensors or not isinstance(data, dict):
            raise TvlensError(f"{str(path)!r} is a safetensors file but not a tvlens vector")
        unknown = sorted(set(data) - set(META_FIELDS))
        if unknown or int(data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            made_by = data.get("versions", {}).get("tvlens", "a newer version")
            what = (f"field(s) {', '.join(map(repr, unknown))}" if unknown
                    else f"format version {data['format_version']}")
            raise TvlensError(
                f"{str(path)!r} has {what} that this tvlens ({versions()['tvlens']}) does not "
                f"know: it was written by tvlens {made_by}; upgrade tvlens to read it")
        vectors = tensors["vectors"]
        try:
            tv = cls(
                vectors=vectors if device is None else vectors.to(device),
                layers=tuple(data["layers"]),
                positions=tuple(data["positions"]),
                model=ModelFingerprint.from_dict(data["model"]),
                mode=data["mode"],
                scale=float(data["scale"]),
                method=data["method"],
                hyperparameters=data.get("hyperparameters", {}),
                task=data.get("task"),
                history=data.get("history", {}),
                versions=data.get("versions", {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TvlensError(f"{str(path)!r} has malformed tvlens metadata: {err!r}") from None
        if model is not None:
            tv.check_model(model)
            tv = replace(tv, vectors=tv.vectors.to(model.cfg.device))
        return tv


def _as_tuple(value, kinds) -> tuple:
    """One value or a sequence of them → a tuple."""
    if isinstance(value, kinds) and not isinstance(value, bool):
        return (value,)
    return tuple(value)
