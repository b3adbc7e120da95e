"""OV-circuit decomposition of a task vector's effect (LTV, "Mechanism analyses").

A vector injected at layer ``l`` (residual after block ``l``) and position ``p`` writes
``c = scale · θ`` into the residual stream (added, or replacing it). Every later head
``(l', h)``, ``l' > l``, reads ``c`` through its OV circuit along the direct path. With
``s[b, p]`` the head's input-RMSNorm scale (``blocks.{l'}.ln1.hook_scale``, the rms of the
residual *in the injected run*) and ``w`` the norm's weight,

    θ̂[b]            = c · w / s[b, p]                                  (RMSNorm at frozen scale)
    weighted[b, h]  = A[b, h, q, p] · θ̂[b] @ W_V[kv(h)] @ W_O[h]        [B, H, d_model]
    packaged[h]     = θ̂̄ @ W_V[kv(h)] @ W_O[h],  θ̂̄ = c · w / mean_b s[b, p]   [H, d_model]

with ``q`` the query's last position and ``kv(h) = h // (n_heads // n_kv_heads)`` (GQA
shares ``W_V`` across query heads). RMSNorm is not linear in its input —
``norm(x + θ) − norm(x)`` depends on ``x`` — so θ̂ freezes the run's own scale: at that
scale the norm is linear and the head's value at ``p`` splits exactly into the θ̂ part and
the rest. This makes the decomposition exact:

    attn_out[l'][b, q] = Σ_h weighted[b, h] + Σ_h rest[b, h] + b_O,
    rest[b, h] = Σ_{k≠p} A[q,k] v[k] W_O + A[q,p] (v[p] − θ̂ W_V) W_O,

and with attention patterns and the norm scale frozen, ``weighted`` is exactly a head's
output with θ minus without θ when ``l' = l + 1`` (both checked in the tests). LayerNorm
models would also subtract the mean of θ; this module supports RMSNorm (Llama, SmolLM2,
Gemma) and refuses others.

Direct logit attribution (DLA) of a term t on the answer token y through the final norm at
its frozen scale ``s_f[b, q]`` (``ln_final.hook_scale``): ``(t · w_f / s_f) @ W_U[:, y]``.

Re-injection test (:func:`reinjection_test`): remove θ and instead *add* at the query's
last position, at each later layer ``l'`` (residual after block ``l'``), that layer's
summed terms — the attention-weighted ones (per example), the packaged ones, or the
*MLP path*: the change of block ``l'``'s MLP output at ``q`` caused by θ
(``mlp_out^θ − mlp_out^0``, per example, all paths). ``where="final"`` adds the total at
the last layer instead. Reported as the fraction of θ's gain recovered,
``(acc_reinjected − acc_zero_shot) / (acc_θ − acc_zero_shot)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.activations import capture
from tvlens.attribution._common import accuracy, query_batch, single_vector, with_vectors
from tvlens.errors import TvlensError
from tvlens.prompts import PromptBatch
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector


@dataclass
class OVDecomposition:
    """Per-head OV terms of one vector over one batch; see the module docstring.

    Attributes:
        layer, position: where the vector is injected.
        later_layers: ``l + 1 .. L − 1`` (the layers whose heads are decomposed).
        weighted: ``[B, L', H, d_model]`` attention-weighted terms at the query position.
        packaged: ``[L', H, d_model]`` terms without attention weights.
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
    extras: dict = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "later_layers": self.later_layers,
            "dla_weighted": self.dla_weighted.mean(0).tolist(),
            "dla_packaged": self.dla_packaged.tolist(),
            "attention": self.attention.mean(0).tolist(),
        }


def _check_rms(model) -> None:
    norm = str(getattr(model.cfg, "normalization_type", "RMS") or "RMS")
    if not norm.upper().startswith("RMS"):
        raise TvlensError(f"the OV decomposition supports RMSNorm models; this one uses {norm!r}")


def ov_decomposition(model, batch: PromptBatch, vector: TaskVector) -> OVDecomposition:
    """Decompose the direct OV effect of ``vector`` on every later head, for ``batch``.

    One forward pass with the vector injected, capturing the later layers' ``ln1`` scales
    and attention patterns and the final norm's scale.
    """
    _check_rms(model)
    layer, position, c = single_vector(model, vector)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if layer >= L - 1:
        raise TvlensError(f"the vector sits at the last layer ({layer}); no later heads read it. "
                          f"Use a vector at layer < {L - 1}")
    later = list(range(layer + 1, L))
    names = [f"blocks.{j}.ln1.hook_scale" for j in later] + \
            [f"blocks.{j}.attn.hook_pattern" for j in later] + ["ln_final.hook_scale"]
    with torch.no_grad():
        store = capture(model, batch, names, vector.hooks(model, batch))
    dev = c.device
    rows = torch.arange(len(batch), device=dev)
    p = batch.position_index(position).to(dev)
    q = batch.position_index("last").to(dev)
    weighted, packaged, attn = [], [], []
    for j in later:
        blk = model.blocks[j]
        w = blk.ln1.weight.detach().float()
        s = store[f"blocks.{j}.ln1.hook_scale"].float()[rows, p, 0]  # [B]
        theta_hat = c[None] * w[None] / s[:, None]  # [B, d]
        WV = blk.attn.W_V.detach().float()  # [K, d, dh]
        WO = blk.attn.W_O.detach().float()  # [H, dh, d]
        rep = H // WV.shape[0]
        WV_h = WV.repeat_interleave(rep, dim=0)  # [H, d, dh]
        ov = torch.einsum("bm,hmd,hdn->bhn", theta_hat, WV_h, WO)  # [B, H, d]
        a = store[f"blocks.{j}.attn.hook_pattern"].float()[rows, :, q, p]  # [B, H]
        weighted.append(a[..., None] * ov)
        attn.append(a)
        pk_hat = c * w / s.mean()
        packaged.append(torch.einsum("m,hmd,hdn->hn", pk_hat, WV_h, WO))
    weighted_t = torch.stack(weighted, 1)  # [B, L', H, d]
    packaged_t = torch.stack(packaged, 0)  # [L', H, d]
    s_f = store["ln_final.hook_scale"].float()[rows, q, 0]  # [B]
    u = _answer_readout(model, batch)  # [B, d]: w_f * W_U[:, y]
    dla_w = torch.einsum("blhd,bd->blh", weighted_t, u) / s_f[:, None, None]
    dla_p = (torch.einsum("lhd,bd->blh", packaged_t, u) / s_f[:, None, None]).mean(0)
    return OVDecomposition(layer, position, later, weighted_t, packaged_t, torch.stack(attn, 1),
                           dla_w, dla_p)


def _answer_readout(model, batch: PromptBatch) -> Float[Tensor, "batch d_model"]:
    """``w_f ⊙ W_U[:, y_b]``: the direction whose dot product / s_f is the answer logit."""
    WU = model.W_U.detach().float()
    y = batch.first_answer_ids.to(WU.device)
    return model.ln_final.weight.detach().float()[None] * WU[:, y].T


def mlp_path_terms(model, batch: PromptBatch, vector: TaskVector) -> Float[Tensor, "batch later d_model"]:
    """``mlp_out^θ[q] − mlp_out^0[q]`` of each later block: θ's effect through the MLPs."""
    layer, _, _ = single_vector(model, vector)
    later = list(range(layer + 1, int(model.cfg.n_layers)))
    names = [f"blocks.{j}.hook_mlp_out" for j in later]
    q = batch.position_index("last")
    rows = torch.arange(len(batch))
    with torch.no_grad():
        on = capture(model, batch, names, vector.hooks(model, batch))
        off = capture(model, batch, names)
    return torch.stack([(on[n] - off[n]).float()[rows, q.to(on[n].device)] for n in names], 1)


def _reinject(model, batch, vector, terms: Tensor, later: list[int], where: str) -> float:
    """Accuracy with ``terms`` ([B, L', d] or [L', d]) added at the query instead of θ."""
    if where == "final":
        total = terms.sum(-2, keepdim=True)
        layers = [int(model.cfg.n_layers) - 1]
    else:
        total, layers = terms, later
    v = with_vectors(vector, total.unsqueeze(-2).to(vector.vectors.dtype), layers, ("last",))
    return accuracy(model, batch, v.hooks(model, batch))


def reinjection_test(model, task: Task, vector: TaskVector, *, n: int = 32, split: str = "test",
                     template="arrow", where: str = "layers", batch_size: int = 16,
                     seed: int = 0) -> dict:
    """Fractions of θ's accuracy gain recovered by re-injected OV and MLP-path terms.

    Args:
        where: ``"layers"`` — add each later layer's summed terms after that block, at the
            query's last position; ``"final"`` — add their total after the last block.

    Returns a dict with ``zero_shot``, ``vector_accuracy``, ``ov_weighted_accuracy``,
    ``ov_packaged_accuracy``, ``mlp_accuracy``, the matching ``*_recovery`` fractions (NaN
    when θ gains nothing or loses accuracy: there is no gain to recover) and ``dla_packaged`` ([L', H] head DLA, mean over prompts).
    """
    if where not in ("layers", "final"):
        raise TvlensError(f"where must be 'layers' or 'final', got {where!r}")
    batch_all = query_batch(model, task, n=n, split=split, template=template, seed=seed)
    sums = {k: 0.0 for k in ("zero_shot", "vector_accuracy", "ov_weighted_accuracy",
                             "ov_packaged_accuracy", "mlp_accuracy")}
    dla, count = None, 0
    for start in range(0, len(batch_all), batch_size):
        rows = list(range(start, min(start + batch_size, len(batch_all))))
        batch = batch_all.select(rows)
        dec = ov_decomposition(model, batch, vector)
        mlp = mlp_path_terms(model, batch, vector)
        k = len(rows)
        sums["zero_shot"] += k * accuracy(model, batch)
        sums["vector_accuracy"] += k * accuracy(model, batch, vector.hooks(model, batch))
        sums["ov_weighted_accuracy"] += k * _reinject(model, batch, vector, dec.weighted.sum(2),
                                                      dec.later_layers, where)
        sums["ov_packaged_accuracy"] += k * _reinject(model, batch, vector, dec.packaged.sum(1),
                                                      dec.later_layers, where)
        sums["mlp_accuracy"] += k * _reinject(model, batch, vector, mlp, dec.later_layers, where)
        dla = dec.dla_packaged * k if dla is None else dla + dec.dla_packaged * k
        count += k
    out = {key: val / count for key, val in sums.items()}
    gain = out["vector_accuracy"] - out["zero_shot"]
    for key, name in (("ov_weighted_accuracy", "ov_weighted_recovery"),
                      ("ov_packaged_accuracy", "ov_packaged_recovery"),
                      ("mlp_accuracy", "mlp_recovery")):
        # a fraction of θ's gain is defined only when θ gains something over zero-shot
        out[name] = (out[key] - out["zero_shot"]) / gain if gain > 1e-12 else float("nan")
    out.update(layer=vector.layers[0], n=count, where=where, task=task.name,
               later_layers=list(range(vector.layers[0] + 1, int(model.cfg.n_layers))),
               dla_packaged=(dla / count).tolist())
    return out
