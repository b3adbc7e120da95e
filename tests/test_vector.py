"""TaskVector: files (bit-exact, atomic, refusals) and arithmetic."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_hf_llama
import torch

from tvlens import TaskVector, TvlensError, fingerprint, tiny_model


def _tv(model, **kw):
    return TaskVector(torch.randn(2, 1, model.cfg.d_model), (0, 2), ("last",), fingerprint(model),
                      method="test", hyperparameters={"lr": 0.1}, task="tiny", **kw)


def test_save_load_is_bit_exact(tiny, tmp_path):
    tv = _tv(tiny, mode="replace", scale=0.5)
    path = tv.save(tmp_path / "v.safetensors")
    back = TaskVector.load(path, tiny)
    assert torch.equal(back.vectors, tv.vectors)
    assert (back.layers, back.positions, back.mode, back.scale, back.method, back.task) == (
        tv.layers, tv.positions, tv.mode, tv.scale, tv.method, tv.task)
    assert back.hyperparameters == {"lr": 0.1} and back.model == tv.model


def test_load_refuses_another_model(tiny, tmp_path):
    path = _tv(tiny).save(tmp_path / "v.safetensors")
    other = tiny_model(d_vocab=50, n_layers=3, d_model=32, name="other")
    with pytest.raises(TvlensError, match="was made for"):
        TaskVector.load(path, other)


def test_existing_file_is_kept_unless_overwrite(tiny, tmp_path):
    path = tmp_path / "v.safetensors"
    first = _tv(tiny)
    first.save(path)
    with pytest.raises(TvlensError, match="exists"):
        _tv(tiny).save(path)
    assert torch.equal(TaskVector.load(path).vectors, first.vectors)
    second = _tv(tiny)
    second.save(path, overwrite=True)
    assert torch.equal(TaskVector.load(path).vectors, second.vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp files left


def test_save_into_missing_folder_is_refused(tiny, tmp_path):
    with pytest.raises(TvlensError, match="does not exist"):
        _tv(tiny).save(tmp_path / "nope" / "v.safetensors")


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_malformed_file_is_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TvlensError, match="not a readable tvlens vector"):
        TaskVector.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(TvlensError, match="not a tvlens vector"):
        TaskVector.load(tmp_path / "w.safetensors")


def test_metadata_is_plain_json(tiny, tmp_path):
    from safetensors import safe_open

    path = _tv(tiny).save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tvlens"])
    assert meta["model"]["name"] == tiny.cfg.model_name and meta["layers"] == [0, 2]


def test_arithmetic(tiny):
    a, b = _tv(tiny), _tv(tiny)
    assert torch.equal((a + b).vectors, a.vectors + b.vectors)
    assert torch.equal((a - b).vectors, a.vectors - b.vectors)
    assert torch.equal((-a).vectors, -a.vectors)
    assert torch.equal((3 * a).vectors, a.vectors * 3) and torch.equal((a * 3).vectors, a.vectors * 3)
    assert torch.equal((a / 2).vectors, a.vectors / 2)
    assert (a + b).task == "tiny+tiny"
    with pytest.raises(TypeError):
        a + 1  # noqa: B018
    with pytest.raises(TypeError):
        a * "x"  # noqa: B018


def test_arithmetic_refuses_mismatches(tiny):
    a = _tv(tiny)
    b = TaskVector(torch.randn(2, 1, tiny.cfg.d_model), (0, 1), ("last",), fingerprint(tiny))
    with pytest.raises(TvlensError, match="different layers"):
        a + b  # noqa: B018
    c = TaskVector(a.vectors, a.layers, a.positions, fingerprint(tiny), mode="replace")
    with pytest.raises(TvlensError, match="different mode"):
        a + c  # noqa: B018


def test_wrong_width_is_refused(tiny):
    with pytest.raises(TvlensError, match="width"):
        TaskVector(torch.randn(1, 1, 7), (0,), ("last",), fingerprint(tiny))


# ----- notebook conveniences: select, to ------------------------------------------------
def test_select_is_the_sub_vector_in_the_order_given(tiny):
    tv = TaskVector(torch.randn(2, 3, tiny.cfg.d_model), (0, 2), ("last", -2, "all"),
                    fingerprint(tiny), method="test")
    sub = tv.select(layers=2, positions=["all", "last"])
    assert sub.layers == (2,) and sub.positions == ("all", "last")
    assert torch.equal(sub.vectors[0, 0], tv.vectors[1, 2])  # bits copied
    assert torch.equal(sub.vectors[0, 1], tv.vectors[1, 0])
    assert sub.method == "test" and sub.model == tv.model
    assert torch.equal(tv.select(layers=[0]).vectors, tv.vectors[:1])  # positions: all of them
    per = TaskVector(torch.randn(4, 2, 1, tiny.cfg.d_model), (0, 2), ("last",), fingerprint(tiny))
    assert torch.equal(per.select(layers=2).vectors, per.vectors[:, 1:])


def test_bad_select_names_what_the_vector_has(tiny):
    tv = _tv(tiny)
    with pytest.raises(TvlensError, match=r"has layers \(0, 2\), not 1"):
        tv.select(layers=1)
    with pytest.raises(TvlensError, match="has positions .*'separator'"):
        tv.select(positions="separator")
    with pytest.raises(TvlensError, match="once"):
        tv.select(layers=[0, 0])


def test_to_changes_dtype_and_keeps_the_rest(tiny):
    tv = _tv(tiny)
    half = tv.to(dtype=torch.float16)
    assert half.vectors.dtype == torch.float16 and half.layers == tv.layers
    assert torch.equal(half.vectors, tv.vectors.half())
    assert tv.to("cpu").vectors.device.type == "cpu"


# ----- provenance: versions, unknown fields, file mode ----------------------------------
def test_versions_are_stamped_saved_and_read_back(tiny, tmp_path):
    from tvlens.io import versions

    tv = _tv(tiny)
    assert tv.versions == versions() and set(tv.versions) == {
        "tvlens", "transformer-lens", "transformers", "torch"}
    back = TaskVector.load(tv.save(tmp_path / "v.safetensors"))
    assert back.versions == tv.versions


def test_old_file_without_versions_loads_with_none(tiny, tmp_path):
    from tvlens.io import save_tensors

    meta = _tv(tiny).metadata()
    del meta["versions"]
    path = save_tensors(tmp_path / "old.safetensors", {"vectors": torch.zeros(2, 1, 32)}, meta,
                        key="tvlens")
    assert TaskVector.load(path).versions == {}


def test_bad_file_from_a_newer_tvlens_names_the_unknown_fields(tiny, tmp_path):
    from tvlens.io import save_tensors

    meta = _tv(tiny).metadata() | {"steering": 1, "basis": "pca"}
    path = save_tensors(tmp_path / "new.safetensors", {"vectors": torch.zeros(2, 1, 32)}, meta,
                        key="tvlens")
    with pytest.raises(TvlensError, match="'basis', 'steering'.*upgrade tvlens"):
        TaskVector.load(path)


def test_saved_file_has_the_usual_mode(tiny, tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    path = _tv(tiny).save(tmp_path / "v.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# ----- apply(model) without a batch -----------------------------------------------------
def _n_hooks(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a HookPoint
    tl = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in points.values())
    hf = model.original_model
    return tl + len(hf._forward_pre_hooks) + len(hf._forward_hooks) + ("generate" in model.__dict__)


def _examples(task, shots):
    from tvlens.prompts import make_examples

    return [make_examples([q], task.train, shots=k, seed=3 + i)[0]
            for i, (q, k) in enumerate(zip(task.test, shots))]


def _logits_close(a, b):
    """Float32 forwards over the same inputs with the same edit: equal up to the kernels;
    logits are O(1-10), 1e-5 of their magnitude is ~100 eps."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max())


@pytest.mark.parametrize("positions, mode", [(("last",), "add"), ((-2, "all"), "add"),
                                             (("last",), "replace")])
def test_unbound_apply_on_one_prompt_equals_batch_bound(tiny, task, positions, mode):
    from tvlens.prompts import tokenize
    from tvlens.runner import forward

    one = tokenize(tiny, _examples(task, [2]))
    tv = TaskVector(3 * torch.randn(2, len(positions), tiny.cfg.d_model), (0, 2), positions,
                    fingerprint(tiny), mode=mode)
    with torch.no_grad():
        with tv.apply(tiny, one):
            bound = forward(tiny, one)
        with tv.apply(tiny):
            free = tiny(one.input_ids)  # no mask, no batch
        clean = tiny(one.input_ids)
    _logits_close(free, bound)
    assert (free - clean).abs().max() > 0.1  # the vector is really there


@pytest.mark.parametrize("positions", [("last",), (-3, "all")])
def test_unbound_apply_on_a_left_padded_batch_equals_batch_bound(tiny, task, positions):
    from tvlens.prompts import tokenize
    from tvlens.runner import forward

    batch = tokenize(tiny, _examples(task, [0, 3, 1, 2]))
    assert (batch.attention_mask == 0).any()
    tv = TaskVector(3 * torch.randn(1, len(positions), tiny.cfg.d_model), (1,), positions,
                    fingerprint(tiny), scale=0.5)
    with torch.no_grad():
        with tv.apply(tiny, batch):
            bound = forward(tiny, batch)
        with tv.apply(tiny):
            free = tiny(batch.input_ids, attention_mask=batch.attention_mask)
            also = forward(tiny, batch)  # run_with_hooks goes through the same wrapped module
    real = batch.attention_mask.bool()
    _logits_close(free[real], bound[real])
    _logits_close(also[real], bound[real])


def test_unbound_per_example_vectors_land_on_their_rows(tiny, task):
    from tvlens.prompts import tokenize
    from tvlens.runner import forward

    batch = tokenize(tiny, _examples(task, [0, 2, 1]))
    tv = TaskVector(torch.randn(3, 1, 1, tiny.cfg.d_model), (1,), ("last",), fingerprint(tiny),
                    mode="replace")
    with torch.no_grad():
        with tv.apply(tiny, batch):
            bound = forward(tiny, batch)[:, -1]
        with tv.apply(tiny):
            free = forward(tiny, batch)[:, -1]
    _logits_close(free, bound)


def test_unbound_apply_follows_generate(tiny, task):
    """Greedy generate under the unbound vector: the first token is the batch-bound prediction,
    and every token is the batch-bound greedy decoder's (the vector stays on the prompt)."""
    from tvlens.prompts import tokenize
    from tvlens.runner import greedy_answers

    batch = tokenize(tiny, _examples(task, [0, 3, 1]))
    tv = TaskVector.single(tiny, 5 * torch.randn(tiny.cfg.d_model), 0)
    want = greedy_answers(tiny, batch, tv.hooks(tiny, batch), max_new_tokens=3)
    with torch.no_grad(), tv.apply(tiny):
        out = tiny.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=3,
                            do_sample=False, stop_at_eos=False, verbose=False)
    assert out[:, batch.seq_len:].tolist() == want
    clean = greedy_answers(tiny, batch, max_new_tokens=3)
    assert clean != want  # the vector changes what is generated


@pytest.fixture
def tiny_llama(task):
    """A random 3-layer Hugging Face ``LlamaForCausalLM`` under a TransformerBridge: its
    ``generate`` uses the KV cache (the native tiny model keeps none)."""
    return tiny_hf_llama(f"{x} -> {y}\n" for x, y in task.pairs)


@pytest.mark.parametrize("position", ["last", "all"])
def test_unbound_apply_with_kv_cached_generate(tiny_llama, task, position):
    """KV-cached steps see one new token: "last" was injected in the prefill, "all" also
    covers the new token; both caches agree with full re-runs (the batch-bound decoder for
    "last", generation without a cache for both)."""
    from tvlens.prompts import tokenize
    from tvlens.runner import greedy_answers

    model = tiny_llama
    batch = tokenize(model, _examples(task, [0, 2, 1]))
    tv = TaskVector.single(model, 20 * torch.randn(model.cfg.d_model), 1, position)
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False,
              stop_at_eos=False, verbose=False)
    with torch.no_grad(), tv.apply(model):
        cached = model.generate(batch.input_ids, use_past_kv_cache=True, **kw)[:, batch.seq_len:]
        full = model.generate(batch.input_ids, use_past_kv_cache=False, **kw)[:, batch.seq_len:]
    assert cached.tolist() == full.tolist()
    bound = greedy_answers(model, batch, tv.hooks(model, batch), max_new_tokens=3)
    assert [row[0] for row in cached.tolist()] == [row[0] for row in bound]
    if position == "last":
        assert cached.tolist() == bound


@pytest.mark.parametrize("position", ["last", "all"])
def test_batch_bound_apply_with_kv_cached_generate(tiny_llama, task, position):
    """The batch-bound path on KV-cached steps: "all" covers each new token as in a
    generation without a cache, "last" stays on the prompt (same tokens either way)."""
    from tvlens.prompts import tokenize

    model = tiny_llama
    batch = tokenize(model, _examples(task, [0, 2, 1]))
    tv = TaskVector.single(model, 20 * torch.randn(model.cfg.d_model), 1, position)
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False,
              stop_at_eos=False, verbose=False)
    with torch.no_grad(), tv.apply(model, batch):
        cached = model.generate(batch.input_ids, use_past_kv_cache=True, **kw)[:, batch.seq_len:]
        full = model.generate(batch.input_ids, use_past_kv_cache=False, **kw)[:, batch.seq_len:]
    assert cached.tolist() == full.tolist()
    with torch.no_grad(), tv.apply(model):
        unbound = model.generate(batch.input_ids, use_past_kv_cache=True, **kw)[:, batch.seq_len:]
    assert unbound.tolist() == cached.tolist()


def test_unbound_hooks_are_removed_on_exit_and_on_error(tiny, task):
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1)
    before = _n_hooks(tiny)
    with tv.apply(tiny):
        assert _n_hooks(tiny) == before + 4  # resid hook, pre + post hooks, generate wrapper
    assert _n_hooks(tiny) == before and "generate" not in tiny.__dict__
    with pytest.raises(RuntimeError, match="boom"):
        with tv.apply(tiny):
            raise RuntimeError("boom")
    assert _n_hooks(tiny) == before
    with tv.apply(tiny), tv.apply(tiny):  # nested: each restores what it found
        assert _n_hooks(tiny) == before + 7  # one generate attribute, wrapped twice
    assert _n_hooks(tiny) == before and "generate" not in tiny.__dict__


@pytest.mark.parametrize("position", [0, 3, "separator"])
def test_bad_unbound_positions_ask_for_the_batch(tiny, position):
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1, position)
    before = _n_hooks(tiny)
    with pytest.raises(TvlensError, match=r"needs the prompt batch.*tv.apply\(model, batch\)"):
        with tv.apply(tiny):
            pass
    assert _n_hooks(tiny) == before


def test_bad_unbound_offset_outside_a_prompt_is_refused(tiny, task):
    tv = TaskVector.single(tiny, torch.randn(tiny.cfg.d_model), 1, -50)
    ids = tiny.to_tokens("qaa ->")
    with pytest.raises(TvlensError, match="falls outside prompt 0"):
        with torch.no_grad(), tv.apply(tiny):
            tiny(ids)


@pytest.mark.slow
def test_unbound_apply_generates_like_the_batch_bound_vector_on_smollm2(smol):
    """SmolLM2 (HF KV cache): a left-padded batch under an add vector at layer 10, generated
    with and without the cache, against the batch-bound prediction and greedy decoder."""
    from tvlens import load_task
    from tvlens.prompts import make_examples, tokenize
    from tvlens.runner import forward, greedy_answers

    task = load_task("country_capital")
    examples = [make_examples([q], task.train, shots=k, seed=k)[0] for k, q in zip((0, 2, 1), task.test)]
    batch = tokenize(smol, examples)
    assert (batch.attention_mask == 0).any()
    g = torch.Generator().manual_seed(0)
    tv = TaskVector.single(smol, 4 * torch.randn(smol.cfg.d_model, generator=g), 10)
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False,
              stop_at_eos=False, verbose=False)
    with torch.no_grad():
        bound_logits = forward(smol, batch, tv.hooks(smol, batch))[:, -1]
        with tv.apply(smol):
            free_logits = smol(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
            cached = smol.generate(batch.input_ids, use_past_kv_cache=True, **kw)[:, batch.seq_len:]
            full = smol.generate(batch.input_ids, use_past_kv_cache=False, **kw)[:, batch.seq_len:]
    # float32 through 30 blocks, same inputs and edit: 1e-5 of the logits' magnitude (~20)
    torch.testing.assert_close(free_logits, bound_logits, rtol=0, atol=1e-5 * bound_logits.abs().max())
    assert cached[:, 0].tolist() == bound_logits.argmax(-1).tolist()
    bound = greedy_answers(smol, batch, tv.hooks(smol, batch), max_new_tokens=3)
    assert cached.tolist() == full.tolist() == bound


def test_per_example_vector_is_cut_to_each_chunk_of_the_runner(tiny, task):
    from tvlens.prompts import tokenize
    from tvlens.runner import run

    batch = tokenize(tiny, _examples(task, [0, 2, 1, 3, 0]))
    tv = TaskVector(torch.randn(5, 1, 1, tiny.cfg.d_model), (1,), ("last",), fingerprint(tiny))
    assert torch.equal(tv.for_rows([3, 1]).vectors, tv.vectors[[3, 1]])
    whole = run(tiny, batch, tv, logits="last", batch_size=None)
    chunked = run(tiny, batch, tv, logits="last", batch_size=2)
    # chunks re-padded to their own width: another padding, same real tokens (float32, ~100 eps)
    torch.testing.assert_close(chunked.last_logits, whole.last_logits, rtol=1e-5, atol=1e-4)
