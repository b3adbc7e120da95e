"""Training an adaptive generator: target frozen, encoder + expansion trained jointly.

On the zero-shot prompts of many tasks at once (each batch mixes tasks), minimise the
teacher-forced cross-entropy of the answer tokens with the generated vectors injected:

    L(θ) = E_{(x, y)} [ −(1/|y|) Σ_j log p_target(y_j | prompt(x), y_<j ; + λ·V_θ(x)) ]

(:func:`tvlens.runner.run` with the generator as the intervention, ``logits="answer"``,
``grad=True``). Adam, lr 5e-4, weight decay 1e-5 (the paper's defaults, in
:class:`~tvlens.methods.ATVConfig`). Every epoch visits the training pairs in an order
drawn from ``(seed, epoch)`` only, so a run resumed from a checkpoint takes the same
steps as one that was never interrupted. A checkpoint is one safetensors file written
atomically (:func:`tvlens.io.save_tensors`): the generator's weights, Adam's state
flattened into named tensors, and as JSON the optimizer's other state, the history and
the config; written every ``checkpoint_every`` steps and at the end of each epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tvlens.errors import TvlensError
from tvlens.io import load_tensors, optimizer_state, optimizer_tensors, save_tensors, versions
from tvlens.methods import ATVConfig
from tvlens.prompts import PromptSet, make_examples
from tvlens.runner import run
from tvlens.tasks.task import Task

from tvlens.adaptive.config import atv_settings
from tvlens.adaptive.generator import AdaptiveGenerator

CKPT_FILE, CKPT_KEY = "checkpoint.safetensors", "tvlens_atv_checkpoint"
_DEFAULTS = ATVConfig()


def training_pairs(tasks: Sequence[Task], n_per_task: int | None = None) -> list[tuple[str, str, str]]:
    """``(task, x, y)`` triples from each task's train split (the first ``n_per_task``)."""
    if len(tasks) == 0:
        raise TvlensError("no training tasks; give at least one (the paper trains on many)")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise TvlensError(f"training tasks {names} repeat a task; list each once")
    out = []
    for t in tasks:
        pairs = t.train[:n_per_task] if n_per_task else t.train
        if not pairs:
            raise TvlensError(f"task {t.name!r} has no train items; use a larger task")
        out += [(t.name, x, y) for x, y in pairs]
    return out


def input_overlap(inputs: Sequence[str], seen: set[str] | Sequence[str]) -> float:
    """The fraction of ``inputs`` that occur in ``seen`` (NaN for no inputs)."""
    seen = set(seen)
    return sum(x in seen for x in inputs) / len(inputs) if len(inputs) else float("nan")


def check_unseen(train_tasks: Sequence, unseen_tasks: Sequence) -> None:
    """Refuse "unseen" tasks that are not: the same task (names compared), or one whose
    inputs occur in a training task (a generator reading only the query must then emit
    the training task's vector; capitalize's inputs are all uppercase's, for instance)."""
    names = lambda ts: {t if isinstance(t, str) else t.name for t in ts}  # noqa: E731
    overlap = sorted(names(train_tasks) & names(unseen_tasks))
    if overlap:
        raise TvlensError(f"unseen tasks {overlap} are also training tasks; an unseen task must "
                          "be left out of training")
    seen = {x for t in train_tasks if not isinstance(t, str) for x, _ in t.pairs}
    for t in unseen_tasks:
        if isinstance(t, str):
            continue
        frac = input_overlap([x for x, _ in t.pairs], seen)
        if frac > 0:
            raise TvlensError(
                f"unseen task {t.name!r} is not unseen: {frac:.0%} of its inputs occur in the "
                "training tasks, so a generator reading the query sees them in training; use a "
                "task with disjoint inputs (e.g. next_letter, first_item, last_item)")


@contextmanager
def frozen(model):
    """Turn off ``requires_grad`` on every parameter of ``model`` for the body, then restore."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def train_generator(
    target,
    generator: AdaptiveGenerator,
    tasks: Sequence[Task],
    *,
    config: ATVConfig | None = None,
    epochs: int = _DEFAULTS.epochs,
    batch_size: int = _DEFAULTS.batch_size,
    n_per_task: int | None = _DEFAULTS.n_per_task,
    lr: float = _DEFAULTS.lr,
    weight_decay: float = _DEFAULTS.weight_decay,
    seed: int = _DEFAULTS.seed,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``generator`` (in place) to help the frozen ``target`` on ``tasks``.

    Args:
        config: the training settings (``epochs``, ``batch_size``, ``n_per_task``, ``lr``,
            ``weight_decay``, ``seed``) as an :class:`~tvlens.methods.ATVConfig`; the
            keywords below that differ from their defaults override it.
        epochs, batch_size: passes over the pooled training pairs, and pairs per step.
        n_per_task: use the first ``n_per_task`` train pairs of each task (paper: ~90).
        lr, weight_decay: Adam (paper: 5e-4, 1e-5).
        seed: the data order.
        checkpoint_dir: where checkpoints go; with ``resume=True`` training continues
            from the checkpoint found there (same data order, same optimizer state).
        max_steps: stop after this many steps in total (counting resumed ones).

    Returns:
        ``{"loss": [per-step mean loss], "steps": int, "seconds": float, "tasks": [...]}``.
        The training settings are recorded in ``generator.config.settings``.
    """
    generator.check_model(target)
    cfg = atv_settings(config, epochs=epochs, batch_size=batch_size, n_per_task=n_per_task,
                       lr=lr, weight_decay=weight_decay, seed=seed)
    epochs, batch_size, lr, seed = cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed
    if epochs < 1 or batch_size < 1:
        raise TvlensError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (lr > 0):
        raise TvlensError(f"lr must be positive, got {lr}")
    data = training_pairs(tasks, cfg.n_per_task)
    template = generator.config.target_template
    opt = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr,
                           weight_decay=cfg.weight_decay)
    history = {"loss": [], "steps": 0, "seconds": 0.0, "tasks": [t.name for t in tasks],
               "train_inputs": sorted({x for _, x, _ in data}),
               "lr": lr, "weight_decay": cfg.weight_decay, "batch_size": batch_size, "seed": seed}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if resume:
        if ckpt is None or not (ckpt / CKPT_FILE).is_file():
            raise TvlensError("resume=True needs a checkpoint_dir holding a checkpoint "
                              f"({CKPT_FILE}); train without resume first")
        history = _load_checkpoint(ckpt, generator, opt)
    kept = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "n_per_task", "lr", "weight_decay")}
    generator.config = replace(generator.config, settings=generator.config.settings.replace(**kept),
                               versions=versions())
    steps_per_epoch = (len(data) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    step = history["steps"]
    generator.train()
    t0 = time.perf_counter() - history["seconds"]
    bar = tqdm(total=total, initial=step, disable=not progress, desc="adaptive train")
    with frozen(target):
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            order = list(range(len(data)))
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
            chunk = [data[j] for j in order[i * batch_size:(i + 1) * batch_size]]
            prompts = PromptSet.from_examples(target, make_examples([(x, y) for _, x, y in chunk]),
                                              template, split="train")
            out = run(target, prompts, generator, logits="answer", batch_size=None, grad=True,
                      progress=False)
            loss = (-(out.answer_logprobs.sum(-1) / out.answer_mask.sum(-1))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            history["loss"].append(loss.item())
            history["steps"] = step
            history["seconds"] = time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
            if ckpt is not None and (step % checkpoint_every == 0 or step % steps_per_epoch == 0
                                     or step == total):
                _save_checkpoint(ckpt, generator, opt, history)
    bar.close()
    generator.eval()
    return history


def _save_checkpoint(folder: Path, generator, opt, history: dict) -> None:
    opt_tensors, opt_meta = optimizer_tensors(opt.state_dict())  # named "optimizer/..."
    tensors = {**{f"generator.{k}": v for k, v in generator._named_tensors().items()}, **opt_tensors}
    save_tensors(folder / CKPT_FILE, tensors, {"history": history, "optimizer": opt_meta,
                                               "config": generator.config.to_dict()}, key=CKPT_KEY)


def _load_checkpoint(folder: Path, generator, opt) -> dict:
    tensors, meta = load_tensors(folder / CKPT_FILE, key=CKPT_KEY, what="tvlens ATV checkpoint")
    saved = meta["config"]
    if saved["target"] != generator.config.target or list(saved["layers"]) != list(generator.layers):
        raise TvlensError(f"the checkpoint in {str(folder)!r} was made for another target model or "
                          "layers; resume with the same target and generator settings")
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    generator.load_weights(part("generator."))
    opt.load_state_dict(optimizer_state(tensors, meta["optimizer"]))
    return meta["history"]


__all__ = ["check_unseen", "frozen", "input_overlap", "train_generator", "training_pairs"]
