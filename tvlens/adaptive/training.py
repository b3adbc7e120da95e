"""Training an adaptive generator: target frozen, encoder + expansion trained jointly.

On the zero-shot prompts of many tasks at once, minimise the teacher-forced
cross-entropy of the answer tokens with the generated vectors injected, averaged over
the target templates ``T(t)`` of each pair's task ``t`` (:func:`training_loss`):

    L(θ) = E_{(t, x, y)} [ (1/|T(t)|) Σ_{τ ∈ T(t)} −(1/|y|) Σ_j log p_target(y_j | τ(x), y_<j ; + λ·V_θ(x)) ]

``T(t)`` is the one ``target_template`` (recipe ``fast``), or with ``natural_templates``
the task's natural-language ATV templates (:func:`tvlens.templates.atv_templates`;
recipe ``reference``, as the released code averages ``outputs.loss`` over them). ``V_θ(x)``
is computed once per pair and shared by its templates; the target runs through
:func:`tvlens.runner.run` (``logits="answer"``, ``grad=True``) once per template in the
batch. Adam, lr 5e-4, weight decay 1e-5 (the paper's). With ``shuffle`` every epoch visits
the pairs in an order drawn from ``(seed, epoch)`` only (without: task after task, the
released order), so a run resumed from a checkpoint takes the same steps as one that was
never interrupted. A checkpoint is one safetensors file written
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
from tvlens.progress import tqdm

from tvlens.errors import TvlensError
from tvlens.interventions import ResidualEdit
from tvlens.io import load_tensors, optimizer_state, optimizer_tensors, save_tensors, versions
from tvlens.methods import ATVConfig
from tvlens.prompts import PromptSet, make_examples
from tvlens.runner import run
from tvlens.tasks.task import Task
from tvlens.templates import Template, atv_templates, get_template, template_name

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


def target_templates(tasks: Sequence[Task], config: ATVConfig,
                     natural: dict[str, Sequence[str]] | None = None) -> dict[str, list[Template]]:
    """Per task, the target templates its loss averages over: ``[target_template]``, or
    with ``config.natural_templates`` :func:`~tvlens.templates.atv_templates` of the task
    (``natural[task]`` strings first, then tvlens's table, then ATV's fallback)."""
    natural = natural or {}
    unknown = sorted(set(natural) - {t.name for t in tasks})
    if unknown:
        raise TvlensError(f"templates given for {unknown}, which are not training tasks; "
                          "name training tasks only")
    if not config.natural_templates:
        if natural:
            raise TvlensError("natural templates given but natural_templates is off; use the "
                              "reference recipe or natural_templates=True")
        return {t.name: [get_template(config.target_template)] for t in tasks}
    return {t.name: atv_templates(t.name, natural.get(t.name)) for t in tasks}


def training_loss(target, generator: AdaptiveGenerator, pairs: Sequence[tuple[str, str, str]],
                  templates: dict[str, Sequence[Template]]) -> Tensor:
    """The batch loss of the module docstring for ``(task, x, y)`` ``pairs``: per pair the
    mean over ``templates[task]`` of the mean answer-token NLL, then the mean over pairs.
    ``V(x)`` is generated once per pair (gradients kept) and injected into each of its
    template's prompts as a per-example :class:`~tvlens.interventions.ResidualEdit`."""
    v = generator.generate([x for _, x, _ in pairs]).unsqueeze(2)  # [B, L, 1, d_model]
    groups: dict[Template, list[int]] = {}
    for i, (name, _, _) in enumerate(pairs):
        for tmpl in templates[name]:
            groups.setdefault(tmpl, []).append(i)
    per_pair: list[list[Tensor]] = [[] for _ in pairs]
    for tmpl, rows in groups.items():
        prompts = PromptSet.from_examples(target, make_examples([pairs[i][1:] for i in rows]),
                                          tmpl, split="train")
        edit = ResidualEdit(generator.layers, (generator.config.position,), v[rows], "add",
                            generator.scale)
        out = run(target, prompts, edit, logits="answer", batch_size=None, grad=True, progress=False)
        nll = -(out.answer_logprobs.sum(-1) / out.answer_mask.sum(-1))
        for i, value in zip(rows, nll):
            per_pair[i].append(value)
    return torch.stack([torch.stack(vals).mean() for vals in per_pair]).mean()


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
    templates: dict[str, Sequence[str]] | None = None,
) -> dict:
    """Train ``generator`` (in place) to help the frozen ``target`` on ``tasks``.

    Args:
        config: the training settings (``epochs``, ``batch_size``, ``n_per_task``, ``lr``,
            ``weight_decay``, ``seed``, ``natural_templates``, ``shuffle``) as an
            :class:`~tvlens.methods.ATVConfig` (default: the generator's own settings,
            e.g. a recipe's); the keywords below that differ from their defaults override it.
        epochs, batch_size: passes over the pooled training pairs, and pairs per step.
        n_per_task: use the first ``n_per_task`` train pairs of each task (paper: ~90).
        lr, weight_decay: Adam (paper: 5e-4, 1e-5).
        seed: the data order.
        checkpoint_dir: where checkpoints go; with ``resume=True`` training continues
            from the checkpoint found there (same data order, same optimizer state).
        max_steps: stop after this many steps in total (counting resumed ones).
        templates: with ``natural_templates``, natural-language templates per task name
            (strings with ``{x}``; "\\nA:" is appended) instead of tvlens's table.

    Returns:
        ``{"loss": [per-step mean loss], "steps": int, "seconds": float, "tasks": [...]}``.
        The training settings are recorded in ``generator.config.settings``.
    """
    generator.check_model(target)
    cfg = atv_settings(config if config is not None else generator.config.settings, epochs=epochs, batch_size=batch_size, n_per_task=n_per_task,
                       lr=lr, weight_decay=weight_decay, seed=seed)
    epochs, batch_size, lr, seed = cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed
    if epochs < 1 or batch_size < 1:
        raise TvlensError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (lr > 0):
        raise TvlensError(f"lr must be positive, got {lr}")
    data = training_pairs(tasks, cfg.n_per_task)
    per_task = target_templates(tasks, cfg.replace(target_template=generator.template), templates)
    opt = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr,
                           weight_decay=cfg.weight_decay)
    history = {"loss": [], "steps": 0, "seconds": 0.0, "tasks": [t.name for t in tasks],
               "train_inputs": sorted({x for _, x, _ in data}),
               "lr": lr, "weight_decay": cfg.weight_decay, "batch_size": batch_size, "seed": seed,
               "recipe": cfg.recipe, "shuffle": cfg.shuffle,
               "templates": {k: [template_name(t) for t in v] for k, v in per_task.items()}}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if resume:
        if ckpt is None or not (ckpt / CKPT_FILE).is_file():
            raise TvlensError("resume=True needs a checkpoint_dir holding a checkpoint "
                              f"({CKPT_FILE}); train without resume first")
        history = _load_checkpoint(ckpt, generator, opt)
    kept = {k: getattr(cfg, k) for k in ("epochs", "batch_size", "n_per_task", "lr", "weight_decay",
                                         "natural_templates", "shuffle")}
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
            if cfg.shuffle:
                random.Random(seed * 1_000_003 + epoch).shuffle(order)
            chunk = [data[j] for j in order[i * batch_size:(i + 1) * batch_size]]
            loss = training_loss(target, generator, chunk, per_task)
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


__all__ = ["check_unseen", "frozen", "input_overlap", "target_templates", "train_generator",
           "training_loss", "training_pairs"]
