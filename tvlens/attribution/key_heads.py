"""Key heads: first-order saliency, head ablation, and the exhaustive ground truth.

**Saliency** (LTV). For head ``(l, h)`` let ``a[b] = z[b, q, h]`` be its output before
``W_O`` (``blocks.{l}.attn.hook_z``) at the query's last position ``q``, and
``p_b = p(y_b | x_b, θ)`` the probability of the first answer token. Then

    attr[l, h]     = mean_b  a[b] · ∂p_b/∂a[b]        (signed; ≈ p(a) − p(0), first order)
    saliency[l, h] = mean_b |a[b] · ∂p_b/∂a[b]|

from **one** forward and **one** backward pass over the batch: a zero tensor ``δ_l``
(requiring grad) is added to every ``z`` at ``q``, and ``∂Σ_b p_b/∂δ_l = ∂p_b/∂z_l`` is the
total derivative (paths through later heads included). ``z`` rather than ``z @ W_O`` is
used: ``a · ∂p/∂a`` is the same for both, since ``W_O`` is linear.

**Ablation** acts on ``z`` at the query's last position only: ``zero`` sets it to 0,
``mean`` to the mean over the batch's prompts of that head's ``z`` at the same position
under the same condition (same vector, same prompt format). Heads at other positions run
unchanged.

**Ground truth**: ablate one head at a time and record ``mean_b |p_b − p_b^{ablated}|``.
Heads go along the batch dimension: a chunk of ``c`` heads runs as one forward over ``c``
stacked copies of the batch, copy ``j`` ablating head ``j``.

:func:`ablate_heads` scores accuracy with heads ablated, against random head sets of the
same size (drawn from the heads not ablated, ``random_control`` draws, mean and a 95% t
interval over draws) and against no ablation. Without a vector it runs on ICL prompts.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.activations import capture
from tvlens.attribution._common import (
    Head, accuracy, all_heads, answer_prob, check_heads, check_percent, query_batch, repeat_batch,
    vector_hooks,
)
from tvlens.errors import TvlensError
from tvlens.injection import Hook
from tvlens.prompts import PromptBatch
from tvlens.scoring import last_token_logits
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector


def head_saliency(model, batch: PromptBatch, vector: TaskVector | None = None
                  ) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """``(saliency, attr)``, both ``[n_layers, n_heads]``; see the module docstring."""
    L = int(model.cfg.n_layers)
    q = batch.position_index("last")
    rows = torch.arange(len(batch))
    deltas: list[Tensor] = []

    def make(layer):
        def hook(z, hook=None):
            d = torch.zeros(z.shape[0], z.shape[2], z.shape[3], device=z.device, dtype=z.dtype,
                            requires_grad=True)
            deltas.append(d)
            acts[layer] = z
            return z.index_put((rows.to(z.device), q.to(z.device)), d, accumulate=True)
        return hook

    acts: dict[int, Tensor] = {}
    hooks = vector_hooks(model, vector, batch) + \
        [(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in range(L)]
    with torch.enable_grad():
        logits = last_token_logits(model, batch, hooks)
        p = answer_prob(logits, batch)
        grads = torch.autograd.grad(p.sum(), deltas)
    sal, attr = [], []
    for layer, g in enumerate(grads):
        a = acts[layer].detach()[rows.to(g.device), q.to(g.device)]  # [B, H, dh]
        prod = (a * g).sum(-1).float()  # [B, H]
        sal.append(prod.abs().mean(0))
        attr.append(prod.mean(0))
    return torch.stack(sal), torch.stack(attr)


def head_means(model, batch: PromptBatch, vector: TaskVector | None = None
               ) -> Float[Tensor, "layer head d_head"]:
    """Mean over the batch of every head's ``z`` at the query's last position."""
    L = int(model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    q = batch.position_index("last")
    rows = torch.arange(len(batch))
    with torch.no_grad():
        store = capture(model, batch, names, vector_hooks(model, vector, batch))
    return torch.stack([store[n][rows, q.to(store[n].device)].mean(0) for n in names])


def ablation_hooks(model, batch: PromptBatch, heads: Sequence[Head], mode: str = "zero",
                   means: Tensor | None = None, *, copy_rows: Sequence[Sequence[int]] | None = None
                   ) -> list[Hook]:
    """``fwd_hooks`` setting ``z`` of ``heads`` at the query's last position to 0 or the mean.

    ``copy_rows[i]`` lists the rows where ``heads[i]`` is ablated (default: every row).
    """
    if mode not in ("zero", "mean"):
        raise TvlensError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise TvlensError("mean ablation needs the head means (head_means(model, batch, vector))")
    heads = check_heads(model, heads) if copy_rows is None else list(heads)
    q = batch.position_index("last")
    per_layer: dict[int, list[tuple[Tensor, int]]] = {}
    for i, (layer, h) in enumerate(heads):
        rows = torch.arange(len(batch)) if copy_rows is None else torch.as_tensor(list(copy_rows[i]))
        per_layer.setdefault(layer, []).append((rows, h))

    def make(layer, items):
        def hook(z, hook=None):
            rows = torch.cat([r for r, _ in items]).to(z.device)
            hs = torch.cat([torch.full((len(r),), h) for r, h in items]).to(z.device)
            cols = q.to(z.device)[rows]
            if mode == "zero":
                vals = torch.zeros(len(rows), z.shape[-1], device=z.device, dtype=z.dtype)
            else:
                vals = means[layer].to(z.device, z.dtype)[hs]
            return z.index_put((rows, cols, hs), vals)
        return hook

    return [(f"blocks.{layer}.attn.hook_z", make(layer, items)) for layer, items in per_layer.items()]


def ablation_effects(model, batch: PromptBatch, vector: TaskVector | None = None, *,
                     mode: str = "zero", heads_per_forward: int = 32,
                     heads: Sequence[Head] | None = None) -> Float[Tensor, "layer head"]:
    """Ground truth: ``mean_b |p_b − p_b^{ablate (l,h)}|`` for every head, batched.

    ``heads`` limits it to those heads (default: all); the others are NaN.
    """
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = all_heads(model) if heads is None else check_heads(model, heads)
    means = head_means(model, batch, vector) if mode == "mean" else None
    with torch.no_grad():
        base = answer_prob(last_token_logits(model, batch, vector_hooks(model, vector, batch)), batch)
    B = len(batch)
    out = torch.full((L, H), float("nan"))
    for start in range(0, len(heads), heads_per_forward):
        chunk = heads[start : start + heads_per_forward]
        big = repeat_batch(batch, len(chunk))
        rows = [range(j * B, (j + 1) * B) for j in range(len(chunk))]
        hooks = vector_hooks(model, vector, big) + ablation_hooks(model, big, chunk, mode, means,
                                                                  copy_rows=rows)
        with torch.no_grad():
            p = answer_prob(last_token_logits(model, big, hooks), big).view(len(chunk), B)
        eff = (base.to(p.device)[None] - p).abs().mean(1).cpu()
        for (layer, h), e in zip(chunk, eff):
            out[layer, h] = e
    return out


def top_heads(scores: Float[Tensor, "layer head"], percent: float = 10.0) -> list[Head]:
    """The top ``percent`` % of heads by score (at least one), highest first."""
    check_percent(percent)
    H = scores.shape[1]
    k = max(1, int(round(scores.numel() * percent / 100)))
    idx = scores.flatten().argsort(descending=True)[:k].tolist()
    return [(i // H, i % H) for i in idx]


def agreement(a: Tensor, b: Tensor, percent: float = 10.0) -> dict:
    """Spearman ρ between two head scores and the overlap of their top ``percent`` %."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)
    ta, tb = set(top_heads(a, percent)), set(top_heads(b, percent))
    return {"spearman": rho, "top_overlap": len(ta & tb) / len(ta), "k": len(ta)}


@dataclass
class AblationResult:
    """Accuracy with heads ablated vs random head sets of the same size vs none."""

    heads: list[Head]
    mode: str
    baseline_accuracy: float
    ablated_accuracy: float
    random_accuracies: list[float] = field(default_factory=list)
    n: int = 0

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_accuracies)) if self.random_accuracies else float("nan")

    @property
    def random_ci(self) -> tuple[float, float]:
        """95% t interval of the mean over random draws (NaN for fewer than 2 draws)."""
        r = np.asarray(self.random_accuracies, dtype=float)
        if r.size < 2:
            return float("nan"), float("nan")
        from scipy.stats import t

        half = float(t.ppf(0.975, r.size - 1) * r.std(ddof=1) / np.sqrt(r.size))
        return float(r.mean() - half), float(r.mean() + half)

    def to_dict(self) -> dict:
        return {"heads": [list(h) for h in self.heads], "mode": self.mode, "n": self.n,
                "baseline_accuracy": self.baseline_accuracy,
                "ablated_accuracy": self.ablated_accuracy,
                "random_accuracy": self.random_mean, "random_ci": list(self.random_ci),
                "random_accuracies": self.random_accuracies}


def ablate_heads(model, task: Task, heads: Sequence[Head], mode: str = "zero",
                 vector: TaskVector | None = None, random_control: int = 5, *, n: int = 32,
                 shots: int = 5, split: str = "test", template="arrow", seed: int = 0,
                 batch: PromptBatch | None = None) -> AblationResult:
    """Accuracy of ``task`` with ``heads`` ablated (see the module docstring).

    With ``vector`` the prompts are zero-shot queries carrying it; without, ``shots``-shot
    ICL prompts. ``random_control`` random head sets of the same size (seeded) give the
    control; 0 skips it.
    """
    heads = check_heads(model, heads)
    if random_control < 0:
        raise TvlensError(f"random_control must be >= 0, got {random_control}")
    if batch is None:
        batch = query_batch(model, task, n=n, shots=0 if vector is not None else shots,
                            split=split, template=template, seed=seed)
    vh = vector_hooks(model, vector, batch)
    means = head_means(model, batch, vector) if mode == "mean" else None
    base = accuracy(model, batch, vh)
    abl = accuracy(model, batch, vh + ablation_hooks(model, batch, heads, mode, means))
    rng = _random.Random(seed)
    pool = [hd for hd in all_heads(model) if hd not in set(heads)]
    rand = []
    for _ in range(random_control):
        pick = rng.sample(pool, min(len(heads), len(pool)))
        rand.append(accuracy(model, batch, vh + ablation_hooks(model, batch, pick, mode, means)))
    return AblationResult(heads, mode, base, abl, rand, len(batch))


def key_head_analysis(model, task: Task, vector: TaskVector | None = None, *, percent: float = 10.0,
                      n: int = 32, random_control: int = 5, modes=("zero", "mean"),
                      ground_truth: bool = True, shots: int = 5, template="arrow",
                      seed: int = 0) -> dict:
    """Saliency → key heads → ablation controls (+ the exhaustive ground truth).

    Returns the CLI's JSON: ``key_heads``, ``baseline_accuracy``, ``ablate_key_accuracy``,
    ``ablate_random_accuracy``, ``ablate_random_ci`` (first mode), per-mode results under
    ``ablation``, ``spearman`` and ``top_overlap`` (saliency vs ground truth, zero
    ablation), ``saliency`` and ``ground_truth`` ([L, H] lists).
    """
    check_percent(percent)
    batch = query_batch(model, task, n=n, shots=0 if vector is not None else shots,
                        template=template, seed=seed)
    sal, attr = head_saliency(model, batch, vector)
    keys = top_heads(sal, percent)
    out: dict = {"task": task.name, "n": len(batch), "percent": percent,
                 "key_heads": [list(h) for h in keys], "saliency": sal.tolist(),
                 "attribution": attr.tolist(), "ablation": {}}
    for mode in modes:
        res = ablate_heads(model, task, keys, mode, vector, random_control, seed=seed, batch=batch)
        out["ablation"][mode] = res.to_dict()
    first = out["ablation"][modes[0]]
    out.update(baseline_accuracy=first["baseline_accuracy"],
               ablate_key_accuracy=first["ablated_accuracy"],
               ablate_random_accuracy=first["random_accuracy"], ablate_random_ci=first["random_ci"])
    if ground_truth:
        gt = ablation_effects(model, batch, vector, mode="zero")
        out["ground_truth"] = gt.tolist()
        out.update(agreement(sal, gt, percent))
    return out


__all__ = ["AblationResult", "ablate_heads", "ablation_effects", "ablation_hooks", "agreement",
           "head_means", "head_saliency", "key_head_analysis", "top_heads"]
