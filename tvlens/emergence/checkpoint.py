"""TVP checkpoints: one safetensors file with JSON metadata, written atomically, no pickle.

A run folder holds ``checkpoint.safetensors`` (through :func:`tvlens.io.save_tensors`)
with the named tensors

    params/<name>                 every model parameter, its own shape and dtype
    optimizer/state/<i>/<key>     every tensor of the optimizer's per-parameter state
                                  (AdamW: ``step`` [], ``exp_avg`` and ``exp_avg_sq``
                                  of parameter ``i``'s shape)
    data_rng                      the data generator's state (``uint8 [n]``)

and, as JSON under the header key ``tvlens.tvp_checkpoint``: ``format`` and
``format_version``, the ``config`` (:meth:`TVPConfig.to_dict`), the ``step`` reached,
the evaluation ``history``, ``running`` (the loss sums since the last evaluation, so a
resumed run logs the same averages), the optimizer's ``param_groups`` and non-tensor
state, and ``versions`` (:func:`tvlens.io.versions`). ``config.json`` next to it repeats
the config (:func:`tvlens.io.write_json`). Reading a checkpoint never runs code; a file
that is not a TVP checkpoint is one :class:`TvlensError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tvlens.emergence.config import TVPConfig, build_model
from tvlens.errors import TvlensError
from tvlens.io import (load_tensors, optimizer_state, optimizer_tensors, save_tensors, versions,
                       write_json)

CHECKPOINT = "checkpoint.safetensors"
KEY = "tvlens.tvp_checkpoint"
FORMAT = "tvlens-tvp-checkpoint"
FORMAT_VERSION = 1
WHAT = "tvlens TVP checkpoint"
_LEGACY = "checkpoint.pt"  # the pickles of tvlens <= 0.1, no longer read


@dataclass
class Checkpoint:
    """A checkpoint's contents: ``optimizer`` is a torch optimizer ``state_dict``."""

    config: TVPConfig
    step: int
    history: list[dict]
    params: dict[str, Tensor]
    optimizer: dict[str, Any]
    data_rng: Tensor
    running: dict[str, float] | None = None


def save_checkpoint(path: str | Path, run, optimizer: torch.optim.Optimizer, data_gen: torch.Generator,
                    *, running: dict[str, float] | None = None) -> Path:
    """Write ``run`` (a :class:`~tvlens.emergence.training.TrainRun`: parameters, step,
    history, config) with the optimizer and data-RNG states atomically to ``path``, and
    its config to ``config.json`` beside it."""
    path = Path(path)
    opt_tensors, opt_meta = optimizer_tensors(optimizer.state_dict())
    tensors = {f"params/{n}": p.detach().clone() for n, p in run.model.named_parameters()}
    tensors.update(opt_tensors)
    tensors["data_rng"] = data_gen.get_state()
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": run.config.to_dict(),
            "step": run.step, "history": run.history, "running": running, "optimizer": opt_meta,
            "versions": versions()}
    save_tensors(path, tensors, meta, key=KEY)
    write_json(path.parent / "config.json", run.config.to_dict(), indent=2)
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        TvlensError: no file (naming a legacy ``checkpoint.pt`` pickle if one is there),
            a file that is not a TVP checkpoint, one from a newer tvlens, or a damaged one.
    """
    path = Path(path)
    if not path.is_file():
        hint = ""
        if (path.parent / _LEGACY).is_file():
            hint = (f" ({_LEGACY} there is a pickle from an older tvlens, which tvlens no longer "
                    "loads because unpickling can run code; train again)")
        raise TvlensError(f"no checkpoint at {str(path)!r}{hint}; train first (tvlens tvp train --out DIR)")
    tensors, meta = load_tensors(path, key=KEY, what=WHAT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TvlensError(f"{str(path)!r} is not a {WHAT} (its metadata has no format {FORMAT!r})")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise TvlensError(f"{str(path)!r} is a damaged {WHAT}: its format_version is {version!r}")
    if version > FORMAT_VERSION:
        raise TvlensError(f"{str(path)!r} is a version-{meta['format_version']} {WHAT}, written by a "
                          f"newer tvlens (this one reads version {FORMAT_VERSION}); upgrade tvlens")
    missing = [k for k in ("config", "step", "history", "optimizer") if k not in meta]
    missing += [k for k in ("data_rng",) if k not in tensors]
    if missing:
        raise TvlensError(f"{str(path)!r} is a damaged {WHAT}: it has no {', '.join(missing)}")
    cfg = TVPConfig.from_dict(meta["config"])
    params = {n.removeprefix("params/"): t for n, t in tensors.items() if n.startswith("params/")}
    return Checkpoint(cfg, int(meta["step"]), list(meta["history"]), params,
                      optimizer_state(tensors, meta["optimizer"]), tensors["data_rng"],
                      meta.get("running"))


def load_params(model, params: dict[str, Tensor]) -> None:
    """Copy ``params`` into ``model`` (refused unless the names and shapes match)."""
    own = dict(model.named_parameters())
    if set(own) != set(params) or any(own[n].shape != params[n].shape for n in own):
        raise TvlensError("checkpoint parameters do not match this model's; was the config changed?")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])


def load_model(folder: str | Path):
    """The trained model of a run folder (its ``checkpoint.safetensors``) and its config."""
    ckpt = read_checkpoint(Path(folder) / CHECKPOINT)
    model = build_model(ckpt.config)
    load_params(model, ckpt.params)
    return model, ckpt.config
