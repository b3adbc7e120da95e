"""Conditions along the batch (issue 14, speed): :func:`tvlens.runner.run_variants` with a KV
prefix cache for the conditions that touch only the last token and full forwards for the
others, its captures, :meth:`ResidualEdit.stack`, and :func:`condition_accuracies` against
one :func:`tvlens.evaluate` per condition (the reference path)."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.attribution import FrozenAttention, Reinjection, path_terms
from tvlens.evaluation import condition_accuracies
from tvlens.interventions import HeadPatch, ResidualEdit
from tvlens.interventions.base import last_token_only
from tvlens.prompts import PromptSet, make_examples, tokenize
from tvlens.runner import run, run_variants

from conftest import tiny_hf_llama


def _vec(model, layer, position="last", seed=1, size=3.0):
    g = torch.Generator().manual_seed(seed)
    return TaskVector.single(model, size * torch.randn(model.cfg.d_model, generator=g), layer, position)


@pytest.fixture
def hf(task):
    return tiny_hf_llama(f"{x} -> {y}\nQ: {x}\nA: {y}\n\n" for x, y in task.pairs)


def _conditions(model, ps):
    """Every kind of condition the analyses score: a vector at the query and before it,
    head ablations with and without it, re-injected terms and both controls."""
    vec, early = _vec(model, 0), _vec(model, 0, position=-2, seed=2)
    terms = path_terms(model, ps, vec)
    return {"zero_shot": None, "vector": vec, "early": early,
            "ablated": vec + HeadPatch.zero(model, [(1, 0), (2, 3)]),
            "icl_ablated": HeadPatch.zero(model, [(1, 1)]),
            "ov@entry": Reinjection(terms, "ov_weighted", "entry"),
            "mlp@final": Reinjection(terms, "mlp_total", "final"),
            "minus_ov": vec + Reinjection(terms, "ov_weighted", "entry", sign=-1.0),
            "frozen": vec + FrozenAttention(terms)}


def test_which_conditions_touch_only_the_last_token(tiny, task):
    ps = PromptSet.build(tiny, task, n=4, shots=1)
    touch = {k: last_token_only(v) for k, v in _conditions(tiny, ps).items()}
    assert touch == {"zero_shot": True, "vector": True, "early": False, "ablated": True,
                     "icl_ablated": True, "ov@entry": True, "mlp@final": True, "minus_ov": True,
                     "frozen": False}


@pytest.mark.parametrize("which,batch_size", [("native", 12), ("hf", 12), ("hf", 4)])
def test_conditions_along_the_batch_equal_evaluate_one_by_one(tiny, hf, task, which, batch_size):
    """Native model: every condition on full forwards; Hugging Face model: the KV cache for
    the seven that touch only the query, full forwards for the two that do not — the same
    accuracies and bootstrap intervals as one evaluate per condition (chunks of 3). With
    ``batch_size`` 12 the 6 prompts are one chunk, 2 conditions per forward; with 4, chunks
    of 4 and 2 prompts (per-prompt terms cut to each chunk)."""
    model = tiny if which == "native" else hf
    ps = PromptSet.build(model, task, n=6, shots=1)  # 1-shot: a prefix worth caching
    conds = _conditions(model, ps)
    got = condition_accuracies(model, ps, conds, batch_size=batch_size, seed=3)
    for name, iv in conds.items():
        want = tvlens.evaluate(model, task, vector=iv, prompts=ps, batch_size=3, seed=3).interval
        assert got[name] == want, name
    # random models answer nothing right, so also the argmax itself, per prompt and condition
    out = run_variants(model, ps.batch, [v for v in conds.values() if v is not None], batch_size=12)
    preds = [run(model, ps, v, batch_size=3).prediction for v in conds.values() if v is not None]
    assert torch.equal(out.predictions, torch.stack(preds))
    assert len({tuple(p.tolist()) for p in preds}) > 4  # the conditions do differ here


def test_cached_and_full_variants_agree_and_capture_the_query(hf, task, one_thread):
    """Mixed variants on a Hugging Face model: the cached ones (last token only) and the full
    ones give the probabilities, predictions and captured activations of full forwards, and
    the captures equal :func:`run`'s under each variant alone."""
    shots = (0, 1, 2, 1, 2)  # left padding inside the prefix
    ps = tokenize(hf, [make_examples([q], task.train, shots=k, seed=k)[0]
                       for k, q in zip(shots, task.test)])
    assert (ps.attention_mask == 0).any()
    variants = [_vec(hf, 1), _vec(hf, 0, position=-2, seed=2), HeadPatch.zero(hf, [(2, 1)]),
                _vec(hf, 2, seed=3)]
    name = "blocks.2.hook_resid_post"
    cached = run_variants(hf, ps, variants, prefix_cache=True, capture=name, batch_size=10)
    full = run_variants(hf, ps, variants, prefix_cache=False, capture=name, batch_size=10)
    assert cached.prefix_cache and not full.prefix_cache
    # cached vs full forwards reorder float32 reductions over 3 blocks (~1e-7 relative): 1e-5
    torch.testing.assert_close(cached.probs, full.probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.base, full.base, atol=1e-5, rtol=0)
    assert torch.equal(cached.predictions, full.predictions)
    for j, v in enumerate(variants):
        ref = run(hf, ps, v, capture=[name], logits=None, batch_size=None).captured[name]
        torch.testing.assert_close(cached.captured[j], ref, atol=1e-5 * ref.abs().max(), rtol=0)
        torch.testing.assert_close(full.captured[j], ref, atol=1e-5 * ref.abs().max(), rtol=0)
    clean = run(hf, ps, None, capture=[name], logits=None, batch_size=None).captured[name]
    torch.testing.assert_close(cached.base_captured, clean, atol=1e-5 * clean.abs().max(), rtol=0)


def test_a_common_vector_at_the_query_shares_the_cache(hf, task, one_thread):
    """Head ablations under a common vector at the last token: cached == full forwards; a
    per-example common vector is repeated with its prompts' rows."""
    ps = PromptSet.build(hf, task, n=4, shots=2)
    heads = [HeadPatch.zero(hf, [(layer, h)]) for layer in (1, 2) for h in (0, 3)]
    g = torch.Generator().manual_seed(4)
    per_example = TaskVector(3 * torch.randn(4, 1, 1, hf.cfg.d_model, generator=g), (1,), ("last",),
                             _vec(hf, 1).model)
    for common in (_vec(hf, 1), per_example):
        cached = run_variants(hf, ps.batch, heads, common=common, prefix_cache=True, batch_size=8)
        full = run_variants(hf, ps.batch, heads, common=common, prefix_cache=False, batch_size=8)
        assert cached.prefix_cache
        torch.testing.assert_close(cached.probs, full.probs, atol=1e-5, rtol=0)
        want = tvlens.evaluate(hf, task, vector=common, prompts=ps).records["correct"].tolist()
        assert (cached.base_prediction == ps.batch.first_answer_ids).tolist() == want


def test_stacked_residual_edits_write_each_copy_its_own_vector(tiny, task):
    ps = PromptSet.build(tiny, task, n=3)
    d = tiny.cfg.d_model
    shared = ResidualEdit((1,), ("last",), torch.ones(1, 1, d))
    per = ResidualEdit((1,), ("last",), torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 1, d))
    stacked = ResidualEdit.stack([shared, per], 3)
    assert stacked.vectors.shape == (6, 1, 1, d)
    # prompt i's copy j in row 2i + j: copy 0 the shared vector, copy 1 prompt i's own
    assert stacked.vectors[:, 0, 0, 0].tolist() == [1, 0, 1, 1, 1, 2]
    out = run_variants(tiny, ps.batch, [shared, per], batch_size=6)
    for j, v in enumerate((shared, per)):
        want = run(tiny, ps, v, logits="scores", batch_size=None).first_answer_logprob.exp()
        torch.testing.assert_close(out.probs[j], want, atol=1e-6, rtol=0)
    with pytest.raises(TvlensError, match="share layers, positions, mode and scale"):
        ResidualEdit.stack([shared, ResidualEdit((2,), ("last",), torch.ones(1, 1, d))], 3)
    with pytest.raises(TvlensError, match="not one per prompt"):
        ResidualEdit.stack([per], 4)


def test_bad_variant_input(tiny, hf, task):
    ps = PromptSet.build(tiny, task, n=2)
    with pytest.raises(TvlensError, match="no hook point 'blocks.9.hook_resid_post'"):
        run_variants(tiny, ps.batch, [_vec(tiny, 0)], capture="blocks.9.hook_resid_post")
    hps = PromptSet.build(hf, task, n=2)
    with pytest.raises(TvlensError, match="prefix_cache=True, but every variant touches positions "
                                          "before the last token"):
        run_variants(hf, hps.batch, [_vec(hf, 0, position=-2)], prefix_cache=True)
    with pytest.raises(TvlensError, match="prefix_cache=True, but the common intervention"):
        run_variants(hf, hps.batch, [_vec(hf, 0)], common=_vec(hf, 0, position=-2), prefix_cache=True)
