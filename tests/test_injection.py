"""The injection engine against oracles: exact residual edits, left padding, hook cleanup."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tvlens import (InjectionSpec, TaskVector, TvlensError, fingerprint, forward, injected,
                    injection_hooks)
from tvlens.activations import capture, residuals
from tvlens.prompts import make_examples, tokenize

RESID = "blocks.1.hook_resid_post"


def _batch(model, task, n=5):
    """A left-padded batch: prompts with 0, 1, 2, ... demonstrations."""
    examples = [make_examples([q], task.train, shots=i % 4, seed=3 + i)[0]
                for i, q in enumerate(task.test[:n])]
    return tokenize(model, examples)


def _resid(model, batch, hooks=()):
    with torch.no_grad():
        return capture(model, batch, [RESID], hooks)[RESID]


def _n_hooks(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a HookPoint
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points.values())


@pytest.mark.parametrize("position", ["last", -2, 1, "separator"])
def test_add_changes_exactly_the_chosen_positions(tiny, task, position):
    batch = _batch(tiny, task)
    v = torch.randn(tiny.cfg.d_model)
    spec = InjectionSpec((1,), (position,), v.reshape(1, 1, -1), "add")
    base = _resid(tiny, batch)
    new = _resid(tiny, batch, injection_hooks(tiny, batch, spec))
    cols = batch.position_index(position)
    rows = torch.arange(len(batch))
    # one float32 addition each side (|h| ~ 3): a few eps of the sum at most
    torch.testing.assert_close(new[rows, cols], base[rows, cols] + v, rtol=0, atol=1e-6)
    keep = torch.ones_like(base[..., 0], dtype=torch.bool)
    keep[rows, cols] = False
    # same batch shape, read at the hook itself: positions the hook does not write keep
    # the bits of the clean forward
    assert torch.equal(new[keep], base[keep])


def test_replace_sets_the_residual(tiny, task):
    batch = _batch(tiny, task)
    v = torch.randn(tiny.cfg.d_model)
    spec = InjectionSpec((1,), ("last",), v.reshape(1, 1, -1), "replace", scale=0.5)
    new = _resid(tiny, batch, injection_hooks(tiny, batch, spec))
    assert torch.equal(new[:, -1], (0.5 * v).expand(len(batch), -1))  # a value written


def test_all_positions_cover_every_real_token_and_no_padding(tiny, task):
    batch = _batch(tiny, task)
    assert (batch.attention_mask == 0).any(), "the batch should be padded for this test"
    v = torch.randn(tiny.cfg.d_model)
    base = _resid(tiny, batch)
    new = _resid(tiny, batch, injection_hooks(tiny, batch, InjectionSpec((1,), ("all",), v.reshape(1, 1, -1))))
    real = batch.attention_mask.bool()
    torch.testing.assert_close(new[real], base[real] + v, rtol=0, atol=1e-6)
    assert torch.equal(new[~real], base[~real])  # padding: never written


def test_per_example_vectors_land_on_their_own_rows(tiny, task):
    batch = _batch(tiny, task)
    vecs = torch.randn(len(batch), 2, 1, tiny.cfg.d_model)
    spec = InjectionSpec((0, 1), ("last",), vecs, "replace")
    with torch.no_grad():
        store = capture(tiny, batch, ["blocks.0.hook_resid_post", RESID], injection_hooks(tiny, batch, spec))
    # replace writes the stored values: bit for bit
    assert torch.equal(store["blocks.0.hook_resid_post"][:, -1], vecs[:, 0, 0])
    assert torch.equal(store[RESID][:, -1], vecs[:, 1, 0])


def _logits_close(a, b):
    """Two float32 forwards over the same batch whose inputs agree bit for bit: equal up to
    the kernels (which need not be deterministic); 1e-6 of the logits' magnitude is ~8 eps."""
    torch.testing.assert_close(a, b, atol=1e-6 * b.abs().max(), rtol=0)


def test_zero_vector_changes_nothing(tiny, task):
    batch = _batch(tiny, task)
    spec = InjectionSpec((0, 2), ("last", 1), torch.zeros(2, 2, tiny.cfg.d_model), "add")
    seen = []
    grab = [(f"blocks.{layer}.hook_resid_post", lambda r, hook: seen.append(r.clone()))
            for layer in (0, 2)]
    with torch.no_grad():
        base = forward(tiny, batch)
        hooks = injection_hooks(tiny, batch, spec)
        # around each injection hook, in one forward: x + 0 == x, bit for bit (IEEE)
        forward(tiny, batch, [grab[0], hooks[0], grab[0], grab[1], hooks[1], grab[1]])
        with injected(tiny, batch, spec):
            new = forward(tiny, batch)
    assert len(seen) == 4
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[2], seen[3])
    _logits_close(new, base)


def test_scale_equals_scaled_vector(tiny, task):
    batch = _batch(tiny, task)
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1)
    with torch.no_grad():
        with tv.apply(tiny, batch, scale=2.0):
            a = forward(tiny, batch)
        with (2 * tv).apply(tiny, batch):
            b = forward(tiny, batch)
        with (tv - tv).apply(tiny, batch):
            c = forward(tiny, batch)
        base = forward(tiny, batch)
    # scale·v and (2·v) round differently in the last bit: logits ~5, 1e-5 is ~20 eps
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.count_nonzero((tv - tv).vectors) == 0  # x − x == 0: exact arithmetic
    _logits_close(c, base)


def test_gradients_flow_into_the_vector(tiny, task):
    batch = _batch(tiny, task)
    v = torch.zeros(1, 1, tiny.cfg.d_model, requires_grad=True)
    logits = tiny.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
                                 fwd_hooks=injection_hooks(tiny, batch, InjectionSpec((0,), ("last",), v)))
    logits[:, -1].logsumexp(-1).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_hooks_are_removed_even_when_the_body_raises(tiny, task):
    batch = _batch(tiny, task)
    before = _n_hooks(tiny)
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1)
    with pytest.raises(RuntimeError, match="boom"):
        with tv.apply(tiny, batch):
            assert _n_hooks(tiny) == before + 1
            raise RuntimeError("boom")
    assert _n_hooks(tiny) == before
    with pytest.raises(KeyError):
        with injected(tiny, batch, tv.spec()):
            raise KeyError("x")
    assert _n_hooks(tiny) == before


def test_injection_survives_greedy_generation(tiny, task):
    """Re-running prompt + generated tokens keeps the vector on the prompt's columns."""
    from tvlens.runner import greedy_answers

    batch = _batch(tiny, task)
    v = 5 * torch.randn(tiny.cfg.d_model)
    hooks = TaskVector.single(tiny, v, 0, mode="add").hooks(tiny, batch)
    gen = greedy_answers(tiny, batch, hooks, max_new_tokens=3)
    # oracle: generate by hand, one full forward per step, injecting at the prompt's last column
    ids, mask = batch.input_ids, batch.attention_mask
    for step in range(3):
        with torch.no_grad():
            logits = tiny.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[
                ("blocks.0.hook_resid_post", lambda r, hook: r.index_put(
                    (torch.arange(len(batch)), torch.full((len(batch),), batch.seq_len - 1)),
                    v.expand(len(batch), -1), accumulate=True))])
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        assert [g[step] for g in gen] == nxt[:, 0].tolist()
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shots=st.lists(st.integers(0, 4), min_size=2, max_size=5), seed=st.integers(0, 1000))
def test_left_padded_batch_equals_one_by_one(tiny, task, shots, seed):
    """Random prompt lengths: the batch's last-token logits and residuals match single runs."""
    examples = []
    for i, k in enumerate(shots):
        examples += make_examples([task.test[i]], task.train, shots=k, seed=seed + i)
    batch = tokenize(tiny, examples)
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1)
    with torch.no_grad():
        batched = forward(tiny, batch, tv.hooks(tiny, batch))[:, -1]
        res_b = residuals(tiny, batch, [0, 2], "last")
        for i, ex in enumerate(examples):
            one = tokenize(tiny, [ex])
            single = forward(tiny, one, tv.hooks(tiny, one))[0, -1]
            # float32, another batch shape and padding: the masked softmax and the
            # matmuls reduce in another order; logits and residuals are O(1-10), so 1e-4
            # absolute (plus 1e-5 relative) is ~100 eps of them and far below any real
            # error (a vector on the wrong column moves them by O(1))
            torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(res_b[i], residuals(tiny, one, [0, 2], "last")[0],
                                       rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bad, message", [
    (dict(layers=(7,)), "out of range"),
    (dict(layers=()), "no layers"),
    (dict(vectors=torch.zeros(1, 1, 5)), "does not fit"),
    (dict(vectors=torch.full((1, 1, 32), float("nan"))), "NaN"),
    (dict(mode="mix"), "mode"),
    (dict(positions=(99,)), "outside prompt"),
    (dict(positions=("middle",)), "unknown position"),
])
def test_bad_injections_are_refused_clearly(tiny, task, bad, message):
    batch = _batch(tiny, task)
    kwargs = dict(layers=(1,), positions=("last",), vectors=torch.zeros(1, 1, tiny.cfg.d_model), mode="add")
    kwargs.update(bad)
    with pytest.raises(TvlensError, match=message):
        injection_hooks(tiny, batch, InjectionSpec(**kwargs))


@pytest.mark.slow
def test_left_padded_injection_equals_one_by_one_on_smollm2(smol):
    """Batched (left-padded) injection at two layers × two positions against single runs."""
    from tvlens import load_task

    task = load_task("country_capital")
    examples = [make_examples([q], task.train, shots=k, seed=k)[0] for k, q in zip((0, 1, 3), task.test)]
    batch = tokenize(smol, examples)
    assert (batch.attention_mask == 0).any()
    g = torch.Generator().manual_seed(0)
    v = 3 * torch.randn(2, 2, smol.cfg.d_model, generator=g)
    tv = TaskVector(v, (5, 15), ("last", "separator"), fingerprint(smol))
    with torch.no_grad():
        batched = forward(smol, batch, tv.hooks(smol, batch))[:, -1]
        clean = forward(smol, batch)[:, -1]
        for i, ex in enumerate(examples):
            one = tokenize(smol, [ex])
            single = forward(smol, one, tv.hooks(smol, one))[0, -1]
            # float32 through 30 blocks, another shape and padding: logits of magnitude
            # ~20 move by ~3e-5 (1.5e-6 of it, ~12 eps); allow 1e-5 of the magnitude
            torch.testing.assert_close(batched[i], single, rtol=1e-5,
                                       atol=1e-5 * single.abs().max())
    assert (batched - clean).abs().max() > 1.0  # the vector does change the logits
