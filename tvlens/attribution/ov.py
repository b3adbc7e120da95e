"""Path terms of a task vector's effect (LTV, "Mechanism analyses"): direct OV terms of every
later head, the direct and the total MLP terms of every later block, and their re-injection.

A vector injected at layer ``l`` (residual after block ``l``) and position ``p`` writes
``c = scale · θ`` into the residual stream (added, or replacing it). With ``q`` the query's
last position, ``L' = l + 1 .. L − 1`` the later layers, ``kv(h) = h // (H / K)`` (GQA shares
``W_V`` across query heads) and ``w̃ = norm_weight(model, norm)`` (``w``, or ``1 + w`` where
TransformerLens's ``cfg.rmsnorm_uses_offset`` says the norm multiplies by ``1 + w``):

**Direct OV terms** (θ read at ``p`` by head ``(l', h)`` through its OV circuit, written at
``q``). ``s[b, p]`` is the head's input-RMSNorm scale in the θ run (``ln1.hook_scale``):

    θ̂[b]            = c · w̃ / s[b, p]                                   (the norm at frozen scale)
    weighted[b, h]  = A[b, h, q, p] · θ̂[b] @ W_V[kv(h)] @ W_O[h]          [B, H, d_model]

At the frozen scale the norm is linear, so the head's value at ``p`` splits exactly into the
θ̂ part and the rest: ``attn_out[l'][b, q] = Σ_h weighted[b, h] + Σ_h rest[b, h] + b_O``, and
with patterns and scale frozen ``weighted`` is exactly the head's output with θ minus
without when ``l' = l + 1`` (both tested).

**Packaged OV terms** (the LTV paper's "packaged OV effect": the OV images of θ without the
attention weights, summed into an FV-shaped vector). We could not read the paper's exact
definition (its normalisation and placement are not in the text we could reach: arXiv
2509.24169, section on OV circuits), so the forms are named options:

    "unweighted"      packaged[h] = θ̂̄ @ W_V[kv(h)] @ W_O[h],   θ̂̄ = c · w̃ / mean_b s[b, p]
    "mean_attention"  packaged[h] = mean_b A[b, h, q, p] · θ̂̄ @ W_V[kv(h)] @ W_O[h]

``"unweighted"`` (the default, tvlens's earlier form) drops the weights ``A[q, p]``, which
are 0.02–0.40 in SmolLM2's layers 16–29 for an LTV at 15: its terms are then several times
the residual's norm (issue 14). ``"mean_attention"`` keeps them on average over the prompts
(still one vector shared by every prompt). Identity: ``weighted[b, h] = A[b, h, q, p] ·
(mean s / s[b, p]) · unweighted[h]``.

**MLP terms** at ``q`` of each later block ``l'``, with ``δ[b] = h_l^θ[b, q] − h_l^0[b, q]``
θ's change of the residual at the query after layer ``l`` (``c`` when added at ``p = q``, zero
when ``p ≠ q``: θ never sits in the query's residual there) and ``x⁰[b]`` the clean run's
``hook_resid_mid`` of block ``l'`` at ``q`` (the input of its ``ln2``):

    mlp_direct[b, l'] = mlp(ln2(x⁰ + δ)) − mlp(ln2(x⁰))     (θ's direct path into the MLP alone;
                                                               through ln2_post too on Gemma-3)
    mlp_total[b, l']  = mlp_out^θ[b, q] − mlp_out^0[b, q]     (all paths: what every earlier layer
                                                               passed on, too)

``ln2`` runs at its own scale, that of ``x⁰ + δ``: the MLP's real response to the clean input
plus θ. Identity (tested): with block ``l + 1``'s attention output frozen at its clean value,
``mlp_out^θ − mlp_out^0`` of block ``l + 1`` is ``mlp_direct``; further on, with every later
attention and MLP output before ``l'`` frozen too.

Re-injection of these terms instead of θ, at every placement, and the controls:
:mod:`tvlens.attribution.reinjection`.

Direct logit attribution (DLA) of a term t on the answer token y through the final norm at
its frozen scale ``s_f[b, q]`` (``ln_final.hook_scale``): ``(t · w̃_f / s_f) @ W_U[:, y]``.

Norms this module folds (:func:`tvlens.attribution.readout.check_foldable`): RMSNorm
without bias, with or without the ``1 + w`` offset, and the post-attention / post-MLP norms
of Gemma-2/3 (``ln1_post`` / ``ln2_post``: each sublayer's output is normalised again before
the residual add; ``hook_attn_out`` / ``hook_mlp_out`` are after them, what enters the
residual). A head's term then passes ``ln1_post`` at the θ run's scale at the query,
``s'[b] = blocks.{l'}.ln1_post.hook_scale[b, q]`` with gain ``g'``:

    weighted[b, h] = A[b, h, q, p] · (θ̂[b] @ W_V[kv(h)] @ W_O[h]) ⊙ g' / s'[b]
    packaged[h]    = (θ̂̄ @ W_V[kv(h)] @ W_O[h]) ⊙ g' / mean_b s'[b]

so that, at that frozen scale, the heads' terms and the rest still sum to ``attn_out``
exactly (tested on a tiny Gemma-3); ``mlp_direct`` runs ``ln2_post`` at its own scale, like
``ln2``. LayerNorm (which also subtracts the mean), norm biases and any other post-norm are
refused with a :class:`TvlensError`. DLA is of the pre-soft-cap logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import single_vector
from tvlens.attribution.readout import check_foldable, norm_gain, post_norm_names, unembed_directions
from tvlens.errors import TvlensError
from tvlens.interventions import resid_hook_name
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.runner import run
from tvlens.vector import TaskVector

KINDS = ("ov_weighted", "ov_packaged", "mlp_direct", "mlp_total")
PACKAGED = ("unweighted", "mean_attention")


def norm_weight(model, module) -> Float[Tensor, " d_model"]:
    """The factor a norm multiplies its normalised input by: ``w``, or ``1 + w`` for norms
    that store an offset from one (Gemma; TransformerLens ``cfg.rmsnorm_uses_offset``);
    :func:`tvlens.attribution.readout.norm_gain`."""
    return norm_gain(model, module)


def _choose(value, allowed, what):
    if value not in allowed:
        raise TvlensError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def _names(values, allowed, what) -> tuple[str, ...]:
    values = (values,) if isinstance(values, str) else tuple(values)
    for v in values:
        _choose(v, allowed, what)
    return values


def _check(model, vector: TaskVector):
    """``single_vector``'s ``(layer, position, c)`` of a vector the decomposition can fold."""
    what = "the OV / MLP path terms"
    lay = check_foldable(model, post_norms=True, what=what)  # RMSNorm, no bias
    folded = set((post_norm_names(model, "ln1_post") or []) + (post_norm_names(model, "ln2_post") or []))
    other = sorted(set(lay.post_norms) - folded)
    if other:
        raise TvlensError(f"{what} fold the post-attention and post-MLP norms (ln1_post, ln2_post) "
                          f"only, but this model also normalises at {other[0]}; use a model "
                          "without other post-norms (Llama, SmolLM2, Gemma-3)")
    layer, position, c = single_vector(model, vector)
    L = int(model.cfg.n_layers)
    if layer >= L - 1:
        raise TvlensError(f"the vector sits at the last layer ({layer}); no later heads read it. "
                          f"Use a vector at layer < {L - 1}")
    return layer, position, c


@dataclass
class OVDecomposition:
    """Per-head OV terms of one vector over one batch; see the module docstring.

    Attributes:
        layer, position: where the vector is injected; ``packaged_form``: see :data:`PACKAGED`.
        later_layers: ``l + 1 .. L − 1`` (the layers whose heads are decomposed).
        weighted: ``[B, L', H, d_model]`` attention-weighted terms at the query position.
        packaged: ``[L', H, d_model]`` packaged terms (one vector per head for the batch).
        attention: ``[B, L', H]`` the weights ``A[q, p]``.
        dla_weighted: ``[B, L', H]`` DLA of each weighted term on the answer token.
        dla_packaged: ``[L', H]`` DLA of each packaged term (mean over the batch).
    """

    layer: int
    position: object
    later_layers: list[int]
    weighted: Tensor
    packaged: Tensor
    attention: Tensor
    dla_weighted: Tensor
    dla_packaged: Tensor
    packaged_form: str = "unweighted"
    extras: dict = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        return {"layer": self.layer, "later_layers": self.later_layers,
                "packaged_form": self.packaged_form,
                "dla_weighted": self.dla_weighted.mean(0).tolist(),
                "dla_packaged": self.dla_packaged.tolist(),
                "attention": self.attention.mean(0).tolist()}


def _theta_names(model, layer: int, later: list[int]) -> list[str]:
    post = [f"blocks.{j}.ln1_post.hook_scale" for j in later] if post_norm_names(model) else []
    return ([f"blocks.{j}.ln1.hook_scale" for j in later] + [f"blocks.{j}.attn.hook_pattern" for j in later]
            + [f"blocks.{j}.hook_mlp_out" for j in later] + post
            + ["ln_final.hook_scale", resid_hook_name(layer)])


def _whole(model, batch, iv, names) -> dict[str, Tensor]:
    """Whole captures (``[B, T, ...]``) of one forward over the batch (patterns can't be chunked)."""
    return run(model, batch, iv, capture=names, capture_at=None, logits=None, batch_size=None,
               progress=False).captured


def ov_decomposition(model, batch: PromptBatch | PromptSet, vector: TaskVector, *,
                     packaged: str = "unweighted") -> OVDecomposition:
    """Decompose the direct OV effect of ``vector`` on every later head, for ``batch``
    (one forward with the vector; ``packaged``: one of :data:`PACKAGED`)."""
    layer, position, c = _check(model, vector)
    _choose(packaged, PACKAGED, "packaged form")
    batch = getattr(batch, "batch", batch)
    later = list(range(layer + 1, int(model.cfg.n_layers)))
    store = _whole(model, batch, vector, _theta_names(model, layer, later))
    return _ov_terms(model, batch, layer, position, c, later, store, packaged)


def _ov_terms(model, batch, layer, position, c, later, store, packaged) -> OVDecomposition:
    H = int(model.cfg.n_heads)
    dev = c.device
    rows = torch.arange(len(batch), device=dev)
    p = batch.position_index(position).to(dev)
    q = batch.position_index("last").to(dev)
    weighted, packaged_l, attn = [], [], []
    post = post_norm_names(model) is not None  # Gemma-2/3's ln1_post, folded below
    for j in later:
        blk = model.blocks[j]
        w = norm_weight(model, blk.ln1)
        s = store[f"blocks.{j}.ln1.hook_scale"].to(dev).float()[rows, p, 0]  # [B]
        WV = blk.attn.W_V.detach().float()  # [K, d, dh]: one per KV head
        WO = blk.attn.W_O.detach().float()  # [H, dh, d]
        WV_h = einops.repeat(WV, "kv m e -> (kv rep) m e", rep=H // WV.shape[0])  # [H, d, dh]
        a = store[f"blocks.{j}.attn.hook_pattern"].to(dev).float()[rows, :, q, p]  # [B, H]
        ov = einops.einsum(c[None] * w[None] / s[:, None], WV_h, WO, "b m, h m e, h e n -> b h n")
        pk = einops.einsum(c * w / s.mean(), WV_h, WO, "m, h m e, h e n -> h n")  # [H, d]
        if post:  # ln1_post at the θ run's scale at the query
            g = norm_gain(model, blk.ln1_post).to(dev)
            s_post = store[f"blocks.{j}.ln1_post.hook_scale"].to(dev).float()[rows, q, 0]  # [B]
            ov = ov * g / s_post[:, None, None]
            pk = pk * g / s_post.mean()
        weighted.append(a[..., None] * ov)
        attn.append(a)
        packaged_l.append(pk * a.mean(0)[:, None] if packaged == "mean_attention" else pk)
    weighted_t = torch.stack(weighted, 1)  # [B, L', H, d]
    packaged_t = torch.stack(packaged_l, 0)  # [L', H, d]
    u = _answer_readout(model, batch, store)  # [B, d]
    dla_w = einops.einsum(weighted_t, u, "b l h d, b d -> b l h")
    dla_p = einops.einsum(packaged_t, u, "l h d, b d -> b l h").mean(0)
    return OVDecomposition(layer, position, later, weighted_t, packaged_t, torch.stack(attn, 1),
                           dla_w, dla_p, packaged)


def _answer_readout(model, batch: PromptBatch, store) -> Float[Tensor, "batch d_model"]:
    """``w̃_f ⊙ W_U[:, y_b] / s_f[b, q]``: a term's dot product with it is its answer logit
    through the final norm at the θ run's scale."""
    u = unembed_directions(model, batch.first_answer_ids)  # [B, d]: w̃_f ⊙ W_U[:, y]
    q = batch.position_index("last")
    s_f = store["ln_final.hook_scale"].float()[torch.arange(len(batch)), q, 0].to(u.device)
    return u / s_f[:, None]


@torch.no_grad()
def _mlp_response(model, j: int, x: Tensor, delta: Tensor) -> Float[Tensor, "batch d_model"]:
    """``mlp(ln2(x + δ)) − mlp(ln2(x))`` of block ``j`` on ``[B, d]`` residuals (position-wise),
    through its post-MLP norm ``ln2_post`` too where it has one (each at its own scale)."""
    blk = model.blocks[j]
    dt = blk.ln2.weight.dtype
    post = blk.ln2_post if post_norm_names(model, "ln2_post") is not None else (lambda t: t)

    def f(h):
        return post(blk.mlp(blk.ln2(h.to(dt)[:, None])))[:, 0].float()

    return f(x + delta) - f(x)


@dataclass
class PathTerms:
    """Every term of one vector over one prompt batch (module docstring), from one forward
    with θ and one without.

    Attributes:
        ov: the :class:`OVDecomposition` (per head).
        mlp_direct, mlp_total: ``[B, L', d_model]`` per later block, at the query.
        delta: ``[B, d_model]`` θ's change of the residual after layer ``l`` at the query.
        dla_mlp_direct, dla_mlp_total: ``[B, L']`` their DLA on the answer token.
        clean_patterns: the zero-shot attention patterns of the later layers (whole).
        prompts: the batch's prompt texts (re-injection refuses other prompts).
    """

    vector: TaskVector
    ov: OVDecomposition
    mlp_direct: Tensor
    mlp_total: Tensor
    delta: Tensor
    dla_mlp_direct: Tensor
    dla_mlp_total: Tensor
    clean_patterns: dict = field(repr=False)
    prompts: list = field(repr=False)

    @property
    def layer(self) -> int:
        return self.ov.layer

    @property
    def later_layers(self) -> list[int]:
        return self.ov.later_layers

    def summed(self, kind: str) -> Float[Tensor, "batch later d_model"]:
        """Each later layer's ``kind`` term (summed over heads for OV terms) per prompt."""
        _choose(kind, KINDS, "term kind")
        if kind == "ov_weighted":
            return self.ov.weighted.sum(2)
        if kind == "ov_packaged":
            return self.ov.packaged.sum(1)[None].expand(len(self.prompts), -1, -1)
        return getattr(self, kind)

    def summary(self) -> dict:
        """Mean norms per later layer of each summed term and of their total, ‖θ‖, attention."""
        out = {"theta_norm": float(self.vector.vectors[0, 0].float().norm() * self.vector.scale)}
        for k in KINDS:
            t = self.summed(k)
            out[f"{k}_norm"] = t.norm(dim=-1).mean(0).tolist()
            out[f"{k}_total_norm"] = float(t.sum(1).norm(dim=-1).mean())
        out["attention"] = self.ov.attention.mean(0).tolist()
        out["dla"] = {"ov_weighted": self.ov.dla_weighted.sum(2).mean(0).tolist(),
                      "ov_packaged": self.ov.dla_packaged.sum(1).tolist(),
                      "mlp_direct": self.dla_mlp_direct.mean(0).tolist(),
                      "mlp_total": self.dla_mlp_total.mean(0).tolist()}
        return out


def path_terms(model, batch: PromptBatch | PromptSet, vector: TaskVector, *,
               packaged: str = "unweighted") -> PathTerms:
    """The OV, direct-MLP and total-MLP terms of ``vector`` on ``batch`` (module docstring)."""
    layer, position, c = _check(model, vector)
    _choose(packaged, PACKAGED, "packaged form")
    batch = getattr(batch, "batch", batch)
    later = list(range(layer + 1, int(model.cfg.n_layers)))
    on = _whole(model, batch, vector, _theta_names(model, layer, later))
    off = _whole(model, batch, None, [f"blocks.{j}.hook_resid_mid" for j in later]
                 + [f"blocks.{j}.hook_mlp_out" for j in later]
                 + [f"blocks.{j}.attn.hook_pattern" for j in later] + [resid_hook_name(layer)])
    ov = _ov_terms(model, batch, layer, position, c, later, on, packaged)
    rows, q = torch.arange(len(batch)), batch.position_index("last").cpu()
    at_q = lambda t: t[rows, q].to(c.device).float()  # noqa: E731
    delta = at_q(on[resid_hook_name(layer)]) - at_q(off[resid_hook_name(layer)])
    total = torch.stack([at_q(on[f"blocks.{j}.hook_mlp_out"]) - at_q(off[f"blocks.{j}.hook_mlp_out"])
                         for j in later], 1)
    direct = torch.stack([_mlp_response(model, j, at_q(off[f"blocks.{j}.hook_resid_mid"]), delta)
                          for j in later], 1)
    u = _answer_readout(model, batch, on)
    dla = lambda t: einops.einsum(t, u, "b l d, b d -> b l")  # noqa: E731
    patterns = {f"blocks.{j}.attn.hook_pattern": off[f"blocks.{j}.attn.hook_pattern"] for j in later}
    return PathTerms(vector, ov, direct, total, delta, dla(direct), dla(total), patterns,
                     list(batch.prompts))


def mlp_total_terms(model, batch: PromptBatch | PromptSet, vector: TaskVector
                    ) -> Float[Tensor, "batch later d_model"]:
    """``mlp_out^θ[q] − mlp_out^0[q]`` of each later block: the *total* MLP change (all paths)."""
    return path_terms(model, batch, vector).mlp_total


def mlp_direct_terms(model, batch: PromptBatch | PromptSet, vector: TaskVector
                     ) -> Float[Tensor, "batch later d_model"]:
    """``mlp(ln2(x⁰ + δ)) − mlp(ln2(x⁰))`` of each later block: θ's *direct* MLP terms."""
    return path_terms(model, batch, vector).mlp_direct


mlp_path_terms = mlp_total_terms  # its earlier name


__all__ = ["KINDS", "PACKAGED", "OVDecomposition", "PathTerms", "mlp_direct_terms", "mlp_path_terms",
           "mlp_total_terms", "norm_weight", "ov_decomposition", "path_terms"]
