"""The final-norm + unembedding readout, folded through TransformerLens's own configuration.

A ``d_model`` vector ``x`` (a residual, a task vector, its image ``Wθ``) is read as the
model reads its last residual:

    logits(x) = cap(ln_f(x) @ W_U + b_U),     ln_f(x) = x / rms(x) ⊙ g_f,
    rms(x) = √(mean(x²) + ε),
    g_f = 1 + w_f   when ``cfg.rmsnorm_uses_offset`` (Gemma's RMSNorm), else w_f,
    cap(z) = c · tanh(z / c) with c = ``cfg.output_logits_soft_cap`` when c > 0, else z.

:func:`readout_logits` does not write this out: it calls TransformerLens 4's
:func:`transformer_lens.tools.analysis.logit_readout`, which runs the model's own
``ln_final`` module (so the offset, ε and any LayerNorm centring are the model's) and the
architecture adapter's output transform (Gemma's soft-cap), so a last-layer residual read
out gives the model's own logits. :func:`logit_lens` builds the lens summary on it.

Linear decompositions (OV terms, direct logit attribution) cannot call the norm module on
each term: they fold its gain into the weights, with the norm's scale ``s`` captured from
the run, ``ln(x) = x ⊙ g / s``. :func:`norm_gain` gives that ``g`` through the same
configuration (``1 + w`` under ``rmsnorm_uses_offset``), :func:`unembed_directions` the
folded readout ``u_y = g_f ⊙ W_U[:, y]`` (pre-cap: ``logit_y = x · u_y / s_f + b_U[y]``), and
:func:`check_foldable` refuses a model whose norms such a decomposition cannot fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.errors import TvlensError

RMS_TYPES = ("RMS", "RMSPre")  # TransformerLens's normalization_type values of RMSNorm


@dataclass(frozen=True)
class NormLayout:
    """How a model normalises, as TransformerLens's config and modules say.

    Attributes:
        kind: ``cfg.normalization_type`` (``"RMS"``, ``"RMSPre"``, ``"LN"``, ``"LNPre"``, None).
        offset: ``cfg.rmsnorm_uses_offset``: the gain is ``1 + w`` (Gemma), not ``w``.
        post_norms: the block norms applied to a sublayer's output before the residual add
            (``blocks.0.ln1_post``, ``blocks.0.ln2_post``: Gemma-2/3, OLMo-2).
        biased: norms with a bias (a LayerNorm's β, or any nonzero norm bias).
        logit_soft_cap: ``cfg.output_logits_soft_cap`` when > 0 (Gemma-2/3), else None.
    """

    kind: str | None
    offset: bool
    post_norms: tuple[str, ...]
    biased: tuple[str, ...]
    logit_soft_cap: float | None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "offset": self.offset, "post_norms": list(self.post_norms),
                "biased": list(self.biased), "logit_soft_cap": self.logit_soft_cap}


def _norms(model) -> list[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every block norm (``blocks.i.ln*``) and ``ln_final``."""
    out = []
    for i, blk in enumerate(getattr(model, "blocks", ())):
        for name, mod in blk.named_children():
            if name.startswith("ln"):
                out.append((f"blocks.{i}.{name}", mod))
    if getattr(model, "ln_final", None) is not None:
        out.append(("ln_final", model.ln_final))
    return out


def norm_layout(model) -> NormLayout:
    """The :class:`NormLayout` of ``model`` (config fields and the modules it mounts)."""
    cfg = model.cfg
    cap = float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0)
    norms = _norms(model)
    post = tuple(n for n, _ in norms if n.rsplit(".", 1)[-1].endswith("_post"))
    biased = tuple(n for n, m in norms
                   if isinstance(getattr(m, "bias", None), Tensor) and bool(m.bias.detach().ne(0).any()))
    offset = bool(getattr(cfg, "rmsnorm_uses_offset", False))
    return NormLayout(getattr(cfg, "normalization_type", None), offset, post, biased,
                      cap if cap > 0 else None)


def norm_gain(model, norm: torch.nn.Module) -> Float[Tensor, " d_model"]:
    """The multiplicative gain ``g`` of an RMSNorm module, ``norm(x) = x / rms(x) ⊙ g``:
    ``1 + w`` under ``cfg.rmsnorm_uses_offset`` (Gemma), ``w`` otherwise, ones for a norm
    without a weight (``RMSPre``: folded into the next weights). Float32, detached."""
    w = getattr(norm, "weight", None)
    d = int(model.cfg.d_model)
    if not isinstance(w, Tensor):
        return torch.ones(d, device=model.cfg.device)
    g = w.detach().float()
    return g + 1 if bool(getattr(model.cfg, "rmsnorm_uses_offset", False)) else g


def check_foldable(model, *, post_norms: bool = False, what: str = "the OV decomposition") -> NormLayout:
    """The model's :class:`NormLayout` if a linear decomposition can fold its norms, else a
    :class:`TvlensError` saying why.

    Folding means writing each norm as ``x ⊙ g / s`` (``g`` from :func:`norm_gain`, the
    scale ``s`` captured from the run), which is exact for RMSNorm without bias. Refused:
    LayerNorm (``LN`` / ``LNPre``: it centres ``x`` and adds β, so a term's share is not
    ``x ⊙ g / s``), any norm with a nonzero bias, and — unless the caller folds them too
    (``post_norms=True``: it multiplies each sublayer's terms by ``g_post / s_post``) —
    post-sublayer norms, which rescale the *sum* of the heads' outputs before the residual
    add. The logit soft-cap is not refused: it acts after the unembedding, so a linear
    attribution is of the pre-cap logit (:func:`unembed_directions`).
    """
    lay = norm_layout(model)
    name = getattr(model.cfg, "model_name", None) or "this model"
    if lay.kind not in RMS_TYPES:
        raise TvlensError(f"{what} folds RMSNorm only, but {name} uses normalization_type="
                          f"{lay.kind!r} (LayerNorm centres each vector and adds a bias, so a "
                          "term's share is not x·g/s); use an RMSNorm model (Llama, SmolLM2, Gemma)")
    if lay.biased:
        raise TvlensError(f"{what} cannot fold the norm bias of {name} ({lay.biased[0]} has a "
                          "nonzero bias, a constant no term carries); use a model whose norms have no bias")
    if lay.post_norms and not post_norms:
        raise TvlensError(f"{what} does not fold post-sublayer norms, but {name} normalises each "
                          f"sublayer's output before the residual add ({lay.post_norms[0]}, "
                          "Gemma-style), so per-head terms are not summands of the residual; "
                          "use a model without post-norms (Llama, SmolLM2)")
    return lay


def post_norm_names(model, norm: str = "ln1_post") -> list[str] | None:
    """``blocks.{l}.{norm}`` for every layer when the model normalises that sublayer's output
    before the residual add (``"ln1_post"``: attention, ``"ln2_post"``: MLP; Gemma-2/3), else
    None. A layout with the norm in only some layers raises :class:`TvlensError`: the
    decompositions fold it in every layer or in none."""
    names = [f"blocks.{layer}.{norm}" for layer in range(int(model.cfg.n_layers))]
    post = set(norm_layout(model).post_norms)
    if not post & set(names):
        return None
    if not post >= set(names):
        raise TvlensError(f"only some layers have a {norm} norm ({sorted(post & set(names))[:3]}…); "
                          "tvlens folds a post-sublayer norm in every layer or none")
    return names


def unembed_directions(model, ids: Tensor | list[int]) -> Float[Tensor, "n d_model"]:
    """``u_y = g_f ⊙ W_U[:, y]`` for each token ``y`` of ``ids`` (float32): the pre-cap logit
    of a final residual ``x`` with final-norm scale ``s_f`` is ``x · u_y / s_f + b_U[y]``
    (exact for a foldable model, :func:`check_foldable`)."""
    WU = model.W_U.detach().float()
    y = torch.as_tensor(ids, dtype=torch.long, device=WU.device)
    return norm_gain(model, model.ln_final).to(WU.device)[None] * WU[:, y].T


def readout_logits(model, x: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
    """``cap(ln_f(x) @ W_U + b_U)`` per vector (module docstring), float32, via
    TransformerLens's ``logit_readout`` (the model's own final norm and output transform)."""
    from transformer_lens.tools.analysis import logit_readout

    if not isinstance(x, Tensor) or x.shape[-1:] != (int(model.cfg.d_model),):
        raise TvlensError(f"readout takes [..., d_model={model.cfg.d_model}] vectors, got "
                          f"{tuple(getattr(x, 'shape', ()))}")
    try:
        out = logit_readout(model, x.detach().to(model.W_U.device))
    except ValueError as err:  # TransformerLens refuses a readout it cannot reproduce
        raise TvlensError(f"this model's final readout cannot be applied to a vector: {err}") from None
    return out.values.float()


def logit_lens(model, v: Float[Tensor, " d_model"], answer_ids: list[int], *, k: int = 10) -> dict:
    """The logit lens of ``v``: its top-``k`` tokens under :func:`readout_logits`, the mean
    and best rank of the task's answer tokens (0 = argmax; ties count only strictly larger
    logits, as TransformerLens ranks), and the task alignment: the mean z-score of the
    answer tokens' logits over the vocabulary, ``mean_y (ℓ_y − mean ℓ) / std ℓ``."""
    logits = readout_logits(model, v.float())
    ids = torch.as_tensor(sorted(set(answer_ids)), dtype=torch.long, device=logits.device)
    ranks = (logits[None, :] > logits[ids][:, None]).sum(-1)
    z = (logits - logits.mean()) / logits.std()
    top = logits.topk(k).indices.tolist()
    tok = model.tokenizer
    return {"top_tokens": [tok.decode([i]) if tok is not None else str(i) for i in top],
            "answer_rank_mean": float(ranks.float().mean()), "answer_rank_best": int(ranks.min()),
            "alignment": float(z[ids].mean())}


__all__ = ["NormLayout", "check_foldable", "logit_lens", "norm_gain", "norm_layout",
           "post_norm_names", "readout_logits", "unembed_directions"]
