"""Files: atomic writes, tensors + JSON metadata in safetensors, and the versions stamp.

Everything tvlens writes goes through :func:`atomic_write`: the content is written to a
temporary file in the destination folder and renamed over the destination, so a crash
leaves either the old file or the new one, never half of one. The new file gets the
mode an ordinary ``open(path, "w")`` would give it (``0o666`` minus the umask, or the
mode of the file it replaces) — not the ``0o600`` of the temporary file.

Tensors are stored as safetensors with the metadata as JSON in the header under one key
(no pickle anywhere: loading a file never runs code).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvlens.errors import TvlensError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None], *, overwrite: bool = True,
                 suffix: str = ".tmp") -> Path:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (see the module docstring).

    Raises :class:`TvlensError` when the folder is missing, or ``path`` exists and
    ``overwrite`` is false.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise TvlensError(f"folder {str(path.parent)!r} does not exist; create it first")
    if path.exists() and not overwrite:
        raise TvlensError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_text(path: str | Path, text: str, *, overwrite: bool = True) -> Path:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                        overwrite=overwrite)


def write_json(path: str | Path, obj: Any, *, overwrite: bool = True, indent: int | None = 1) -> Path:
    """Atomically write ``obj`` as JSON; tensors and numpy values become lists / numbers."""
    try:
        text = json.dumps(obj, indent=indent, default=json_default)
    except TypeError as err:
        raise TvlensError(f"cannot write {str(path)!r}: the data is not JSON-serialisable ({err})") from None
    return write_text(path, text + "\n", overwrite=overwrite)


def read_json(path: str | Path, *, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise TvlensError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TvlensError(f"{what} {str(path)!r} is not valid JSON: {err}") from None


def json_default(obj):
    """JSON fallback for tensors, numpy arrays and scalars."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def save_tensors(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any], *,
                 key: str, overwrite: bool = True) -> Path:
    """Atomically write ``tensors`` with ``meta`` as JSON under header entry ``key``."""
    from safetensors.torch import save_file

    try:
        header = json.dumps(meta, default=json_default)
    except TypeError as err:
        raise TvlensError(f"metadata for {str(path)!r} is not JSON-serialisable: {err}") from None
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata={key: header}),
                        overwrite=overwrite)


def load_tensors(path: str | Path, *, key: str, what: str = "tvlens file"
                 ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; refuse files without ``key``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TvlensError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(key)
            if raw is None:
                raise TvlensError(f"{str(path)!r} is a safetensors file but not a {what}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        if isinstance(err, TvlensError):
            raise
        raise TvlensError(f"{str(path)!r} is not a readable {what}: {err}") from None
    try:
        return tensors, json.loads(raw)
    except json.JSONDecodeError as err:
        raise TvlensError(f"{str(path)!r} has malformed metadata: {err}") from None


def optimizer_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into named tensors and JSON (the inverse of
    :func:`optimizer_state`): what safetensors can hold, no pickle."""
    tensors, scalars = {}, {}
    for i, entry in state_dict["state"].items():
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer/state/{i}/{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state_dict["param_groups"]]
    tuples = sorted({k for g in state_dict["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"param_groups": groups, "tuple_keys": tuples, "state": scalars}


def optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the optimizer ``state_dict`` from :func:`optimizer_tensors`'s two halves."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer/state/"):
            i, k = name.removeprefix("optimizer/state/").split("/", 1)
            state.setdefault(int(i), {})[k] = t
    for i, entry in meta.get("state", {}).items():
        state.setdefault(int(i), {}).update(entry)
    tuple_keys = set(meta.get("tuple_keys", ()))
    groups = [{k: tuple(v) if k in tuple_keys else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def versions() -> dict[str, str]:
    """The versions of tvlens and the libraries whose changes can move a number."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("tvlens", "transformer-lens", "transformers", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out
