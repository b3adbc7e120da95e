"""Training checkpoints for learned task vectors: one safetensors file, written atomically.

The file holds the tensors (the parameter φ, the best φ so far, AdamW's two moment
estimates and step count, the batch sampler's RNG state) and, as JSON in the safetensors
header under ``"tvlens_ltv"``, the run's configuration, step, history and early-stopping
state. Reading and writing go through :func:`tvlens.io.save_tensors` /
:func:`tvlens.io.load_tensors` (temporary file + rename), so an interrupted or diverged
run always leaves the last *good* checkpoint readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.io import load_tensors, save_tensors

CHECKPOINT_NAME = "ltv_checkpoint.safetensors"
META_KEY = "tvlens_ltv"


def checkpoint_path(folder: str | Path) -> Path:
    return Path(folder) / CHECKPOINT_NAME


def save_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically write ``tensors`` and the JSON ``meta`` to ``path``."""
    return save_tensors(path, tensors, meta, key=META_KEY)


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`; refuse anything else."""
    try:
        return load_tensors(path, key=META_KEY, what="tvlens LTV checkpoint")
    except TvlensError as err:
        raise TvlensError(f"{err}; remove it to start afresh, or use another checkpoint_dir") from None


def config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run configurations (JSON-normalised)."""
    a, b = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    return [f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
