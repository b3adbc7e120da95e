"""Training checkpoints for learned task vectors: one safetensors file, written atomically.

The file holds the tensors (the parameter φ, the best φ so far, AdamW's two moment
estimates, the batch sampler's RNG state) and, as JSON in the safetensors header under
``"tvlens_ltv"``, the run's configuration, step, history and early-stopping state.
Writes go to a temporary file in the same folder, then ``os.replace``, so an interrupted
or diverged run always leaves the last *good* checkpoint readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvlens.errors import TvlensError

CHECKPOINT_NAME = "ltv_checkpoint.safetensors"
META_KEY = "tvlens_ltv"


def checkpoint_path(folder: str | Path) -> Path:
    return Path(folder) / CHECKPOINT_NAME


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON ``meta`` to ``path``."""
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; refuse anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            if raw is None:
                raise TvlensError(f"{str(path)!r} is not a tvlens LTV checkpoint; remove it or "
                                  "use another checkpoint_dir")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise TvlensError(f"checkpoint {str(path)!r} is unreadable ({err}); remove it to "
                          "start afresh") from None
    return tensors, json.loads(raw)


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run configurations (JSON-normalised)."""
    a, b = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def rng_state_tensor(gen: torch.Generator) -> Tensor:
    return gen.get_state().clone()
