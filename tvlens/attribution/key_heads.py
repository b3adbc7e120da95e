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

:mod:`tvlens.attribution.ablation` scores accuracy with heads ablated against random head
sets and no ablation, through :func:`tvlens.evaluation.evaluate`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import check_percent
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


def agreement(a: Tensor, b: Tensor, percent: float = 10.0) -> dict:
    """Spearman ρ between two head scores and the overlap of their top ``percent`` %."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(a.flatten().numpy(), b.flatten().numpy()).statistic)
    ta, tb = set(top_heads(a, percent)), set(top_heads(b, percent))
    return {"spearman": rho, "top_overlap": len(ta & tb) / len(ta), "k": len(ta)}


__all__ = ["ablation_effects", "agreement", "head_means", "head_saliency", "top_heads"]
