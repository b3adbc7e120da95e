"""Like-for-like OV and MLP path terms at every placement, their re-injection, and the controls
(issue 14, ``tvlens.attribution.ov``)."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.activations import capture
from tvlens.attribution import (PLACEMENTS, FrozenAttention, Reinjection, norm_weight, ov_decomposition,
                                path_terms, reinjection_test)
from tvlens.interventions import Freeze
from attribution_helpers import (assert_decomposition_sums_back, assert_terms_rebuild_the_vector_run,
                                last_logits, prompt_batch, random_vector, small_batch)


# ----- issue 14: like-for-like path terms, every placement, controls (ov.py) --------------
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_direct_mlp_term_is_the_mlp_change_with_everything_else_frozen(tiny, task, mode):
    """θ at layer 0 reaches MLP l' directly only through the residual: with the attention
    outputs of blocks 1..l' and the MLP outputs of blocks 1..l'−1 frozen at their clean values,
    MLP l''s input is x⁰ + δ, so its output change is exactly the direct MLP term."""
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 0, mode=mode, scale=1.5)
    terms = path_terms(tiny, batch, vec)
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    for i, j in enumerate(terms.later_layers):
        frozen = [f"blocks.{k}.hook_attn_out" for k in range(1, j + 1)] + \
                 [f"blocks.{k}.hook_mlp_out" for k in range(1, j)]
        name = f"blocks.{j}.hook_mlp_out"
        with torch.no_grad():
            clean = capture(tiny, batch, [name])[name][rows, q]
            fz = Freeze.record(tiny, batch, frozen)  # clean values
            on = capture(tiny, batch, [name], (vec + fz).hooks(tiny, batch))[name][rows, q]
        # float32, outputs of norm ~1: 1e-5 absolute is reduction-order noise
        torch.testing.assert_close(terms.mlp_direct[:, i], on - clean, atol=1e-5, rtol=1e-5)
        assert terms.mlp_direct[:, i].abs().max() > 1e-2  # not trivially zero
    # the total change is a different quantity once earlier later-layers pass θ on
    assert (terms.mlp_total[:, 1] - terms.mlp_direct[:, 1]).abs().max() > 1e-3
    if mode == "add":  # δ is the injected value itself when added at the query
        torch.testing.assert_close(terms.delta, (vec.vectors[0, 0] * vec.scale).expand(len(batch), -1))


def test_direct_mlp_term_is_zero_when_the_vector_is_not_at_the_query(tiny, task):
    batch = small_batch(tiny, task)
    terms = path_terms(tiny, batch, random_vector(tiny, 0, -2))
    assert torch.equal(terms.delta, torch.zeros_like(terms.delta))  # q's residual: same bits
    assert torch.equal(terms.mlp_direct, torch.zeros_like(terms.mlp_direct))
    assert terms.mlp_total.abs().max() > 1e-3  # θ still reaches the query's MLPs via heads


def test_terms_reinjected_where_they_entered_reproduce_the_vector_run(tiny, task):
    """θ at layer 1 (one later block, 2): with block 2's ln1 scale and pattern frozen at the θ
    run's and its MLP output at the clean run's, the weighted OV terms added at hook_attn_out,
    the total MLP change at hook_mlp_out and θ's own direct path after the last block rebuild
    the θ run's final residual at the query, hence its logits."""
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 1)
    terms = path_terms(tiny, batch, vec)
    theta_frozen = Freeze.record(tiny, batch, ["blocks.2.ln1.hook_scale", "blocks.2.attn.hook_pattern"], vec)
    clean_mlp = Freeze.record(tiny, batch, ["blocks.2.hook_mlp_out"])
    direct = TaskVector.single(tiny, vec.vectors[0, 0] * vec.scale, 2)  # θ's residual path
    rebuilt = [theta_frozen, clean_mlp, Reinjection(terms, "ov_weighted", "entry"),
               Reinjection(terms, "mlp_total", "entry"), direct]
    want = last_logits(tiny, batch, vec)
    # float32 logits of size ~10 after two norms: 1e-4 absolute
    torch.testing.assert_close(last_logits(tiny, batch, rebuilt), want, atol=1e-4, rtol=1e-5)
    without_ov = last_logits(tiny, batch, [p for p in rebuilt if getattr(p, "kind", "") != "ov_weighted"])
    assert (without_ov - want).abs().max() > 1e-3  # the OV term is needed for the identity


@pytest.mark.parametrize("position", ["last", -2])
def test_every_placement_adds_its_terms_where_it_says(tiny, task, position):
    """Each placement against hooks written here (the terms added at the named hook points and
    rows' positions), and chunked (for_rows) against whole."""
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 0, position)
    terms = path_terms(tiny, batch, vec)
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    p = batch.position_index(position)

    def adder(name, vals, cols):
        def fn(act, hook=None):
            act = act.clone()
            act[rows, cols] += vals.to(act.dtype)
            return act
        return (name, fn)

    for kind in ("ov_weighted", "ov_packaged", "mlp_direct", "mlp_total"):
        t = terms.summed(kind)  # [B, 2, d]
        site = "hook_attn_out" if kind.startswith("ov") else "hook_mlp_out"
        expect = {"entry": [adder(f"blocks.{j}.{site}", t[:, i], q) for i, j in enumerate((1, 2))],
                  "after_block": [adder(f"blocks.{j}.hook_resid_post", t[:, i], q) for i, j in enumerate((1, 2))],
                  "final": [adder("blocks.2.hook_resid_post", t.sum(1), q)],
                  "own": [adder("blocks.0.hook_resid_post", t.sum(1), p)]}
        assert set(expect) == set(PLACEMENTS)
        for placement, hooks in expect.items():
            iv = Reinjection(terms, kind, placement)
            got = last_logits(tiny, batch, iv)
            torch.testing.assert_close(got, last_logits(tiny, batch, hooks), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(last_logits(tiny, batch, iv, batch_size=3), got,
                                       atol=1e-5, rtol=1e-5)
            if kind != "mlp_direct" or position == "last":  # (zero when θ is not at q)
                assert (got - last_logits(tiny, batch, None)).abs().max() > 1e-4  # it acts


def test_packaged_forms_and_weighted_terms_agree(tiny, task):
    """weighted[b, h] = A[b, h] · (mean s / s[b]) · unweighted[h]; mean_attention[h] =
    mean_b A[b, h] · unweighted[h]; unweighted[h] recomputed from W_V, W_O by hand."""
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 0, -2)
    un = ov_decomposition(tiny, batch, vec)
    ma = ov_decomposition(tiny, batch, vec, packaged="mean_attention")
    rows, p = torch.arange(len(batch)), batch.position_index(-2)
    with torch.no_grad():
        st = capture(tiny, batch, [f"blocks.{j}.ln1.hook_scale" for j in (1, 2)], vec.hooks(tiny, batch))
    c = vec.vectors[0, 0] * vec.scale
    for i, j in enumerate((1, 2)):
        s = st[f"blocks.{j}.ln1.hook_scale"][rows, p, 0]
        ratio = (s.mean() / s)[:, None, None]
        torch.testing.assert_close(un.weighted[:, i], un.attention[:, i, :, None] * ratio * un.packaged[i][None],
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ma.packaged[i], un.attention[:, i].mean(0)[:, None] * un.packaged[i],
                                   atol=1e-6, rtol=1e-5)
        attn = tiny.blocks[j].attn
        h, kv = 3, 3 // (attn.W_O.shape[0] // attn.W_V.shape[0])  # GQA: head 3 reads KV head 1
        by_hand = (c * norm_weight(tiny, tiny.blocks[j].ln1) / s.mean()) @ attn.W_V[kv] @ attn.W_O[h]
        torch.testing.assert_close(un.packaged[i, h], by_hand, atol=1e-5, rtol=1e-5)
    assert (un.packaged - ma.packaged).abs().max() > 1e-3




def test_ov_and_mlp_terms_fold_the_rmsnorm_offset(task, make_hf_gemma):
    """A norm that multiplies by 1 + w (Gemma; cfg.rmsnorm_uses_offset): the OV terms sum back
    to the attention output, the frozen-pattern term is the head's output change, and the
    direct MLP term is the MLP change with everything else frozen (the raw w would fail)."""
    gemma = make_hf_gemma(task)
    ln1 = gemma.blocks[1].ln1
    assert gemma.cfg.rmsnorm_uses_offset and torch.equal(norm_weight(gemma, ln1), 1 + ln1.weight.detach())
    batch = small_batch(gemma, task)
    vec = random_vector(gemma, 0, -2)
    assert_decomposition_sums_back(gemma, batch, vec, 1e-4)
    dec = ov_decomposition(gemma, batch, vec)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.ln1.hook_scale", "blocks.1.attn.hook_z"]
    with torch.no_grad():
        on = capture(gemma, batch, names, vec.hooks(gemma, batch))
        off = capture(gemma, batch, names[2:], Freeze.record(gemma, batch, names[:2], vec))
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    diff = torch.einsum("bhd,hdm->bhm", (on[names[2]] - off[names[2]])[rows, q], gemma.blocks[1].attn.W_O)
    torch.testing.assert_close(diff, dec.weighted[:, 0], atol=1e-5, rtol=1e-5)
    # the same term with the raw w (what a hand-written x · w / rms would fold) is far off
    c, attn = vec.vectors[0, 0] * vec.scale, gemma.blocks[1].attn
    s1 = on["blocks.1.ln1.hook_scale"][rows, batch.position_index(-2), 0]
    raw = torch.einsum("b,bm,hme,hen->bhn", torch.ones(len(batch)), c * ln1.weight.detach() / s1[:, None],
                       attn.W_V.repeat_interleave(2, 0), attn.W_O) * dec.attention[:, 0, :, None]
    assert (raw - diff).abs().max() > 100 * 1e-5
    # the direct MLP term through Gemma's offset ln2, against the frozen forward
    vec = random_vector(gemma, 0)
    terms = path_terms(gemma, batch, vec)
    with torch.no_grad():
        name = "blocks.1.hook_mlp_out"
        clean = capture(gemma, batch, [name])[name][rows, q]
        fz = Freeze.record(gemma, batch, ["blocks.1.hook_attn_out"])
        on = capture(gemma, batch, [name], (vec + fz).hooks(gemma, batch))[name][rows, q]
    torch.testing.assert_close(terms.mlp_direct[:, 0], on - clean, atol=1e-5, rtol=1e-5)


def test_controls_subtract_the_ov_terms_and_freeze_the_patterns(tiny, task):
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 1)
    terms = path_terms(tiny, batch, vec)
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    name = "blocks.2.hook_attn_out"
    with torch.no_grad():
        on = capture(tiny, batch, [name], vec.hooks(tiny, batch))[name][rows, q]
        minus = vec + Reinjection(terms, "ov_weighted", "entry", sign=-1.0)
        off = capture(tiny, batch, [name], minus.hooks(tiny, batch))[name][rows, q]
    # block 2 is the only later block: the subtraction leaves exactly the rest of its output
    torch.testing.assert_close(on - off, terms.ov.weighted[:, 0].sum(1), atol=1e-5, rtol=1e-5)
    # frozen attention, chunked, against the clean patterns frozen over the whole batch
    vec0 = random_vector(tiny, 0)
    terms0 = path_terms(tiny, batch, vec0)
    whole = Freeze.record(tiny, batch, ["blocks.1.attn.hook_pattern", "blocks.2.attn.hook_pattern"])
    want = last_logits(tiny, batch, vec0 + whole)
    got = last_logits(tiny, batch, vec0 + FrozenAttention(terms0), batch_size=3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (want - last_logits(tiny, batch, vec0)).abs().max() > 1e-4


def test_bad_reinjection_input(tiny, task):
    batch = small_batch(tiny, task)
    vec = random_vector(tiny, 0)
    terms = path_terms(tiny, batch, vec)
    with pytest.raises(TvlensError, match="unknown placement 'resid'.*entry, final, own, after_block"):
        Reinjection(terms, "ov_weighted", "resid")
    with pytest.raises(TvlensError, match="unknown placement"):
        reinjection_test(tiny, task, vec, n=2, placements=["final", "everywhere"])
    with pytest.raises(TvlensError, match="unknown term kind 'mlp'"):
        Reinjection(terms, "mlp")
    with pytest.raises(TvlensError, match="unknown packaged form"):
        path_terms(tiny, batch, vec, packaged="paper")
    with pytest.raises(TvlensError, match="other prompts"):
        last_logits(tiny, small_batch(tiny, task, n=4, shots=1), Reinjection(terms, "mlp_direct"))


@pytest.mark.slow
def test_smol_direct_mlp_term_and_reinjection_identity(smol):
    """On SmolLM2 (GQA, 30 layers), a vector at layer 28: the direct MLP term of block 29 is
    its MLP change with its attention frozen clean, and the terms re-injected where they
    entered (block 29's scale and pattern frozen at the θ run's, its MLP at the clean run's)
    plus θ after the last block rebuild the θ run's logits."""
    task = tvlens.load_task("antonym")
    batch = prompt_batch(smol, task, n=3, template="qa")
    g = torch.Generator().manual_seed(0)
    vec = TaskVector.single(smol, torch.randn(smol.cfg.d_model, generator=g) * 4, 28)
    terms = path_terms(smol, batch, vec)
    # float32: SmolLM2's residual has entries of ~10², so x⁰ + δ added in another order than the
    # forward's (h + c) + attn differs by ~1e-5 per entry; through ln2 and the MLP: 1e-3.
    # Logits of size ~20 after the final norm: 1e-3 absolute
    assert_terms_rebuild_the_vector_run(
        smol, batch, vec, terms, 29, ["blocks.29.ln1.hook_scale", "blocks.29.attn.hook_pattern"],
        mlp_tol=1e-3, logit_atol=1e-3, logit_rtol=1e-4)
