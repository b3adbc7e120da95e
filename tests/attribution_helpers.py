"""Helpers shared by the attribution tests: small prompt batches, a random task vector, and
the OV decomposition's sum-back oracle (recomputed here from the captured activations)."""

from __future__ import annotations

import torch

import tvlens
from tvlens import TaskVector
from tvlens.activations import capture
from tvlens.attribution import Reinjection, norm_weight, ov_decomposition
from tvlens.attribution.readout import norm_layout
from tvlens.interventions import Freeze, HeadPatch
from tvlens.prompts import PromptSet


def prompt_batch(model, task, **kwargs):
    return PromptSet.build(model, task, **kwargs).batch


def last_logits(model, batch, iv, batch_size=None):
    return tvlens.runner.run(model, batch, iv, logits="last", batch_size=batch_size,
                             progress=False).last_logits


def patch_hooks(model, batch, heads, mode="zero", means=None):
    return HeadPatch.ablation(model, heads, mode, means).hooks(model, batch)


def random_vector(model, layer, position="last", mode="add", scale=1.0, seed=1):
    """A seeded N(0, 4·I) vector at one layer and position (its norm ≈ 2√d_model)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.d_model, generator=g) * 2
    return TaskVector.single(model, v, layer, position, mode=mode, scale=scale)


def small_batch(model, task, n=4, shots=2):
    """``n`` two-shot prompts of ``task`` in the default format."""
    return prompt_batch(model, task, n=n, shots=shots)


def assert_decomposition_sums_back(model, batch, vec, atol):
    """attn_out[l'][q] = Σ_h weighted_h + Σ_h rest_h + b_O, rest computed from resid − c."""
    dec = ov_decomposition(model, batch, vec)
    pos = vec.positions[0]
    c = vec.vectors[0, 0] * vec.scale
    rows = torch.arange(len(batch))
    p, q = batch.position_index(pos), batch.position_index("last")
    H = model.cfg.n_heads
    for i, j in enumerate(dec.later_layers):
        names = [f"blocks.{j}.{n}" for n in ("hook_resid_pre", "ln1.hook_scale", "attn.hook_pattern",
                                             "attn.hook_v", "hook_attn_out")]
        with torch.no_grad():
            st = capture(model, batch, names, vec.hooks(model, batch))
        resid, s, A, v, out = (st[n] for n in names)
        blk = model.blocks[j].attn
        K = blk.W_V.shape[0]
        # value at p from the residual with the injected value c removed, at the frozen scale
        x_rest = (resid[rows, p] - c) / s[rows, p] * norm_weight(model, model.blocks[j].ln1)
        b_V = blk.b_V if getattr(blk, "b_V", None) is not None else torch.zeros(K, blk.W_V.shape[-1])
        v_rest_p = torch.einsum("bm,kmd->bkd", x_rest, blk.W_V) + b_V
        v_h = v.repeat_interleave(H // K, dim=2)  # [B, T, H, dh]
        vrp = v_rest_p.repeat_interleave(H // K, dim=1)
        Aq = A[rows, :, q]  # [B, H, T]
        z_other = torch.einsum("bht,bthd->bhd", Aq, v_h) - Aq[rows, :, p][..., None] * v_h[rows, p]
        z_rest = z_other + Aq[rows, :, p][..., None] * vrp
        rest = torch.einsum("bhd,hdm->bm", z_rest, blk.W_O)
        if getattr(blk, "b_O", None) is not None:
            rest = rest + blk.b_O
        if norm_layout(model).post_norms:  # Gemma-3: ln1_post at the θ run's scale at q
            name = f"blocks.{j}.ln1_post.hook_scale"
            with torch.no_grad():
                s_post = capture(model, batch, [name], vec.hooks(model, batch))[name][rows, q]
            rest = rest * norm_weight(model, model.blocks[j].ln1_post) / s_post
        total = dec.weighted[:, i].sum(1) + rest
        torch.testing.assert_close(total, out[rows, q], atol=atol, rtol=0)


def assert_terms_rebuild_the_vector_run(model, batch, vec, terms, block, frozen, *, mlp_tol,
                                        logit_atol, logit_rtol):
    """θ before the last block ``block``: the direct MLP term is that block's MLP change with
    its attention output frozen clean; and the terms re-injected where they entered (the
    ``frozen`` scales and pattern at the θ run's, the MLP at the clean run's) plus θ after
    the last block rebuild the θ run's last-token logits."""
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    name = f"blocks.{block}.hook_mlp_out"
    with torch.no_grad():
        clean = capture(model, batch, [name])[name][rows, q]
        fz = Freeze.record(model, batch, [f"blocks.{block}.hook_attn_out"])
        on = capture(model, batch, [name], (vec + fz).hooks(model, batch))[name][rows, q]
    torch.testing.assert_close(terms.mlp_direct[:, 0], on - clean, atol=mlp_tol, rtol=mlp_tol)
    rebuilt = [Freeze.record(model, batch, frozen, vec), Freeze.record(model, batch, [name]),
               Reinjection(terms, "ov_weighted", "entry"), Reinjection(terms, "mlp_total", "entry"),
               TaskVector.single(model, vec.vectors[0, 0] * vec.scale, block)]
    torch.testing.assert_close(last_logits(model, batch, rebuilt), last_logits(model, batch, vec),
                               atol=logit_atol, rtol=logit_rtol)
