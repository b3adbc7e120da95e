"""Key heads: first-order saliency, head means, and the exhaustive ablation ground truth.

**Saliency** (LTV). For head ``(l, h)`` let ``a[b] = z[b, q, h]`` be its output before
``W_O`` (``blocks.{l}.attn.hook_z``) at the query's last position ``q``, and
``p_b = p(y_b | x_b, θ)`` the probability of the first answer token. Then

    attr[l, h]     = mean_b  a[b] · ∂p_b/∂a[b]        (signed; ≈ p(a) − p(0), first order)
    saliency[l, h] = mean_b |a[b] · ∂p_b/∂a[b]|

from **one** forward and **one** backward pass over the batch: a zero tensor
``δ[l, h] ∈ R^{B × d_head}`` (requiring grad) is *added* to every head's ``z`` at ``q`` (a
:class:`~tvlens.interventions.HeadPatch` in ``"add"`` mode), and
``∂Σ_b p_b/∂δ[l, h][b] = ∂p_b/∂z[b, q, h]`` is the total derivative (paths through later
heads included). ``z`` rather than ``z @ W_O`` is used: ``a · ∂p/∂a`` is the same for
both, since ``W_O`` is linear.

**Ablation** acts on ``z`` at the query's last position only
(:meth:`HeadPatch.ablation <tvlens.interventions.HeadPatch.ablation>`): ``zero`` sets it
to 0, ``mean`` to the mean over the batch's prompts of that head's ``z`` at the same
position under the same condition (same vector, same prompt format; :func:`head_means`).
Heads at other positions run unchanged.

**Ground truth**: ablate one head at a time and record ``mean_b |p_b − p_b^{ablated}|``.
The heads go along the batch dimension (:func:`tvlens.runner.run_variants`): prompt
``i``'s copy ``j`` ablates head ``j`` of a chunk, ``batch_size`` rows per forward.

**Which heads can read θ.** A vector injected at layer ``l`` is written to
``blocks.{l}.hook_resid_post`` (:func:`~tvlens.interventions.resid_hook_name`), so only the
heads of layers ``l + 1 .. L − 1`` read a residual that carries it; a head at layer
``≤ l`` sees the clean residual, and a high saliency there says that the head matters to
the prompt, not that it reads θ. :func:`readable_heads` lists the heads after the
(first) injection layer; :func:`select_key_heads` takes the top ``percent`` % *of those*
(``k = max(1, round(n_candidates · percent / 100))``). A vector at the last layer has no
later head: it is refused.

:mod:`tvlens.attribution.ablation` scores accuracy with heads ablated against random head
sets and no ablation, through :func:`tvlens.evaluation.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import check_percent
from tvlens.errors import TvlensError
from tvlens.heads import Head, all_heads, check_heads
from tvlens.interventions import HeadPatch, z_hook_name
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.results import HeadTable
from tvlens.runner import answer_probs, run, run_variants


def head_saliency(model, prompts, vector=None
                  ) -> tuple[Float[Tensor, "layer head"], Float[Tensor, "layer head"]]:
    """``(saliency, attr)``, both ``[n_layers, n_heads]``; see the module docstring.

    ``prompts`` is a :class:`~tvlens.prompts.PromptSet` or :class:`PromptBatch`, run as
    one forward (the probe holds one ``δ`` row per prompt); ``vector`` any intervention.
    """
    batch = getattr(prompts, "batch", prompts)
    heads = all_heads(model)
    d_head = int(model.cfg.d_head)
    deltas = [torch.zeros(len(batch), d_head, device=model.cfg.device, requires_grad=True)
              for _ in heads]
    probe = HeadPatch(heads, deltas, mode="add")  # z[b, q, h] += δ[l, h][b] (= 0)
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    with torch.enable_grad():
        out = run(model, batch, [vector, probe], capture=names, capture_at="last", logits="last",
                  batch_size=None, grad=True, progress=False)
        p = answer_probs(out.last_logits, batch)
        grads = torch.autograd.grad(p.sum(), deltas)  # per head: ∂p_b/∂z[b, q, h], [B, d_head]
    H = int(model.cfg.n_heads)
    sal, attr = [], []
    for layer, name in enumerate(names):
        a = out.captured[name].detach()  # [B, H, d_head]: z at q
        g = torch.stack(grads[layer * H : (layer + 1) * H], 1)  # [B, H, d_head]
        prod = (a * g.to(a)).sum(-1).float()  # [B, H]
        sal.append(prod.abs().mean(0))
        attr.append(prod.mean(0))
    return torch.stack(sal).cpu(), torch.stack(attr).cpu()


def head_means(model, prompts, vector=None, *, batch_size: int | None = None
               ) -> Float[Tensor, "layer head d_head"]:
    """Mean over the prompts of every head's ``z`` at the query's last position, with
    ``vector`` (any intervention, or None) applied: the values of mean ablation."""
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    out = run(model, prompts, vector, capture=names, capture_at="last", logits=None,
              batch_size=batch_size, progress=False)
    return torch.stack([out.captured[n].mean(0) for n in names])


def ablation_effects(model, batch: PromptBatch | PromptSet, vector=None, *, mode: str = "zero",
                     batch_size: int = 512, heads: Sequence[Head] | None = None,
                     prefix_cache: bool | str = False) -> Float[Tensor, "layer head"]:
    """Ground truth: ``mean_b |p_b − p_b^{ablate (l,h)}|`` for every head, batched.

    Args:
        batch: the prompts (a PromptBatch or PromptSet).
        vector: applied in every forward (any intervention, or None).
        mode: ``"zero"`` or ``"mean"`` (means from :func:`head_means` under ``vector``).
        batch_size: rows per forward (prompts × heads of one chunk).
        heads: only these heads (default: all); the others are NaN.
        prefix_cache: passed to :func:`~tvlens.runner.run_variants` (no ``vector`` only).
    """
    batch = getattr(batch, "batch", batch)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = all_heads(model) if heads is None else check_heads(model, heads)
    means = head_means(model, batch, vector) if mode == "mean" else None
    variants = [HeadPatch.ablation(model, [head], mode, means) for head in heads]
    res = run_variants(model, batch, variants, common=vector, batch_size=batch_size,
                       prefix_cache=prefix_cache, desc="ablate heads")
    effect = (res.base[None] - res.probs).abs().mean(1)  # [n_heads asked]
    out = torch.full((L, H), float("nan"))
    for (layer, h), e in zip(heads, effect):
        out[layer, h] = e
    return out


def top_heads(scores: Float[Tensor, "layer head"], percent: float = 10.0) -> list[Head]:
    """The top ``percent`` % of heads by score (at least one), highest first."""
    return HeadTable(scores, "score").top(percent=check_percent(percent))


def injection_layer(vector) -> int | None:
    """The first layer whose output ``vector`` writes: ``min(vector.layers)`` of a
    :class:`~tvlens.vector.TaskVector`, :class:`~tvlens.interventions.ResidualEdit` or
    adaptive generator (parts of a composition included); None for no vector."""
    if vector is None:
        return None
    parts = getattr(vector, "parts", [vector])
    layers = [int(x) for p in parts for x in (getattr(p, "layers", None) or ())]
    if not layers:
        raise TvlensError(f"cannot tell which layer {type(vector).__name__} writes to, so which "
                          "heads can read it; pass a TaskVector, or rank='all' to rank every head")
    return min(layers)


def readable_heads(model, vector, rank: str = "after") -> list[Head]:
    """The heads to rank: with ``rank="after"`` those in layers after the injection layer
    ``l`` (:func:`injection_layer`), i.e. ``(l', h)`` with ``l < l' < L``; every head with
    ``rank="all"`` or without a vector. Layer-major.

    Raises :class:`TvlensError` for a vector at the last layer under ``rank="after"``.
    """
    if rank not in ("after", "all"):
        raise TvlensError(f"rank must be 'after' (heads after the injection layer) or 'all', got {rank!r}")
    heads = all_heads(model)
    if rank == "all" or vector is None:
        return heads
    layer, last = injection_layer(vector), int(model.cfg.n_layers) - 1
    if layer >= last:
        raise TvlensError(
            f"the vector is injected after layer {layer}, the model's last layer: no later head "
            "can read it, so it has no key heads; inject it at an earlier layer, or rank every "
            "head with rank='all' (CLI: --rank all), none of which can read it")
    return [hd for hd in heads if hd[0] > layer]


def select_key_heads(scores: Float[Tensor, "layer head"], percent: float = 10.0,
                     heads: Sequence[Head] | None = None) -> list[Head]:
    """The top ``percent`` % of ``heads`` (default: all) by ``scores``, highest first:
    ``k = max(1, round(len(heads) · percent / 100))``, ties in layer-major order."""
    percent = check_percent(percent)
    L, H = scores.shape
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else list(heads)
    if not heads:
        raise TvlensError("no heads to rank; use rank='all' or a vector at an earlier layer")
    k = max(1, int(round(len(heads) * percent / 100)))
    score = [float(scores[layer, h]) for layer, h in heads]  # NaN (not scored) ranks last
    order = sorted(range(len(heads)), key=lambda i: (-score[i] if score[i] == score[i] else float("inf"), i))
    return [heads[i] for i in order[:k]]


def layer_histogram(heads: Sequence[Head], n_layers: int) -> list[int]:
    """``count[l]`` = how many of ``heads`` sit in layer ``l``, for ``l < n_layers`` (sums to
    ``len(heads)``)."""
    count = [0] * int(n_layers)
    for layer, _ in heads:
        count[int(layer)] += 1
    return count


def agreement(a: Tensor, b: Tensor, percent: float = 10.0, heads: Sequence[Head] | None = None
              ) -> dict:
    """Spearman ρ between two head scores and the overlap of their top ``percent`` %, over
    ``heads`` (default: all) — the heads that were ranked."""
    from scipy.stats import spearmanr

    L, H = a.shape
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else list(heads)
    xa = np.array([float(a[hd]) for hd in heads])
    xb = np.array([float(b[hd]) for hd in heads])
    rho = float(spearmanr(xa, xb).statistic) if len(heads) > 1 else float("nan")
    ta, tb = set(select_key_heads(a, percent, heads)), set(select_key_heads(b, percent, heads))
    return {"spearman": rho, "top_overlap": len(ta & tb) / len(ta), "k": len(ta)}


__all__ = ["ablation_effects", "agreement", "head_means", "head_saliency", "injection_layer",
           "layer_histogram", "readable_heads", "select_key_heads", "top_heads"]
