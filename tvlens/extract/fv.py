"""Function vectors (Todd et al., ICLR 2024, "Function Vectors in Large Language Models").

Heads are *query* heads (``blocks.{l}.attn.hook_z`` is per query head also under
grouped-query attention), indexed ``(l, h)`` with ``l < L`` layers and ``h < H`` heads.

0. **Queries.** Todd's code (``src/evaluate_function_vector.py``) draws every query, with
   replacement, from the *validation* split, kept only where plain K-shot ICL ranks the
   first answer token first (``filter_set_validation``: ``clean_rank_list == 0``);
   demonstrations come from the train split. :func:`query_pool` is that pool (tvlens's
   ``dev`` split is his ``valid``); ``query_split="train", icl_filter=False`` gives tvlens
   0.1's unfiltered train queries.
1. **Mean head outputs.** Over N clean K-shot prompts (queries sampled from the pool,
   :func:`tvlens.prompts.sample_queries`; Todd: N = 100),
   ``z̄[l, h] = (1/N) Σ_i z_{l,h}(prompt_i)[last]`` — ``[L, H, d_head]``, before ``W_O``.
2. **Average indirect effect.** On M prompts (Todd: M = 25) whose demonstration labels are
   shuffled (``PromptSet.build(..., shuffled=True)``), with ``y_i`` the first token of the
   query's correct answer:

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

       FV = Σ_{(l,h) ∈ S} (z̄[l, h] @ W_O[l, h] + b_O[l])                 bias="per_head"
       FV = Σ_{(l,h) ∈ S} z̄[l, h] @ W_O[l, h] + Σ_{l ∈ layers(S)} b_O[l]   bias="per_layer"

   ``per_head`` is Todd's ``compute_function_vector`` (``src/utils/extract_utils.py``): each
   head's term is ``out_proj(x)`` with ``x`` zero but for that head's slice, so the bias
   comes once per head. ``per_layer`` counts it once per layer, as an attention layer's own
   output does. The two agree on models without an output bias (Llama, SmolLM2).
4. Injected by **adding** FV to the residual after a chosen layer at the last token.

**Post-attention norms** (Gemma-2/3: ``blocks.{l}.ln1_post`` normalises the attention
output before the residual add). There a head's ``z̄ @ W_O`` is not what it adds to the
residual, so each layer's terms pass through that norm with its scale frozen at the clean
prompts' mean — the linearisation direct logit attribution uses for any norm:

       FV = Σ_{l ∈ layers(S)} g_l ⊙ (Σ_{h: (l,h) ∈ S} z̄[l, h] @ W_O[l, h] + bias terms) / s̄_l

with ``g_l`` the norm's gain (``1 + w`` under ``rmsnorm_uses_offset``) and ``s̄_l`` the mean
over the same N clean prompts of its scale ``blocks.{l}.ln1_post.hook_scale`` at the last
token (:func:`post_norm_scales`). With every head of a layer selected and N = 1 this is
exactly that layer's attention contribution to the residual (tested). Todd's code, written
for models without post-norms, adds the raw ``out_proj`` sum, which on Gemma is not a
residual-stream quantity at all (measurements: ``docs/results/history/extracted.md``).
Models without post-norms are unchanged.
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
from tvlens.tasks.task import Pair, Task
from tvlens.templates import Template, template_name
from tvlens.vector import TaskVector


FV_TEMPLATE = DEFAULT_TEMPLATES["fv"]  # the one table of per-method formats
_FV = FVConfig()  # the defaults (Todd's settings)
BIAS_RULES = ("per_head", "per_layer")


def query_pool(model, task: Task, *, split: str = _FV.query_split, icl_filter: bool = _FV.icl_filter,
               shots: int = _FV.shots, template: str | Template = FV_TEMPLATE, seed: int = 0,
               batch_size: int = 16) -> list[Pair]:
    """The pairs FV's queries are drawn from: ``split``'s items, with ``icl_filter`` only
    those that K-shot ICL answers correctly (first token ranked first, demonstrations from
    train seeded by ``seed``) — Todd's ``filter_set_validation`` (module docstring, step 0).
    """
    items = list(task.split(split))
    if not items:
        raise TvlensError(f"task {task.name!r} has no {split} items to draw FV queries from; "
                          "use query_split='train' (CLI: --query-split train)")
    if not icl_filter:
        return items
    from tvlens.evaluation import evaluate  # evaluation imports the extraction floor's neighbours

    result = evaluate(model, task, shots=shots, split=split, template=template, seed=seed,
                      batch_size=batch_size, progress=False)
    keep = [pair for pair, ok in zip(items, result.records["correct"]) if ok]
    if not keep:
        raise TvlensError(
            f"FV's ICL filter kept none of the {len(items)} {split} items of {task.name!r}: "
            f"{shots}-shot ICL answers none correctly, so there is no in-context function to "
            "extract; check the task and format, or pass icl_filter=False (CLI: --no-icl-filter)"
        )
    return keep


def _queries(model, task, n, *, pool, shots, template, seed) -> list[Pair]:
    """``n`` queries sampled with replacement from ``pool`` (default: :func:`query_pool`)."""
    if pool is None:
        pool = query_pool(model, task, shots=shots, template=template, seed=seed)
    return sample_queries(task, n, seed=seed, shots=shots, pool=pool)


def _clean_prompts(model, task, n_prompts, *, pool, shots, template, seed) -> PromptSet:
    queries = _queries(model, task, n_prompts, pool=pool, shots=shots, template=template, seed=seed)
    return PromptSet.build(model, task, queries=queries, shots=shots, template=template, seed=seed)


def post_norm_names(model) -> list[str] | None:
    """``blocks.{l}.ln1_post`` per layer when the model normalises attention outputs before
    the residual add (Gemma-2/3), else None
    (:func:`tvlens.attribution.readout.post_norm_names`, the one reader of a model's norms)."""
    from tvlens.attribution.readout import post_norm_names as names  # local: attribution imports extract

    return names(model, "ln1_post")


@torch.no_grad()
def post_norm_scales(
    model, task: Task, *, shots: int = _FV.shots, n_prompts: int = _FV.n_prompts,
    template: str | Template = FV_TEMPLATE, batch_size: int = 8, seed: int = 0,
    pool: Sequence[Pair] | None = None,
) -> Float[Tensor, " layer"]:
    """``s̄[l]``: the mean scale of ``blocks.{l}.ln1_post`` at the last token of the clean
    prompts :func:`mean_head_outputs` averages over (same arguments, same prompts)."""
    names = post_norm_names(model)
    if names is None:
        raise TvlensError("this model has no post-attention norms (blocks.{l}.ln1_post); "
                          "its function vector needs no scales")
    prompts = _clean_prompts(model, task, n_prompts, pool=pool, shots=shots, template=template, seed=seed)
    hooks = [f"{n}.hook_scale" for n in names]
    out = run(model, prompts, capture=hooks, capture_at="last", logits=None,
              batch_size=batch_size, desc="post-norm scales")
    scales = torch.stack([out.captured[n].float().reshape(len(prompts)) for n in hooks], dim=1)
    return chunk_sum(scales, batch_size) / len(prompts)


@torch.no_grad()
def mean_head_outputs(
    model, task: Task, *, shots: int = _FV.shots, n_prompts: int = _FV.n_prompts,
    template: str | Template = FV_TEMPLATE, batch_size: int = 8, seed: int = 0,
    pool: Sequence[Pair] | None = None,
) -> Float[Tensor, "layer head d_head"]:
    """``z̄[l, h]``: mean ``hook_z`` of every query head at the last token of clean prompts.

    Args:
        shots: K demonstrations per prompt (Todd: 10), from the train split.
        n_prompts: N prompts averaged (Todd: 100).
        batch_size: prompts per forward (float32 sums accumulate chunk by chunk).
        pool: the pairs queries are sampled from (default: :func:`query_pool`, Todd's
            ICL-correct dev items; ``task.train`` for tvlens 0.1's dummy train queries).
    """
    prompts = _clean_prompts(model, task, n_prompts, pool=pool, shots=shots, template=template, seed=seed)
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    out = run(model, prompts, capture=names, capture_at="last", logits=None,
              batch_size=batch_size, desc="head outputs")
    z = torch.stack([out.captured[n] for n in names], dim=1)  # [N, L, H, d_head]
    return chunk_sum(z, batch_size) / len(prompts)


def shuffled_prompts(model, task: Task, *, shots: int = _FV.shots, n_prompts: int = _FV.n_ie_prompts,
                     template: str | Template = FV_TEMPLATE, seed: int = 1,
                     pool: Sequence[Pair] | None = None) -> PromptBatch:
    """M shuffled-label K-shot prompts (queries from ``pool``, as in
    :func:`mean_head_outputs`), as one left-padded batch."""
    if shots < 2:
        raise TvlensError(f"shuffled-label prompts need at least 2 shots, got {shots}")
    queries = _queries(model, task, n_prompts, pool=pool, shots=shots, template=template, seed=seed)
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


def _setup(model, task, mean_z, heads, batch, *, shots, n_prompts, template, seed, pool):
    _check_mean_z(model, mean_z)
    heads = all_heads(model) if heads is None else check_heads(model, heads)
    if batch is None:
        batch = shuffled_prompts(model, task, shots=shots, n_prompts=n_prompts, template=template,
                                 seed=seed, pool=pool)
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
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = _FV.shots,
    n_prompts: int = _FV.n_ie_prompts, template: str | Template = FV_TEMPLATE, batch_size: int = 64,
    seed: int = 1, heads: Sequence[Head] | None = None, prefix_cache: bool | str = "auto",
    batch: PromptBatch | PromptSet | None = None, pool: Sequence[Pair] | None = None,
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
        batch: prebuilt prompts (overrides shots / n_prompts / template / seed / pool).
        pool: the pairs queries are sampled from (as in :func:`mean_head_outputs`).
    """
    heads, batch = _setup(model, task, mean_z, heads, batch, shots=shots, n_prompts=n_prompts,
                          template=template, seed=seed, pool=pool)
    out = run_variants(model, batch, [_patch(mean_z, head) for head in heads],
                       batch_size=batch_size, prefix_cache=prefix_cache, desc="indirect effects")
    effect = (out.probs - out.base.unsqueeze(0)).mean(1)  # [heads]: mean over prompts
    return _table(model, heads, effect.tolist())


@torch.no_grad()
def indirect_effects_loop(
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = _FV.shots,
    n_prompts: int = _FV.n_ie_prompts, template: str | Template = FV_TEMPLATE, seed: int = 1,
    heads: Sequence[Head] | None = None, batch: PromptBatch | PromptSet | None = None,
    pool: Sequence[Pair] | None = None,
) -> Float[Tensor, "layer head"]:
    """Reference AIE: one full forward over the prompts per head (L·H forwards)."""
    heads, batch = _setup(model, task, mean_z, heads, batch, shots=shots, n_prompts=n_prompts,
                          template=template, seed=seed, pool=pool)

    def probs(patch) -> Tensor:  # [M]: p(y_i) at the last token, all prompts in one forward
        out = run(model, batch, patch, logits="last", batch_size=None, progress=False)
        return answer_probs(out.last_logits, batch)

    base = probs(None)
    return _table(model, heads, [float((probs(_patch(mean_z, head)) - base).mean())
                                 for head in heads])


def fv_from_heads(model, mean_z: Float[Tensor, "layer head d_head"],
                  heads: Sequence[Sequence[int]], *, bias: str = _FV.bias,
                  post_scales: Float[Tensor, " layer"] | None = None) -> Float[Tensor, " d_model"]:
    """Σ_{(l,h)} z̄[l, h] @ W_O[l, h] plus the output bias b_O[l] (when not None) once per
    head (``bias="per_head"``, Todd's) or once per distinct layer (``"per_layer"``); on a
    model with post-attention norms each layer's sum through that norm, its scale frozen at
    ``post_scales`` (:func:`post_norm_scales`, required there; module docstring)."""
    from tvlens.attribution.readout import norm_gain

    _check_mean_z(model, mean_z)
    if bias not in BIAS_RULES:
        raise TvlensError(f"unknown bias rule {bias!r}; use one of {', '.join(BIAS_RULES)}")
    post = post_norm_names(model)
    if post is not None and post_scales is None:
        raise TvlensError("this model normalises attention outputs before the residual add "
                          "(blocks.{l}.ln1_post), so head terms need that norm's scale: pass "
                          "post_scales=post_norm_scales(model, task, ...)")
    fv = torch.zeros(int(model.cfg.d_model))
    for layer in sorted({int(lh[0]) for lh in heads}):
        attn = model.blocks[layer].attn
        in_layer = [int(lh[1]) for lh in heads if int(lh[0]) == layer]
        term = torch.zeros(int(model.cfg.d_model))
        for h in in_layer:
            term = term + mean_z[layer, h].float().cpu() @ attn.W_O[h].detach().float().cpu()
        b_O = getattr(attn, "b_O", None)
        if b_O is not None:
            term = term + b_O.detach().float().cpu() * (len(in_layer) if bias == "per_head" else 1)
        if post is not None:
            gain = norm_gain(model, model.blocks[layer].ln1_post).cpu()
            term = term * gain / float(post_scales[layer])
        fv = fv + term
    return fv


def function_vector(
    model, task: Task, k: int = _FV.k, *, layer: int | None = None, shots: int = _FV.shots,
    n_prompts: int = _FV.n_prompts, n_ie_prompts: int = _FV.n_ie_prompts,
    template: str | Template = FV_TEMPLATE, query_split: str = _FV.query_split,
    icl_filter: bool = _FV.icl_filter, bias: str = _FV.bias, batch_size: int = 64, seed: int = 0,
    mean_z: Tensor | None = None, aie: Tensor | None = None,
) -> TaskVector:
    """Todd's function vector from the top-``k`` heads by AIE (add mode, position "last").

    The defaults are Todd's (module docstring): queries from the ICL-correct dev items,
    N = 100 clean and M = 25 shuffled prompts, the output bias once per head.

    Args:
        layer: where it is added (default ``n_layers // 3``, Todd's usual choice).
        n_prompts: clean prompts for the mean head outputs (Todd: 100).
        n_ie_prompts: shuffled-label prompts for the indirect effects (Todd: 25).
        query_split, icl_filter: where queries come from (:func:`query_pool`).
        bias: ``"per_head"`` (Todd) or ``"per_layer"`` (:func:`fv_from_heads`).
        mean_z, aie: reuse precomputed tables (skips those steps).

    Returns:
        A :class:`TaskVector` whose ``history`` holds ``indirect_effects`` ``[L][H]``,
        ``heads`` ``[[layer, head], ...]`` and ``query_pool`` (how many pairs queries were
        drawn from); its ``hyperparameters`` are the :class:`~tvlens.methods.FVConfig`
        (template by name).
    """
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L * H:
        raise TvlensError(f"k={k!r} heads asked, but this model has {L} × {H} = {L * H} heads; "
                          f"use 1 <= k <= {L * H}")
    layer = L // 3 if layer is None else check_layer(model, layer)
    if bias not in BIAS_RULES:
        raise TvlensError(f"unknown bias rule {bias!r}; use one of {', '.join(BIAS_RULES)}")
    cfg = FVConfig(k=k, shots=shots, n_prompts=n_prompts, n_ie_prompts=n_ie_prompts,
                   template=template_name(template), query_split=query_split,
                   icl_filter=icl_filter, bias=bias, seed=seed)
    pool = None
    if mean_z is None or aie is None:
        pool = query_pool(model, task, split=query_split, icl_filter=icl_filter, shots=shots,
                          template=template, seed=seed)
    if mean_z is None:
        mean_z = mean_head_outputs(model, task, shots=shots, n_prompts=n_prompts,
                                   template=template, seed=seed, pool=pool)
    if aie is None:
        aie = indirect_effects(model, task, mean_z, shots=shots, n_prompts=n_ie_prompts,
                               template=template, batch_size=batch_size, seed=seed + 1, pool=pool)
    heads = [list(lh) for lh in HeadTable(aie, "indirect_effect").top(k=k)]
    post_scales = None
    if post_norm_names(model) is not None:  # Gemma-2/3: fold ln1_post (module docstring)
        if pool is None:
            pool = query_pool(model, task, split=query_split, icl_filter=icl_filter, shots=shots,
                              template=template, seed=seed)
        post_scales = post_norm_scales(model, task, shots=shots, n_prompts=n_prompts,
                                       template=template, seed=seed, pool=pool)
    fv = fv_from_heads(model, mean_z, heads, bias=bias, post_scales=post_scales).to(
        device=model.cfg.device, dtype=model_dtype(model))
    history = {"indirect_effects": aie.tolist(), "heads": heads}
    if post_scales is not None:
        history["post_norm_scales"] = post_scales.tolist()
    if pool is not None:
        history["query_pool"] = len(pool)
    return TaskVector.single(
        model, fv, layer, "last", mode="add", method=cfg.method, task=task.name,
        hyperparameters=cfg.to_dict(), history=history,
    )
