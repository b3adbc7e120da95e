"""``TaskVector``: a value that knows where it goes, how it was made, and applies itself.

A task vector is a tensor per (layer, position) pair, ``vectors[L, P, d_model]``, plus
what is needed to use and trust it: the injection ``mode`` (``"add"`` or ``"replace"``)
and ``scale``, the ``method`` and its ``hyperparameters``, the ``task``, the
:class:`~tvlens.models.ModelFingerprint` of the model it was made for, and a free-form
``history`` (training curves, indirect effects, ...).

Arithmetic composes vectors (the LTV paper adds vectors learned for two tasks):
``a + b``, ``a - b``, ``-a``, ``2 * a``, ``a / 2``. Operands must share layers,
positions, mode and model; anything but a number or a TaskVector is a ``TypeError``.

Files are safetensors (no pickle): the tensor under ``"vectors"`` and the rest as JSON
in the header's ``"tvlens"`` metadata entry. Writes go to a temporary file in the same
folder, then ``os.replace`` — a crash never leaves a half-written vector, and an
existing file is kept unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
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
from tvlens.models.loading import ModelFingerprint, fingerprint
from tvlens.prompts import Position, PromptBatch

FORMAT_VERSION = 1


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

    def spec(self, *, scale: float | None = None) -> ResidualEdit:
        return ResidualEdit(self.layers, self.positions, self.vectors, self.mode,
                            self.scale if scale is None else scale)

    def hooks(self, model, batch: PromptBatch, *, scale: float | None = None):
        """``fwd_hooks`` injecting this vector into forwards over ``batch``."""
        self.check_model(model)
        return self.spec(scale=scale).hooks(model, batch)

    @contextmanager
    def apply(self, model, batch: PromptBatch, *, scale: float | None = None):
        """Context manager: forwards over ``batch`` in the body carry this vector."""
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
                       hyperparameters={"operands": parts}, history={})

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
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the vector to ``path`` (``.safetensors``) atomically; see the module docstring."""
        from safetensors.torch import save_file

        path = Path(path)
        if not path.parent.exists():
            raise TvlensError(f"folder {str(path.parent)!r} does not exist; create it first")
        if path.exists() and not overwrite:
            raise TvlensError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
        try:
            header = json.dumps(self.metadata(), default=_json_default)
        except TypeError as err:
            raise TvlensError(f"vector metadata is not JSON-serialisable: {err}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({"vectors": self.vectors.detach().cpu().contiguous()}, tmp,
                      metadata={"tvlens": header})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, model=None, *, device=None) -> TaskVector:
        """Read a vector file; with ``model``, refuse it unless it was made for that model."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise TvlensError(f"vector file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("tvlens")
                if meta is None or "vectors" not in f.keys():
                    raise TvlensError(f"{str(path)!r} is a safetensors file but not a tvlens vector")
                vectors = f.get_tensor("vectors")
        except (SafetensorError, OSError, ValueError) as err:
            if isinstance(err, TvlensError):
                raise
            raise TvlensError(f"{str(path)!r} is not a readable tvlens vector file: {err}") from None
        try:
            data = json.loads(meta)
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
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise TvlensError(f"{str(path)!r} has malformed tvlens metadata: {err!r}") from None
        if model is not None:
            tv.check_model(model)
            tv = replace(tv, vectors=tv.vectors.to(model.cfg.device))
        return tv


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
