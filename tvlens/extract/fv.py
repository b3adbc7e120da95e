"""Function vectors (Todd et al., ICLR 2024, "Function Vectors in Large Language Models").

Heads are *query* heads (``blocks.{l}.attn.hook_z`` is per query head also under
grouped-query attention), indexed ``(l, h)`` with ``l < L`` layers and ``h < H`` heads.

1. **Mean head outputs.** Over N clean K-shot prompts (dummy train queries,
   :func:`tvlens.prompts.sample_queries`),
   ``z̄[l, h] = (1/N) Σ_i z_{l,h}(prompt_i)[last]`` — ``[L, H, d_head]``, before ``W_O``.
2. **Average indirect effect.** On M prompts whose demonstration labels are shuffled
   (``PromptSet.build(..., shuffled=True)``), with ``y_i`` the first token of the query's
   correct answer:

       AIE[l, h] = (1/M) Σ_i  p(y_i | prompt_i ; z_{l,h}[last] ← z̄[l, h]) − p(y_i | prompt_i)

   Each head's patch is a :class:`~tvlens.interventions.HeadPatch`. :func:`indirect_effects`
   runs them through :func:`tvlens.runner.run_variants`: each prompt is repeated once per
   head of a chunk along the batch dimension and one ``index_put`` per layer writes a
   different head's mean into each copy; with ``prefix_cache`` the shared prompt prefix
   runs once into a checked KV cache and only the last token is recomputed per copy
   (exact up to float reduction order; the checks, the routes per transformers version
   and the ``True`` / ``"auto"`` / ``False`` semantics are in :mod:`tvlens.kv_cache`).
   The reference :func:`indirect_effects_loop` runs one full forward per head (Todd's
   original scheme).
3. **Function vector.** With ``S`` the top-k heads by AIE (:meth:`HeadTable.top
   <tvlens.results.HeadTable.top>`: largest first, NaN last, ties layer-major),

       FV = Σ_{(l,h) ∈ S} z̄[l, h] @ W_O[l, h]  (+ b_O[l] once per layer in S, when present)

   (an attention layer's output carries its bias once, not once per head).
4. Injected by **adding** FV to the residual after a chosen layer at the last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.extract.icl_tv import chunk_sum
from tvlens.heads import Head, all_heads, check_heads
from tvlens.interventions import HeadPatch, check_layer, z_hook_name
from tvlens.kv_cache import model_dtype
from tvlens.methods import DEFAULT_TEMPLATES, FVConfig
from tvlens.prompts import PromptBatch, PromptSet, sample_queries
from tvlens.results import HeadTable
from tvlens.runner import answer_probs, run, run_variants
from tvlens.tasks.task import Task
from tvlens.templates import Template, template_name
from tvlens.vector import TaskVector


FV_TEMPLATE = DEFAULT_TEMPLATES["fv"]  # the one table of per-method formats


@torch.no_grad()
def mean_head_outputs(
    model, task: Task, *, shots: int = 10, n_prompts: int = 32, template: str | Template = FV_TEMPLATE,
    batch_size: int = 8, seed: int = 0,
) -> Float[Tensor, "layer head d_head"]:
    """``z̄[l, h]``: mean ``hook_z`` of every query head at the last token of clean prompts.

    Args:
        shots: K demonstrations per prompt (Todd: 10).
        n_prompts: N prompts averaged (Todd: 100), dummy queries from the train split.
        batch_size: prompts per forward (float32 sums accumulate chunk by chunk).
    """
    prompts = PromptSet.build(model, task, queries=sample_queries(task, n_prompts, seed=seed, shots=shots),
                              shots=shots, template=template, seed=seed)
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    out = run(model, prompts, capture=names, capture_at="last", logits=None,
              batch_size=batch_size, desc="head outputs")
    z = torch.stack([out.captured[n] for n in names], dim=1)  # [N, L, H, d_head]
    return chunk_sum(z, batch_size) / len(prompts)


def shuffled_prompts(model, task: Task, *, shots: int = 10, n_prompts: int = 16,
                     template: str | Template = FV_TEMPLATE, seed: int = 1) -> PromptBatch:
    """M shuffled-label K-shot prompts (train queries), as one left-padded batch."""
    if shots < 2:
        raise TvlensError(f"shuffled-label prompts need at least 2 shots, got {shots}")
    queries = sample_queries(task, n_prompts, seed=seed, shots=shots)
    return PromptSet.build(model, task, queries=queries, shots=shots, template=template, seed=seed,
                           shuffled=True).batch


def _check_mean_z(model, mean_z: Tensor) -> None:
    expected = (int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head))
    if tuple(mean_z.shape) != expected:
        raise TvlensError(
            f"mean head outputs of shape {tuple(mean_z.shape)} do not fit this model "
            f"(expected [n_layers, n_heads, d_head] = {list(expected)}); compute them with "
            "mean_head_outputs(model, task)"
        )


def _setup(model, task, mean_z, heads, batch, *, shots, n_prompts, template, seed):
    _check_mean_z(model, mean_z)
    heads = all_heads(model) if heads is None else check_heads(model, heads)
    if batch is None:
        batch = shuffled_prompts(model, task, shots=shots, n_prompts=n_prompts, template=template,
                                 seed=seed)
    return heads, getattr(batch, "batch", batch)  # a PromptSet's tokens, or the batch itself


def _patch(mean_z: Tensor, head: Head) -> HeadPatch:
    """``z_{l,h}[last] ← z̄[l, h]`` in every prompt."""
    layer, h = head
    return HeadPatch([head], [mean_z[layer, h]])


def _table(model, heads: Sequence[Head], effects: Sequence[float]) -> Tensor:
    out = torch.full((int(model.cfg.n_layers), int(model.cfg.n_heads)), float("nan"))
    for (layer, h), e in zip(heads, effects):
        out[layer, h] = e
    return out


@torch.no_grad()
def indirect_effects(
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = 10,
    n_prompts: int = 16, template: str | Template = FV_TEMPLATE, batch_size: int = 64, seed: int = 1,
    heads: Sequence[Head] | None = None, prefix_cache: bool | str = "auto",
    batch: PromptBatch | PromptSet | None = None,
) -> Float[Tensor, "layer head"]:
    """AIE[l, h] of every head, batched across heads (see the module docstring).

    Args:
        mean_z: ``[L, H, d_head]`` from :func:`mean_head_outputs`.
        n_prompts: M shuffled-label prompts (Todd: 25).
        batch_size: rows per forward (prompts × heads of one chunk).
        heads: evaluate only these ``(layer, head)``; the others are NaN.
        prefix_cache: run the shared prefix once into a KV cache and only the last token
            per copy. ``True``: required (raises :class:`TvlensError` when the model has
            no KV cache or the cache fails its checks); ``"auto"``: when the model is a
            bridge over a Hugging Face model, falling back to full forwards with a
            ``RuntimeWarning`` if the cache fails its checks; ``False``: full forwards.
        batch: prebuilt prompts (overrides shots / n_prompts / template / seed).
    """
    heads, batch = _setup(model, task, mean_z, heads, batch, shots=shots, n_prompts=n_prompts,
                          template=template, seed=seed)
    out = run_variants(model, batch, [_patch(mean_z, head) for head in heads],
                       batch_size=batch_size, prefix_cache=prefix_cache, desc="indirect effects")
    effect = (out.probs - out.base.unsqueeze(0)).mean(1)  # [heads]: mean over prompts
    return _table(model, heads, effect.tolist())


@torch.no_grad()
def indirect_effects_loop(
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = 10,
    n_prompts: int = 16, template: str | Template = FV_TEMPLATE, seed: int = 1,
    heads: Sequence[Head] | None = None, batch: PromptBatch | PromptSet | None = None,
) -> Float[Tensor, "layer head"]:
    """Reference AIE: one full forward over the prompts per head (L·H forwards)."""
    heads, batch = _setup(model, task, mean_z, heads, batch, shots=shots, n_prompts=n_prompts,
                          template=template, seed=seed)

    def probs(patch) -> Tensor:  # [M]: p(y_i) at the last token, all prompts in one forward
        out = run(model, batch, patch, logits="last", batch_size=None, progress=False)
        return answer_probs(out.last_logits, batch)

    base = probs(None)
    return _table(model, heads, [float((probs(_patch(mean_z, head)) - base).mean())
                                 for head in heads])


def fv_from_heads(model, mean_z: Float[Tensor, "layer head d_head"],
                  heads: Sequence[Sequence[int]]) -> Float[Tensor, " d_model"]:
    """Σ_{(l,h)} z̄[l, h] @ W_O[l, h], plus b_O[l] once per distinct layer (when not None)."""
    _check_mean_z(model, mean_z)
    fv = torch.zeros(int(model.cfg.d_model))
    for layer in sorted({int(lh[0]) for lh in heads}):
        attn = model.blocks[layer].attn
        for lh in heads:
            if int(lh[0]) == layer:
                fv = fv + mean_z[layer, int(lh[1])].float().cpu() @ attn.W_O[int(lh[1])].detach().float().cpu()
        b_O = getattr(attn, "b_O", None)
        if b_O is not None:
            fv = fv + b_O.detach().float().cpu()
    return fv


def function_vector(
    model, task: Task, k: int = 10, *, layer: int | None = None, shots: int = 10,
    n_prompts: int = 32, n_ie_prompts: int = 16, template: str | Template = FV_TEMPLATE,
    batch_size: int = 64, seed: int = 0,
    mean_z: Tensor | None = None, aie: Tensor | None = None,
) -> TaskVector:
    """Todd's function vector from the top-``k`` heads by AIE (add mode, position "last").

    Args:
        layer: where it is added (default ``n_layers // 3``, Todd's usual choice).
        n_prompts: clean prompts for the mean head outputs (Todd: 100).
        n_ie_prompts: shuffled-label prompts for the indirect effects (Todd: 25).
        mean_z, aie: reuse precomputed tables (skips those steps).

    Returns:
        A :class:`TaskVector` whose ``history`` holds ``indirect_effects`` ``[L][H]`` and
        ``heads`` ``[[layer, head], ...]``; its ``hyperparameters`` are the
        :class:`~tvlens.methods.FVConfig` (template by name).
    """
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L * H:
        raise TvlensError(f"k={k!r} heads asked, but this model has {L} × {H} = {L * H} heads; "
                          f"use 1 <= k <= {L * H}")
    layer = L // 3 if layer is None else check_layer(model, layer)
    cfg = FVConfig(k=k, shots=shots, n_prompts=n_prompts, n_ie_prompts=n_ie_prompts,
                   template=template_name(template), seed=seed)
    if mean_z is None:
        mean_z = mean_head_outputs(model, task, shots=shots, n_prompts=n_prompts,
                                   template=template, seed=seed)
    if aie is None:
        aie = indirect_effects(model, task, mean_z, shots=shots, n_prompts=n_ie_prompts,
                               template=template, batch_size=batch_size, seed=seed + 1)
    heads = [list(lh) for lh in HeadTable(aie, "indirect_effect").top(k=k)]
    fv = fv_from_heads(model, mean_z, heads).to(device=model.cfg.device, dtype=model_dtype(model))
    return TaskVector.single(
        model, fv, layer, "last", mode="add", method=cfg.method, task=task.name,
        hyperparameters=cfg.to_dict(),
        history={"indirect_effects": aie.tolist(), "heads": heads},
    )
