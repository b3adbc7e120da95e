"""Prefix KV cache: run the shared prompt prefix once, then only the last token per copy.

Patching the last position cannot change
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
:func:`cache_check_atol` (1e-4 in float32). If a check fails, ``prefix_cache=True``
raises :class:`TvlensError`; ``"auto"`` warns (``RuntimeWarning``) and runs full
forwards. Tested with TransformerLens 4.3.0 on transformers 5.23.0 (``past_key_values``)
and 5.24.0 (``cache`` + ``layer_past``), on SmolLM2-135M (Llama). Native bridges
(``boot_native``) keep no KV cache, so they always run full forwards.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def model_dtype(model) -> torch.dtype:
    """The dtype a bridge computes in (float32 when the config does not say)."""
    return getattr(model.cfg, "dtype", torch.float32) or torch.float32


def hf_model(model):
    """The Hugging Face model under a bridge, or None (native and other backends)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    hf = getattr(model, "original_model", None)
    return hf if isinstance(hf, PreTrainedModel) else None


def cache_forms(hf) -> list[Callable[[Any], dict]]:
    """Ways to hand a cache to the bridge, in order of preference (module docstring)."""
    params = inspect.signature(hf.forward).parameters
    if "past_key_values" in params:  # transformers <= 5.23: the bridge's documented kwarg
        return [lambda kv: {"past_key_values": kv}]
    if "cache" in params:  # transformers >= 5.24
        return [lambda kv: {"cache": kv, "use_cache": True},
                # TransformerLens 4.3's attention reads `layer_past`, not `cache`
                lambda kv: {"cache": kv, "layer_past": kv, "use_cache": True}]
    return []


def cache_check_atol(model) -> float:
    """Largest |p_cached − p_full| over the vocabulary accepted for the unpatched last token.

    Cached and full forwards differ only in float reduction order. In float32, SmolLM2's
    last-token logits then differ by ~3e-5 (relative ~1e-6 over 30 layers), and a softmax
    moves each probability by at most half the largest logit change, so 1e-4 leaves a
    few-fold margin while a cache without the prefix moves probabilities by O(0.1). In
    16-bit the logits' own rounding (bfloat16: 2^-8 relative, ~0.1 at |logit| 20) allows
    changes of a few 1e-2, hence 5e-2.
    """
    dtype = model_dtype(model)
    floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    bits = torch.finfo(dtype).bits if floating else 32
    return 1e-4 if bits >= 32 else 5e-2


def prefix_cache(model, ids: Tensor,
                  mask: Tensor) -> tuple[Any, Callable[[Any], dict] | None, str]:
    """Run the prefix ``ids[:, :-1]`` once into a KV cache.

    Returns ``(cache, form, "")`` where ``form(cache)`` gives the forward kwargs, or
    ``(None, None, why)`` when no route fills the cache with exactly the prefix.
    """
    hf = hf_model(model)
    if hf is None:
        name = type(getattr(model, "original_model", model)).__name__
        return None, None, f"this model ({name}) keeps no Hugging Face KV cache"
    forms = cache_forms(hf)
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


class PrefixCache:
    """A checked KV cache of ``ids[:, :-1]``: ``last_logits(c, hooks)`` runs only the last
    column, for ``c`` copies of every prompt (rows ``i·c + j``)."""

    def __init__(self, model, ids: Tensor, mask: Tensor, cache, form):
        self.model, self.ids, self.mask, self.cache, self.form = model, ids, mask, cache, form

    def last_logits(self, copies: int, hooks: list) -> Tensor:
        kv = copy.deepcopy(self.cache)
        if copies > 1:
            kv.batch_repeat_interleave(copies)
        m = self.mask.repeat_interleave(copies, 0)
        logits = self.model.run_with_hooks(self.ids[:, -1:].repeat_interleave(copies, 0),
                                           attention_mask=m, fwd_hooks=hooks, **self.form(kv))
        return logits[:, -1]


def checked_prefix_cache(model, ids: Tensor, mask: Tensor) -> tuple[PrefixCache | None, Tensor | None, str]:
    """A :class:`PrefixCache` whose unpatched last-token distribution matches a full
    forward's within :func:`cache_check_atol`, with those cached last logits; or
    ``(None, None, why)``."""
    cache, form, why = prefix_cache(model, ids, mask)
    if cache is None:
        return None, None, why
    pc = PrefixCache(model, ids, mask, cache, form)
    full = model(ids, attention_mask=mask)[:, -1].float().softmax(-1)
    base = pc.last_logits(1, [])
    diff = float((base.float().softmax(-1) - full).abs().max())
    atol = cache_check_atol(model)
    if not diff <= atol:
        return None, None, (f"with the KV cache the unpatched last-token probabilities differ from "
                            f"a full forward's by {diff:.2g} (> {atol:g} allowed in {model_dtype(model)})")
    return pc, base, ""


def has_hf_model(model) -> bool:
    return hf_model(model) is not None
