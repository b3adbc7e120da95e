"""Attribution suite: OV decomposition, key heads, rotation vs scaling (oracles, identities)."""

from __future__ import annotations

import math

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.activations import capture
from tvlens.attribution import (
    ablate_heads, ablation_effects, ablation_hooks, final_change, fit_linear_map, head_means,
    head_saliency, key_head_analysis, ov_decomposition, polar, reinjection_test,
    rotation_scaling, top_heads,
)
from tvlens.attribution._common import answer_prob, parse_heads, query_batch
from tvlens.scoring import last_token_logits


def _vec(model, layer, position="last", mode="add", scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.cfg.d_model, generator=g) * 2
    return TaskVector.single(model, v, layer, position, mode=mode, scale=scale)


def _batch(model, task, n=4, shots=2):
    return query_batch(model, task, n=n, shots=shots)


def _decomposition_sums_back(model, batch, vec, atol):
    """attn_out[l'][q] = Σ_h weighted_h + Σ_h rest_h + b_O, rest computed from resid − c."""
    dec = ov_decomposition(model, batch, vec)
    layer, pos = vec.layers[0], vec.positions[0]
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
        x_rest = (resid[rows, p] - c) / s[rows, p] * model.blocks[j].ln1.weight
        b_V = blk.b_V if getattr(blk, "b_V", None) is not None else torch.zeros(K, blk.W_V.shape[-1])
        v_rest_p = torch.einsum("bm,kmd->bkd", x_rest, blk.W_V) + b_V
        v_h = v.repeat_interleave(H // K, dim=2)  # [B, T, H, dh]
        vrp = v_rest_p.repeat_interleave(H // K, dim=1)
        Aq = A[rows, :, q]  # [B, H, T]
        z_other = torch.einsum("bht,bthd->bhd", Aq, v_h) - Aq[rows, :, p][..., None] * v_h[rows, p]
        z_rest = z_other + Aq[rows, :, p][..., None] * vrp
        rest = torch.einsum("bhd,hdm->bm", z_rest, blk.W_O)
        total = dec.weighted[:, i].sum(1) + rest
        if getattr(blk, "b_O", None) is not None:
            total = total + blk.b_O
        torch.testing.assert_close(total, out[rows, q], atol=atol, rtol=0)


@pytest.mark.parametrize("mode,position,layer", [("add", "last", 0), ("add", -2, 0),
                                                 ("replace", "last", 1)])
def test_ov_terms_sum_back_to_attention_output(tiny, task, mode, position, layer):
    batch = _batch(tiny, task)
    _decomposition_sums_back(tiny, batch, _vec(tiny, layer, position, mode, scale=1.5), 1e-4)


def test_frozen_pattern_ov_term_is_exact_output_difference(tiny, task):
    batch = _batch(tiny, task)
    vec = _vec(tiny, 0, -2)  # p ≠ q, so the head reads θ through attention
    dec = ov_decomposition(tiny, batch, vec)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.ln1.hook_scale", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        on = capture(tiny, batch, names, vec.hooks(tiny, batch))
        frozen = [(n, (lambda t, hook, x=on[n]: x.clone())) for n in names[:2]]
        off = capture(tiny, batch, names[2:], frozen)
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    dz = (on[names[2]] - off[names[2]])[rows, q]  # [B, H, dh]
    diff = torch.einsum("bhd,hdm->bhm", dz, tiny.blocks[1].attn.W_O)
    torch.testing.assert_close(diff, dec.weighted[:, 0], atol=1e-5, rtol=1e-5)
    assert dec.weighted[:, 0].abs().max() > 1e-3  # the term is not trivially zero


def test_ov_dla_matches_logit_change_through_frozen_final_norm(tiny, task):
    batch = _batch(tiny, task)
    vec = _vec(tiny, 0)
    dec = ov_decomposition(tiny, batch, vec)
    y = batch.first_answer_ids
    with torch.no_grad():
        st = capture(tiny, batch, ["ln_final.hook_scale"], vec.hooks(tiny, batch))
    s = st["ln_final.hook_scale"][torch.arange(len(batch)), batch.position_index("last"), 0]
    t = dec.weighted[1, 0, 2]
    expect = (t / s[1] * tiny.ln_final.weight) @ tiny.W_U[:, y[1]]
    torch.testing.assert_close(dec.dla_weighted[1, 0, 2], expect, atol=1e-5, rtol=1e-5)


def test_saliency_matches_finite_difference(tiny, task):
    batch = _batch(tiny, task)
    vec = _vec(tiny, 0)
    sal, attr = head_saliency(tiny, batch, vec)
    assert sal.shape == (3, 4) and torch.all(sal >= attr.abs() - 1e-7)
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    eps = 1e-2
    for layer, h in [(0, 1), (1, 3), (2, 0)]:
        def p_at(t, layer=layer, h=h):
            def hook(z, hook=None):
                z = z.clone()
                z[rows, q, h] = z[rows, q, h] * (1 + t)
                return z
            hooks = vec.hooks(tiny, batch) + [(f"blocks.{layer}.attn.hook_z", hook)]
            with torch.no_grad():
                return answer_prob(last_token_logits(tiny, batch, hooks).double(), batch)
        fd = ((p_at(eps) - p_at(-eps)) / (2 * eps)).mean()
        torch.testing.assert_close(attr[layer, h].double(), fd.double(), atol=2e-5, rtol=2e-2)


def test_no_ablation_and_self_mean_ablation_reproduce_baseline(tiny, task):
    batch = _batch(tiny, task, n=1)
    vec = _vec(tiny, 0)
    hooks = vec.hooks(tiny, batch)
    with torch.no_grad():
        base = last_token_logits(tiny, batch, hooks)
        none = last_token_logits(tiny, batch, hooks + ablation_hooks(tiny, batch, [], "zero"))
        means = head_means(tiny, batch, vec)  # one prompt: the mean is its own value
        self_mean = last_token_logits(tiny, batch, hooks + ablation_hooks(
            tiny, batch, [(0, 0), (1, 2), (2, 3)], "mean", means))
        zero = last_token_logits(tiny, batch, hooks + ablation_hooks(tiny, batch, [(1, 2)], "zero"))
    assert torch.equal(base, none)
    torch.testing.assert_close(self_mean, base, atol=1e-6, rtol=0)
    assert (zero - base).abs().max() > 1e-4


def test_zero_ablating_a_head_changes_only_what_flows_through_it(tiny, task):
    batch = _batch(tiny, task)
    names = ["blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.1.hook_resid_mid"]
    with torch.no_grad():
        a = capture(tiny, batch, names)
        b = capture(tiny, batch, names, ablation_hooks(tiny, batch, [(1, 2)], "zero"))
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    assert torch.equal(a[names[0]], b[names[0]])
    za, zb = a[names[1]].clone(), b[names[1]].clone()
    removed = za[rows, q, 2] @ tiny.blocks[1].attn.W_O[2]
    assert torch.all(zb[rows, q, 2] == 0)
    za[rows, q, 2] = 0
    assert torch.equal(za, zb)  # other heads, other positions: untouched
    torch.testing.assert_close(a[names[2]][rows, q] - b[names[2]][rows, q], removed, atol=1e-5, rtol=0)
    keep = torch.ones_like(a[names[2]][..., 0], dtype=torch.bool)
    keep[rows, q] = False
    assert torch.equal(a[names[2]][keep], b[names[2]][keep])


def test_batched_exhaustive_ablation_equals_one_at_a_time(tiny, task):
    batch = _batch(tiny, task, n=3)
    vec = _vec(tiny, 0)
    for mode in ("zero", "mean"):
        gt = ablation_effects(tiny, batch, vec, mode=mode, heads_per_forward=5)
        means = head_means(tiny, batch, vec)
        with torch.no_grad():
            base = answer_prob(last_token_logits(tiny, batch, vec.hooks(tiny, batch)), batch)
            for layer, h in [(0, 0), (1, 3), (2, 2)]:
                hooks = vec.hooks(tiny, batch) + ablation_hooks(tiny, batch, [(layer, h)], mode, means)
                p = answer_prob(last_token_logits(tiny, batch, hooks), batch)
                torch.testing.assert_close(gt[layer, h], (base - p).abs().mean(), atol=1e-6, rtol=0)


def test_key_head_analysis_and_ablate_heads(tiny, task):
    out = key_head_analysis(tiny, task, _vec(tiny, 0), percent=25, n=4, random_control=3)
    assert len(out["key_heads"]) == 3
    sal = torch.tensor(out["saliency"])
    assert [tuple(h) for h in out["key_heads"]] == top_heads(sal, 25)
    assert -1 <= out["spearman"] <= 1 and 0 <= out["top_overlap"] <= 1
    lo, hi = out["ablate_random_ci"]
    assert lo <= out["ablate_random_accuracy"] <= hi
    res = ablate_heads(tiny, task, [], "zero", None, 0, n=4, shots=2)  # ICL prompts
    assert res.ablated_accuracy == res.baseline_accuracy


def test_reinjection_vector_accuracy_matches_evaluate(tiny, task):
    vec = _vec(tiny, 0)
    out = reinjection_test(tiny, task, vec, n=6, batch_size=4)
    ev = tvlens.evaluate(tiny, task, vector=vec, n=6)
    assert out["vector_accuracy"] == pytest.approx(ev.accuracy)
    assert out["zero_shot"] == pytest.approx(tvlens.evaluate(tiny, task, n=6).accuracy)
    for key in ("ov_weighted_recovery", "ov_packaged_recovery", "mlp_recovery"):
        assert key in out


def test_polar_decomposition():
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    Q, S = polar(W)
    torch.testing.assert_close(Q @ Q.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(S, S.T, atol=1e-6, rtol=0)
    assert torch.linalg.eigvalsh(S.double()).min() > -1e-5
    torch.testing.assert_close(Q @ S, W, atol=1e-4, rtol=0)


def test_fit_recovers_known_linear_map():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, generator=g)
    X = torch.randn(200, 12, generator=g)
    Y = X @ A.T + 1e-4 * torch.randn(200, 12, generator=g)
    torch.testing.assert_close(fit_linear_map(X, Y, 0.0), A, atol=1e-3, rtol=0)
    with pytest.raises(TvlensError, match="at least 13 copies"):
        fit_linear_map(X[:10], Y[:10], 0.0)
    W_ridge = fit_linear_map(X[:10], Y[:10], 1e-3)  # under-determined but regularised
    torch.testing.assert_close(X[:10] @ W_ridge.T, Y[:10], atol=0.2, rtol=0)


def test_final_change_of_zero_added_vector_is_zero_and_geometry_runs(tiny, task):
    vec = _vec(tiny, 1)
    batch = _batch(tiny, task, n=3, shots=0)
    d = final_change(tiny, batch, vec, torch.zeros(5, tiny.cfg.d_model))
    assert torch.equal(d, torch.zeros_like(d))
    out = rotation_scaling(tiny, task, vec, n_copies=64, ridge=1e-2, n=4, n_fit_prompts=4)
    assert out["fit_r2"] <= 1 and -1 <= out["rotation_cos"] <= 1 and out["scale_ratio"] > 0
    assert set(out["logit_lens"]) == {"theta", "Q_theta", "W_theta"}


def test_bad_input(tiny, task):
    batch = _batch(tiny, task)
    with pytest.raises(TvlensError, match="last layer"):
        ov_decomposition(tiny, batch, _vec(tiny, 2))
    with pytest.raises(TvlensError, match="out of range"):
        ablate_heads(tiny, task, [(1, 4)], n=2, shots=1)
    with pytest.raises(TvlensError, match="percent"):
        top_heads(torch.ones(3, 4), 0)
    with pytest.raises(TvlensError, match="percent"):
        key_head_analysis(tiny, task, None, percent=150)
    with pytest.raises(TvlensError, match="n_copies"):
        rotation_scaling(tiny, task, _vec(tiny, 0), n_copies=20, ridge=0.0)
    with pytest.raises(TvlensError, match="LAYER.HEAD"):
        parse_heads("3-1")
    other = tvlens.tiny_model(d_vocab=tiny.cfg.d_vocab, n_layers=2, d_model=32, n_heads=4)
    with pytest.raises(TvlensError, match="made for"):
        ov_decomposition(tiny, batch, _vec(other, 0))


@pytest.mark.slow
def test_smol_ov_terms_sum_back_gqa(smol):
    task = tvlens.load_task("antonym")
    batch = query_batch(smol, task, n=2)
    vec = tvlens.icl_task_vector(smol, task, 26, n_prompts=4)
    _decomposition_sums_back(smol, batch, vec, 1e-3)


def test_recovery_is_undefined_without_a_gain(tiny, task):
    """A vector that gains nothing over zero-shot has no gain to recover: NaN, not a ratio."""
    zero = TaskVector.single(tiny, torch.zeros(tiny.cfg.d_model), 0)
    out = reinjection_test(tiny, task, zero, n=6, batch_size=4)
    assert out["vector_accuracy"] == out["zero_shot"]
    for key in ("ov_weighted_recovery", "ov_packaged_recovery", "mlp_recovery"):
        assert math.isnan(out[key])
