"""Function vectors (Todd et al., ICLR 2024, "Function Vectors in Large Language Models").

Heads are *query* heads (``blocks.{l}.attn.hook_z`` is per query head also under
grouped-query attention), indexed ``(l, h)`` with ``l < L`` layers and ``h < H`` heads.

1. **Mean head outputs.** Over N clean K-shot prompts (dummy train queries),
   ``z̄[l, h] = (1/N) Σ_i z_{l,h}(prompt_i)[last]`` — ``[L, H, d_head]``, before ``W_O``.
2. **Average indirect effect.** On M prompts whose demonstration labels are shuffled
   (:func:`tvlens.prompts.make_examples` with ``shuffle_labels=True``), with ``y_i`` the
   first token of the query's correct answer:

       AIE[l, h] = (1/M) Σ_i  p(y_i | prompt_i ; z_{l,h}[last] ← z̄[l, h]) − p(y_i | prompt_i)

   :func:`indirect_effects` batches heads: each prompt is repeated once per head of a
   chunk along the batch dimension, and one hook per layer writes a different head's
   mean into each copy. The reference :func:`indirect_effects_loop` runs one full forward
   per head (Todd's original scheme).

   **Prefix KV cache** (``prefix_cache``). Patching the last position cannot change
   earlier positions (causal attention), so the prompt prefix (all but the last column;
   batches are left-padded, so the last column is every row's last token) can run once
   and only the last token be recomputed per copy — exact up to float reduction order.
   This needs a bridge over a Hugging Face model (``model.original_model`` a
   ``transformers.PreTrainedModel``) and depends on exactly this:

   - a ``transformers.DynamicCache(config=hf_config)`` that tvlens creates and owns, and
     its public ``get_seq_length(layer_idx)`` and ``batch_repeat_interleave(n)`` (plus a
     ``copy.deepcopy`` per chunk);
   - handing that cache to the bridge's ``forward`` / ``run_with_hooks`` under the name
     the installed ``LlamaForCausalLM.forward``-style signature declares:
     ``past_key_values=`` (transformers ≤ 5.23; TransformerBridge's documented KV entry
     point) or ``cache=`` (transformers ≥ 5.24, which renamed it and deprecates
     ``past_key_values``);
   - on transformers ≥ 5.24 with TransformerLens 4.3, whose reimplemented attention
     (``AttentionBridge._update_kv_cache``) still reads only ``past_key_values`` or
     ``layer_past`` from its kwargs while HF now passes ``cache=``, the cache stays empty;
     tvlens then passes the same object also as ``layer_past=`` (HF forwards unknown
     kwargs down to every attention module), the alias that bridge reads. Which of the
     two routes fills the cache is decided by a one-token probe forward first.

   Whatever route is used, it is checked before use: every layer of the cache must hold
   exactly the prefix length (``ids.shape[1] - 1``) of positions, and the unpatched
   cached last-token distribution must equal a full forward's within
   :func:`_cache_check_atol` (1e-4 in float32). If a check fails, ``prefix_cache=True``
   raises :class:`TvlensError`; ``"auto"`` warns (``RuntimeWarning``) and runs full
   forwards. Tested with TransformerLens 4.3.0 on transformers 5.23.0 (``past_key_values``)
   and 5.24.0 (``cache`` + ``layer_past``), on SmolLM2-135M (Llama). Native bridges
   (``boot_native``) keep no KV cache, so they always run full forwards.
3. **Function vector.** With ``S`` the top-k heads by AIE,

       FV = Σ_{(l,h) ∈ S} z̄[l, h] @ W_O[l, h]  (+ b_O[l] once per layer in S, when present)

   (an attention layer's output carries its bias once, not once per head).
4. Injected by **adding** FV to the residual after a chosen layer at the last token.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.activations import at_position, capture
from tvlens.errors import TvlensError
from tvlens.heads import Head, all_heads, check_heads
from tvlens.extract.icl_tv import _dtype, dummy_queries
from tvlens.injection import check_layer
from tvlens.prompts import PromptBatch, Template, get_template, make_examples, tokenize
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector



def z_hook_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@torch.no_grad()
def mean_head_outputs(
    model, task: Task, *, shots: int = 10, n_prompts: int = 32, template: str | Template = "qa",
    batch_size: int = 8, seed: int = 0,
) -> Float[Tensor, "layer head d_head"]:
    """``z̄[l, h]``: mean ``hook_z`` of every query head at the last token of clean prompts.

    Args:
        shots: K demonstrations per prompt (Todd: 10).
        n_prompts: N prompts averaged (Todd: 100), dummy queries from the train split.
    """
    template = get_template(template)
    examples = make_examples(dummy_queries(task, shots, n_prompts, seed), task.train,
                             shots=shots, seed=seed)
    L = int(model.cfg.n_layers)
    names = [z_hook_name(layer) for layer in range(L)]
    total = None
    for start in range(0, len(examples), _positive(batch_size, "batch_size")):
        batch = tokenize(model, examples[start : start + batch_size], template)
        store = capture(model, batch, names)
        z = torch.stack([at_position(store[n], batch, "last").float() for n in names], dim=1)
        total = z.sum(0) if total is None else total + z.sum(0)  # [L, H, d_head]
    return total / len(examples)


def shuffled_prompts(model, task: Task, *, shots: int = 10, n_prompts: int = 16,
                     template: str | Template = "qa", seed: int = 1) -> PromptBatch:
    """M shuffled-label K-shot prompts (train queries), as one left-padded batch."""
    if shots < 2:
        raise TvlensError(f"shuffled-label prompts need at least 2 shots, got {shots}")
    queries = dummy_queries(task, shots, n_prompts, seed)
    examples = make_examples(queries, task.train, shots=shots, seed=seed, shuffle_labels=True)
    return tokenize(model, examples, get_template(template))


def _positive(x: int, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
        raise TvlensError(f"{what} must be a positive integer, got {x!r}")
    return x


def _check_mean_z(model, mean_z: Tensor) -> None:
    expected = (int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head))
    if tuple(mean_z.shape) != expected:
        raise TvlensError(
            f"mean head outputs of shape {tuple(mean_z.shape)} do not fit this model "
            f"(expected [n_layers, n_heads, d_head] = {list(expected)}); compute them with "
            "mean_head_outputs(model, task)"
        )


def _heads(model, heads: Sequence[Head] | None) -> list[Head]:
    return all_heads(model) if heads is None else check_heads(model, heads)


def _patch_hooks(heads: Sequence[Head], mean_z: Tensor, n_prompts: int, cols: Tensor) -> list:
    """One hook per layer: copy ``i * c + j`` (prompt i, head j) gets z̄ of head j at ``cols``."""
    c = len(heads)
    by_layer: dict[int, list[int]] = {}
    for j, (layer, _) in enumerate(heads):
        by_layer.setdefault(layer, []).append(j)
    hooks = []
    for layer, js in by_layer.items():
        j_t = torch.tensor(js, dtype=torch.long)
        rows = (torch.arange(n_prompts).unsqueeze(1) * c + j_t).reshape(-1)  # [n_prompts * |js|]
        head_idx = torch.tensor([heads[j][1] for j in js]).repeat(n_prompts)
        vals = mean_z[layer, head_idx]  # [rows, d_head]

        def hook(z, hook=None, rows=rows, head_idx=head_idx, vals=vals):
            r = rows.to(z.device)
            return z.index_put((r, cols.to(z.device)[r], head_idx.to(z.device)),
                               vals.to(device=z.device, dtype=z.dtype))

        hooks.append((z_hook_name(layer), hook))
    return hooks


def _answer_probs(logits_last: Tensor, targets: Tensor) -> Tensor:
    return logits_last.float().softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _hf_model(model):
    """The Hugging Face model under a bridge, or None (native and other backends)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    hf = getattr(model, "original_model", None)
    return hf if isinstance(hf, PreTrainedModel) else None


def _cache_forms(hf) -> list[Callable[[Any], dict]]:
    """Ways to hand a cache to the bridge, in order of preference (module docstring)."""
    params = inspect.signature(hf.forward).parameters
    if "past_key_values" in params:  # transformers <= 5.23: the bridge's documented kwarg
        return [lambda kv: {"past_key_values": kv}]
    if "cache" in params:  # transformers >= 5.24
        return [lambda kv: {"cache": kv, "use_cache": True},
                # TransformerLens 4.3's attention reads `layer_past`, not `cache`
                lambda kv: {"cache": kv, "layer_past": kv, "use_cache": True}]
    return []


def _cache_check_atol(model) -> float:
    """Largest |p_cached − p_full| over the vocabulary accepted for the unpatched last token.

    Cached and full forwards differ only in float reduction order. In float32, SmolLM2's
    last-token logits then differ by ~3e-5 (relative ~1e-6 over 30 layers), and a softmax
    moves each probability by at most half the largest logit change, so 1e-4 leaves a
    few-fold margin while a cache without the prefix moves probabilities by O(0.1). In
    16-bit the logits' own rounding (bfloat16: 2^-8 relative, ~0.1 at |logit| 20) allows
    changes of a few 1e-2, hence 5e-2.
    """
    dtype = _dtype(model)
    floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    bits = torch.finfo(dtype).bits if floating else 32
    return 1e-4 if bits >= 32 else 5e-2


def _prefix_cache(model, ids: Tensor,
                  mask: Tensor) -> tuple[Any, Callable[[Any], dict] | None, str]:
    """Run the prefix ``ids[:, :-1]`` once into a KV cache.

    Returns ``(cache, form, "")`` where ``form(cache)`` gives the forward kwargs, or
    ``(None, None, why)`` when no route fills the cache with exactly the prefix.
    """
    hf = _hf_model(model)
    if hf is None:
        name = type(getattr(model, "original_model", model)).__name__
        return None, None, f"this model ({name}) keeps no Hugging Face KV cache"
    forms = _cache_forms(hf)
    if not forms:
        return None, None, (f"{type(hf).__name__}.forward takes neither `past_key_values` nor "
                            "`cache`, so it has no KV cache tvlens knows how to pass")
    from transformers import DynamicCache

    n_layers = int(model.cfg.n_layers)

    def fill(form, x: Tensor, m: Tensor) -> tuple[Any, str]:
        kv = DynamicCache(config=hf.config)
        try:
            model(x, attention_mask=m, **form(kv))
        except (TypeError, ValueError) as e:  # this route is refused by this transformers
            return None, f"the prefix forward with a KV cache failed ({type(e).__name__}: {e})"
        lengths = sorted({int(kv.get_seq_length(layer)) for layer in range(n_layers)})
        if lengths != [x.shape[1]]:
            return None, (f"after the prefix forward the KV cache holds {lengths} positions per "
                          f"layer, not the prefix length {x.shape[1]}")
        return kv, ""

    for i, form in enumerate(forms):
        # a one-token probe rules a route out without a wasted prefix forward; the last
        # route runs the prefix regardless, so a refusal names the prefix it failed on
        if i < len(forms) - 1:
            probe, _ = fill(form, ids[:1, -1:], torch.ones_like(mask[:1, -1:]))
            if probe is None:
                continue
        kv, why = fill(form, ids[:, :-1], mask[:, :-1])
        if kv is not None:
            return kv, form, ""
    return None, None, why


@torch.no_grad()
def indirect_effects(
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = 10,
    n_prompts: int = 16, template: str | Template = "qa", batch_size: int = 64, seed: int = 1,
    heads: Sequence[Head] | None = None, prefix_cache: bool | str = "auto",
    batch: PromptBatch | None = None,
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
    if not (prefix_cache is True or prefix_cache is False or prefix_cache == "auto"):
        raise TvlensError(f"prefix_cache must be True, False or 'auto', got {prefix_cache!r}")
    _check_mean_z(model, mean_z)
    heads = _heads(model, heads)
    batch = batch if batch is not None else shuffled_prompts(
        model, task, shots=shots, n_prompts=n_prompts, template=template, seed=seed)
    B = len(batch)
    chunk = max(1, _positive(batch_size, "batch_size") // B)
    device = model.cfg.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    targets = batch.first_answer_ids.to(device)
    cache = form = base_logits = None

    def last_logits(c: int, hooks: list) -> Tensor:  # [B * c, vocab]: c copies per prompt
        m = mask.repeat_interleave(c, 0)
        if cache is not None:
            kv = copy.deepcopy(cache)
            if c > 1:
                kv.batch_repeat_interleave(c)
            logits = model.run_with_hooks(ids[:, -1:].repeat_interleave(c, 0), attention_mask=m,
                                          fwd_hooks=hooks, **form(kv))
        else:
            logits = model.run_with_hooks(ids.repeat_interleave(c, 0), attention_mask=m,
                                          fwd_hooks=hooks)
        return logits[:, -1]

    if prefix_cache is not False and ids.shape[1] > 1:
        cache, form, why = _prefix_cache(model, ids, mask)
        if cache is not None:  # the unpatched cached last token must match a full forward
            full = model(ids, attention_mask=mask)[:, -1].float().softmax(-1)
            base_logits = last_logits(1, [])
            diff = float((base_logits.float().softmax(-1) - full).abs().max())
            atol = _cache_check_atol(model)
            if not diff <= atol:
                cache = form = base_logits = None
                why = (f"with the KV cache the unpatched last-token probabilities differ from a "
                       f"full forward's by {diff:.2g} (> {atol:g} allowed in {_dtype(model)})")
        if cache is None:
            if prefix_cache is True:
                raise TvlensError(f"prefix_cache=True, but {why}; use prefix_cache=False "
                                  "(or 'auto')")
            if _hf_model(model) is not None:  # a cache was expected: say why it is not used
                warnings.warn(f"indirect_effects: prefix KV cache not used ({why}); running "
                              "full forwards instead (same result, slower)", RuntimeWarning,
                              stacklevel=3)

    def run(c: int, hooks: list) -> Tensor:  # last-token answer probs of c copies per prompt
        return _answer_probs(last_logits(c, hooks), targets.repeat_interleave(c, 0)).view(B, c)

    # every row's last token is the last column (prompts are left-padded)
    cols = torch.full((B * chunk,), 0 if cache is not None else ids.shape[1] - 1)
    base = (run(1, [])[:, 0] if base_logits is None  # [B]
            else _answer_probs(base_logits, targets))  # the checked cached forward, reused
    out = torch.full((int(model.cfg.n_layers), int(model.cfg.n_heads)), float("nan"))
    for start in range(0, len(heads), chunk):
        part = heads[start : start + chunk]
        probs = run(len(part), _patch_hooks(part, mean_z, B, cols))  # [B, c]
        effect = (probs - base.unsqueeze(1)).mean(0).cpu()
        for (layer, h), e in zip(part, effect.tolist()):
            out[layer, h] = e
    return out


@torch.no_grad()
def indirect_effects_loop(
    model, task: Task, mean_z: Float[Tensor, "layer head d_head"], *, shots: int = 10,
    n_prompts: int = 16, template: str | Template = "qa", seed: int = 1,
    heads: Sequence[Head] | None = None, batch: PromptBatch | None = None,
) -> Float[Tensor, "layer head"]:
    """Reference AIE: one full forward over the prompts per head (L·H forwards)."""
    _check_mean_z(model, mean_z)
    heads = _heads(model, heads)
    batch = batch if batch is not None else shuffled_prompts(
        model, task, shots=shots, n_prompts=n_prompts, template=template, seed=seed)
    device = model.cfg.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    targets = batch.first_answer_ids.to(device)
    last = batch.position_index("last").to(device)
    rows = torch.arange(len(batch), device=device)

    def probs(hooks):
        logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)
        return _answer_probs(logits[rows, last], targets)

    base = probs([])
    out = torch.full((int(model.cfg.n_layers), int(model.cfg.n_heads)), float("nan"))
    for layer, h in heads:
        def hook(z, hook=None, layer=layer, h=h):
            return z.index_put((rows, last, torch.full_like(rows, h)),
                               mean_z[layer, h].to(device=z.device, dtype=z.dtype).expand(len(rows), -1))
        out[layer, h] = float((probs([(z_hook_name(layer), hook)]) - base).mean())
    return out


def top_heads(aie: Float[Tensor, "layer head"], k: int) -> list[list[int]]:
    """The ``k`` heads of largest AIE as ``[[layer, head], ...]``, largest first (NaN last)."""
    L, H = aie.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L * H:
        raise TvlensError(f"k={k!r} heads asked, but this model has {L} × {H} = {L * H} heads; "
                          f"use 1 <= k <= {L * H}")
    flat = torch.nan_to_num(aie.flatten().float(), nan=-float("inf"))
    idx = torch.argsort(flat, descending=True, stable=True)[:k].tolist()
    return [[i // H, i % H] for i in idx]


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
    n_prompts: int = 32, n_ie_prompts: int = 16, template: str | Template = "qa",
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
        ``heads`` ``[[layer, head], ...]``.
    """
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= L * H:
        raise TvlensError(f"k={k!r} heads asked, but this model has {L} × {H} = {L * H} heads; "
                          f"use 1 <= k <= {L * H}")
    layer = L // 3 if layer is None else check_layer(model, layer)
    template = get_template(template)
    if mean_z is None:
        mean_z = mean_head_outputs(model, task, shots=shots, n_prompts=n_prompts,
                                   template=template, seed=seed)
    if aie is None:
        aie = indirect_effects(model, task, mean_z, shots=shots, n_prompts=n_ie_prompts,
                               template=template, batch_size=batch_size, seed=seed + 1)
    heads = top_heads(aie, k)
    fv = fv_from_heads(model, mean_z, heads).to(device=model.cfg.device, dtype=_dtype(model))
    return TaskVector.single(
        model, fv, layer, "last", mode="add", method="fv", task=task.name,
        hyperparameters={"k": k, "shots": shots, "n_prompts": n_prompts,
                         "n_ie_prompts": n_ie_prompts, "template": template.demo, "seed": seed},
        history={"indirect_effects": aie.tolist(), "heads": heads},
    )
