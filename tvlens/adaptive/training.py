"""Training an adaptive generator: target frozen, encoder + expansion trained jointly.

On the zero-shot prompts of many tasks at once (each batch mixes tasks), minimise the
teacher-forced cross-entropy of the answer tokens with the generated vectors injected:

    L(θ) = E_{(x, y)} [ −(1/|y|) Σ_j log p_target(y_j | prompt(x), y_<j ; + λ·V_θ(x)) ]

(:func:`tvlens.scoring.answer_nll` with the generator's hooks). Adam, lr 5e-4, weight
decay 1e-5 (the paper's defaults). Every epoch visits the training pairs in an order
drawn from ``(seed, epoch)`` only, so a run resumed from a checkpoint takes the same
steps as one that was never interrupted. Checkpoints (``checkpoint.safetensors`` with
the weights and ``checkpoint.pt`` with the optimizer state, loaded ``weights_only``) are
written every ``checkpoint_every`` steps and at the end of each epoch.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tvlens.errors import TvlensError
from tvlens.prompts import make_examples, tokenize
from tvlens.scoring import answer_nll
from tvlens.tasks.task import Task

from tvlens.adaptive.generator import AdaptiveGenerator

CKPT_WEIGHTS, CKPT_STATE, CKPT_META = "checkpoint.safetensors", "checkpoint.pt", "checkpoint.json"


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


def check_unseen(train_tasks: Sequence, unseen_tasks: Sequence) -> None:
    """Refuse unseen tasks that were also trained on (names compared)."""
    names = lambda ts: {t if isinstance(t, str) else t.name for t in ts}  # noqa: E731
    overlap = sorted(names(train_tasks) & names(unseen_tasks))
    if overlap:
        raise TvlensError(f"unseen tasks {overlap} are also training tasks; an unseen task must "
                          "be left out of training")


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
    epochs: int = 3,
    batch_size: int = 16,
    n_per_task: int | None = None,
    lr: float = 5e-4,
    weight_decay: float = 1e-5,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = False,
    max_steps: int | None = None,
    progress: bool = True,
) -> dict:
    """Train ``generator`` (in place) to help the frozen ``target`` on ``tasks``.

    Args:
        epochs, batch_size: passes over the pooled training pairs, and pairs per step.
        n_per_task: use the first ``n_per_task`` train pairs of each task (paper: ~90).
        lr, weight_decay: Adam (paper: 5e-4, 1e-5).
        checkpoint_dir: where checkpoints go; with ``resume=True`` training continues
            from the checkpoint found there (same data order, same optimizer state).
        max_steps: stop after this many steps in total (counting resumed ones).

    Returns:
        ``{"loss": [per-step mean loss], "steps": int, "seconds": float, "tasks": [...]}``.
    """
    generator.check_model(target)
    if epochs < 1 or batch_size < 1:
        raise TvlensError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not (lr > 0):
        raise TvlensError(f"lr must be positive, got {lr}")
    data = training_pairs(tasks, n_per_task)
    template = generator.config.target_template
    opt = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr,
                           weight_decay=weight_decay)
    history = {"loss": [], "steps": 0, "seconds": 0.0, "tasks": [t.name for t in tasks],
               "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    if resume:
        if ckpt is None or not (ckpt / CKPT_META).is_file():
            raise TvlensError("resume=True needs a checkpoint_dir holding a checkpoint "
                              f"({CKPT_META}); train without resume first")
        history = _load_checkpoint(ckpt, generator, opt)
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
            batch = tokenize(target, make_examples([(x, y) for _, x, y in chunk]), template)
            loss = answer_nll(target, batch, generator.hooks(target, batch)).mean()
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
    from safetensors.torch import save_file

    tmp = folder / (CKPT_WEIGHTS + ".tmp")
    save_file(generator._named_tensors(), str(tmp))
    tmp.replace(folder / CKPT_WEIGHTS)
    torch.save(opt.state_dict(), folder / (CKPT_STATE + ".tmp"))
    (folder / (CKPT_STATE + ".tmp")).replace(folder / CKPT_STATE)
    (folder / CKPT_META).write_text(json.dumps({"history": history,
                                                "config": json.loads(generator.config.to_json())}),
                                    encoding="utf-8")


def _load_checkpoint(folder: Path, generator, opt) -> dict:
    from safetensors.torch import load_file

    meta = json.loads((folder / CKPT_META).read_text(encoding="utf-8"))
    saved = meta["config"]
    if saved["target"] != generator.config.target or list(saved["layers"]) != list(generator.layers):
        raise TvlensError(f"the checkpoint in {str(folder)!r} was made for another target model or "
                          "layers; resume with the same target and generator settings")
    generator.load_weights(load_file(str(folder / CKPT_WEIGHTS)))
    opt.load_state_dict(torch.load(folder / CKPT_STATE, weights_only=True))
    return meta["history"]


__all__ = ["check_unseen", "frozen", "train_generator", "training_pairs"]
