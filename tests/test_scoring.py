"""Scoring: the ``logits_to_keep`` fast paths against full logits, the bootstrap CI against
the exact binomial (Wilson) interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tvlens import TaskVector, forward, load_task, make_examples, tokenize
from tvlens.forward import with_answers
from tvlens.runner import answer_logprobs, greedy_answers, last_token_logits, pad_id
from tvlens.stats import bootstrap_ci


def _padded_batch(model, task, shots=(0, 1, 3)):
    examples = [make_examples([q], task.train, shots=k, seed=k)[0] for k, q in zip(shots, task.test)]
    batch = tokenize(model, examples)
    assert (batch.attention_mask == 0).any(), "the batch should be left-padded"
    return batch


def _reference_answer_logprobs(model, batch, hooks):
    """log p of every answer token from the full logits of the teacher-forced batch."""
    tf = with_answers(batch, pad_id(model))
    full = model.run_with_hooks(tf.input_ids, attention_mask=tf.attention_mask,
                                fwd_hooks=list(hooks)).float().log_softmax(-1)
    P = batch.seq_len
    out = torch.zeros(tf.targets.shape)
    for b, ids in enumerate(batch.answer_ids):
        for j, t in enumerate(ids):
            out[b, j] = full[b, P - 1 + j, t]  # column P-1+j predicts answer token j
    return out, tf.targets != -100


def _keep_vs_full(model, batch, hooks, tol):
    """``last_token_logits`` / ``answer_logprobs`` (logits_to_keep) vs full-logit references."""
    with torch.no_grad():
        full = forward(model, batch, hooks)  # every column's logits
        fast = last_token_logits(model, batch, hooks)
        kept = forward(model, batch, hooks, logits_to_keep=1)
        assert kept.shape[1] == 1
        scale = full.abs().max()
        torch.testing.assert_close(fast, full[:, -1], atol=tol * scale, rtol=tol)
        torch.testing.assert_close(kept[:, 0], full[:, -1], atol=tol * scale, rtol=tol)
        lp, valid = answer_logprobs(model, batch, hooks)
        ref, ref_valid = _reference_answer_logprobs(model, batch, hooks)
    assert torch.equal(valid.cpu(), ref_valid)
    torch.testing.assert_close(lp.cpu() * valid.cpu(), ref * ref_valid, atol=tol * scale, rtol=tol)
    assert valid.sum(-1).max() > 1  # multi-token answers: more than one kept column is read


def _greedy_vs_full(model, batch, hooks, steps):
    """Greedy decoding (logits_to_keep=1 per step) against full-logit argmax steps."""
    gen = greedy_answers(model, batch, hooks, max_new_tokens=steps)
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        for step in range(steps):
            logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=list(hooks))
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            assert [g[step] for g in gen] == nxt[:, 0].tolist()
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)


def test_logits_to_keep_equals_full_logits(tiny, task):
    """The native model slices full logits (it has no logits_to_keep of its own)."""
    from tvlens.tasks import Task

    # two-word answers, so the teacher-forced path reads more than one kept column
    longer = Task("two", tuple((x, f"{y} {y}") for x, y in task.pairs))
    batch = _padded_batch(tiny, longer)
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1)
    for hooks in ([], tv.hooks(tiny, batch)):
        # float32 logits O(1-10): slicing is exact, log_softmax over the same row too;
        # 1e-6 relative (~8 eps) leaves room for the kernels' reordering
        _keep_vs_full(tiny, batch, hooks, tol=1e-6)
    _greedy_vs_full(tiny, batch, tv.hooks(tiny, batch), steps=3)


@pytest.mark.slow
def test_logits_to_keep_equals_full_logits_on_smollm2(smol):
    """Hugging Face runs the unembedding on the kept columns only: another matmul shape."""
    task = load_task("country_capital")
    batch = _padded_batch(smol, task)
    g = torch.Generator().manual_seed(0)
    tv = TaskVector.single(smol, 3 * torch.randn(smol.cfg.d_model, generator=g), 10)
    for hooks in ([], tv.hooks(smol, batch)):
        # float32 logits of magnitude ~20 from a [B·k, 576] @ [576, 49152] matmul vs the
        # full one: summation order differs; 1e-5 relative and of the magnitude is ~80 eps
        _keep_vs_full(smol, batch, hooks, tol=1e-5)
    _greedy_vs_full(smol, batch, [], steps=3)


# ----- bootstrap CI ---------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(1000, 500), (2000, 400), (2000, 1500)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_bootstrap_ci_matches_the_wilson_interval(n, k, confidence):
    """The percentile bootstrap of a mean of 0/1 scores against the Wilson score interval.

    They differ by Wilson's pull of its centre towards ½ (known: |c_W − p̂|), the
    quantiles' 1/n grid and the Monte Carlo error of 2000 resamples (~0.06 se); with
    n in the thousands that sums to ~0.2 se, tight enough to catch a wrong confidence
    level (0.90 for 0.95 moves each end by 0.31 se) or resample size (√2 in width).
    """
    x = np.r_[np.ones(k), np.zeros(n - k)]
    np.random.default_rng(1).shuffle(x)
    lo, hi = bootstrap_ci(x, confidence=confidence)
    wilson = stats.binomtest(k, n).proportion_ci(confidence, method="wilson")
    p = k / n
    se = np.sqrt(p * (1 - p) / n)
    tol = abs((wilson.low + wilson.high) / 2 - p) + 1 / n + 0.1 * se
    assert tol < 0.25 * se  # the check is sharp
    assert lo == pytest.approx(wilson.low, abs=tol)
    assert hi == pytest.approx(wilson.high, abs=tol)


def test_bootstrap_ci_seed_and_degenerate_cases():
    x = np.r_[np.ones(300), np.zeros(700)]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)  # seeded: reproducible
    a, b = bootstrap_ci(x, seed=0), bootstrap_ci(x, seed=1)
    se = np.sqrt(0.3 * 0.7 / 1000)
    assert a != b  # the seed is used
    assert abs(a[0] - b[0]) < 0.25 * se and abs(a[1] - b[1]) < 0.25 * se  # MC error only
    narrow, wide = bootstrap_ci(x, confidence=0.8), bootstrap_ci(x, confidence=0.99)
    assert wide[0] < a[0] < narrow[0] and narrow[1] < a[1] < wide[1]  # nested by level
    assert bootstrap_ci(np.ones(12)) == (1.0, 1.0) and bootstrap_ci(np.zeros(5)) == (0.0, 0.0)
    assert all(np.isnan(bootstrap_ci([])))
