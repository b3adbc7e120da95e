"""Extracted vectors: ICL-TV, vanilla, function vectors, layer sweeps (oracles on tiny models)."""

from __future__ import annotations

import pytest
from conftest import tiny_hf_llama
import torch
from torch import Tensor

from tvlens import TvlensError, evaluate, make_examples, tokenize
from tvlens.extract import (
    extract,
    function_vector,
    fv_from_heads,
    icl_task_vector,
    indirect_effects,
    indirect_effects_loop,
    layer_sweep,
    mean_head_outputs,
    post_norm_scales,
    query_pool,
    shuffled_prompts,
    vanilla_task_vector,
)
from tvlens.prompts import get_template, sample_queries
from tvlens.results import HeadTable
from tvlens.tasks import Task


@pytest.fixture
def ragged():
    """Inputs of 1-3 words, so batched prompts are left-padded to different lengths."""
    pairs = tuple((" ".join(f"w{j % 40}" for j in range(i, i + 1 + i % 3)), f"o{i % 7}")
                  for i in range(40))
    return Task("ragged", pairs)


@pytest.fixture
def tiny_llama(ragged):
    """A random 3-layer GQA Hugging Face ``LlamaForCausalLM`` under a TransformerBridge
    (0.1 s), so the Hugging Face KV-cache path runs without the embedded model. Its
    tokenizer covers ``ragged`` in the "qa" template; ``initializer_range=0.2`` makes the
    heads matter (AIEs ~1e-3, not the ~1e-6 of the default 0.02)."""
    return tiny_hf_llama(f"Q: {x}\nA: {y}\n\n" for x, y in ragged.pairs)


def _no_runtime_warning(record) -> None:
    assert not [w for w in record if issubclass(w.category, RuntimeWarning)], \
        [str(w.message) for w in record]


def _one_by_one(model, examples, template, hook_name):
    """Oracle: each prompt alone (no padding), the activation at its final column."""
    out = []
    for ex in examples:
        b = tokenize(model, [ex], template)
        _, cache = model.run_with_cache(b.input_ids, names_filter=[hook_name])
        out.append(cache[hook_name][0, -1])
    return torch.stack(out)


def test_icl_task_vector_is_mean_of_cached_residuals(tiny, ragged):
    tv = icl_task_vector(tiny, ragged, [0, 2], shots=3, n_prompts=7, batch_size=3, seed=4)
    examples = make_examples(sample_queries(ragged, 7, seed=4, shots=3), ragged.train, shots=3, seed=4)
    assert len({len(tokenize(tiny, [e]).input_ids[0]) for e in examples}) > 1  # really ragged
    for i, layer in enumerate([0, 2]):
        oracle = _one_by_one(tiny, examples, get_template(tv.template),  # the default: hendel
                             f"blocks.{layer}.hook_resid_post").mean(0)
        torch.testing.assert_close(tv.vectors[i, 0], oracle, atol=1e-5, rtol=1e-5)
    assert tv.mode == "replace" and tv.layers == (0, 2) and tv.positions == ("last",)
    assert tv.template == "hendel"  # Hendel's own format is the method's default


def test_vanilla_is_icl_minus_zero_shot_mean(tiny, ragged):
    van = vanilla_task_vector(tiny, ragged, 1, shots=3, n_prompts=6, batch_size=4, seed=2)
    icl = icl_task_vector(tiny, ragged, 1, shots=3, n_prompts=6, batch_size=4, seed=2)
    zero = make_examples(sample_queries(ragged, 6, seed=2, shots=3), shots=0)
    oracle = _one_by_one(tiny, zero, get_template(van.template), "blocks.1.hook_resid_post").mean(0)
    torch.testing.assert_close(van.vectors[0, 0], icl.vectors[0, 0] - oracle, atol=1e-5, rtol=1e-5)
    assert van.mode == "add" and van.method == "vanilla"


def test_mean_head_outputs_oracle(tiny, ragged):
    mz = mean_head_outputs(tiny, ragged, pool=ragged.train, shots=2, n_prompts=5, template="qa", batch_size=2, seed=3)
    examples = make_examples(sample_queries(ragged, 5, seed=3, shots=2), ragged.train, shots=2, seed=3)
    for layer in range(3):
        oracle = _one_by_one(tiny, examples, get_template("qa"), f"blocks.{layer}.attn.hook_z").mean(0)
        torch.testing.assert_close(mz[layer], oracle, atol=1e-5, rtol=1e-5)


def test_shuffled_prompts_keep_inputs_and_permute_outputs(tiny, task):
    shuf = shuffled_prompts(tiny, task, pool=task.train, shots=5, n_prompts=6, seed=7).examples
    clean = make_examples(sample_queries(task, 6, seed=7, shots=5), task.train, shots=5, seed=7)
    assert len(shuf) == len(clean) == 6
    for s, c in zip(shuf, clean):
        assert (s.x, s.y) == (c.x, c.y)
        assert [a for a, _ in s.demos] == [a for a, _ in c.demos]
        assert sorted(b for _, b in s.demos) == sorted(b for _, b in c.demos)
    assert any([b for _, b in s.demos] != [b for _, b in c.demos] for s, c in zip(shuf, clean))


def test_batched_indirect_effects_equal_per_head_loop(tiny, ragged):
    mz = mean_head_outputs(tiny, ragged, pool=ragged.train, shots=3, n_prompts=4, batch_size=4)
    batch = shuffled_prompts(tiny, ragged, pool=ragged.train, shots=3, n_prompts=3, seed=1)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # left padding exercised
    slow = indirect_effects_loop(tiny, ragged, mz, batch=batch)
    assert slow.abs().max() > 1e-4  # patching does something, so equality means something
    for batch_size in (1, 7, 64):  # one head per forward, uneven chunks, all heads at once
        fast = indirect_effects(tiny, ragged, mz, batch=batch, batch_size=batch_size)
        assert fast.shape == (3, 4) and not torch.isnan(fast).any()
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_indirect_effects_head_subset_and_no_cache_model(tiny, task):
    mz = mean_head_outputs(tiny, task, pool=task.train, shots=3, n_prompts=4)
    heads = [(2, 1), (0, 3)]
    batch = shuffled_prompts(tiny, task, pool=task.train, shots=3, n_prompts=2)
    aie = indirect_effects(tiny, task, mz, batch=batch, heads=heads)
    assert torch.isnan(aie).sum() == 12 - 2
    torch.testing.assert_close(aie[2, 1], indirect_effects_loop(tiny, task, mz, batch=batch)[2, 1])
    with pytest.raises(TvlensError, match="KV cache"):
        indirect_effects(tiny, task, mz, batch=batch, prefix_cache=True)
    with pytest.raises(TvlensError, match="n_layers, n_heads, d_head"):
        indirect_effects(tiny, task, mz[:2], batch=batch)
    with pytest.raises(TvlensError, match="head 9"):
        indirect_effects(tiny, task, mz, batch=batch, heads=[(0, 9)])


def test_native_model_keeps_no_kv_cache_so_auto_runs_full_forwards(tiny, ragged):
    """boot_native models take no Hugging Face cache: "auto" quietly runs full forwards
    (equal to the loop), True refuses with the reason and the way out."""
    import warnings

    from tvlens import kv_cache

    mz = mean_head_outputs(tiny, ragged, pool=ragged.train, shots=3, n_prompts=4, batch_size=4)
    batch = shuffled_prompts(tiny, ragged, pool=ragged.train, shots=3, n_prompts=3, seed=1)
    cache, form, why = kv_cache.prefix_cache(tiny, batch.input_ids, batch.attention_mask)
    assert cache is None and form is None and "keeps no Hugging Face KV cache" in why
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        auto = indirect_effects(tiny, ragged, mz, batch=batch, batch_size=7)
    _no_runtime_warning(record)  # nothing was expected of this model, so nothing to say
    torch.testing.assert_close(auto, indirect_effects_loop(tiny, ragged, mz, batch=batch),
                               atol=1e-5, rtol=0)
    with pytest.raises(TvlensError, match=r"no Hugging Face KV cache; use prefix_cache=False"):
        indirect_effects(tiny, ragged, mz, batch=batch, prefix_cache=True)


def test_bad_prefix_cache_value(tiny, task):
    with pytest.raises(TvlensError, match="prefix_cache must be True, False or 'auto'"):
        indirect_effects(tiny, task, torch.zeros(3, 4, 8), prefix_cache="yes")


# float32 tolerance for cached vs loop AIEs: both are means of probabilities in [0, 1]
# that differ only in float reduction order (prefix + last token vs one full forward);
# float32 rounds at ~1.2e-7 relative, and measured differences are ≤ 3e-8 on tiny_llama and
# ≤ 2.3e-7 on SmolLM2 (30 layers), while a cache without the prefix moves them by ≥ 1e-4.
AIE_ATOL_F32 = 1e-6


def test_kv_cached_indirect_effects_equal_loop_on_a_tiny_hf_llama(tiny_llama, ragged):
    import warnings

    from tvlens import kv_cache

    mz = mean_head_outputs(tiny_llama, ragged, pool=ragged.train, shots=3, n_prompts=4, batch_size=4)
    batch = shuffled_prompts(tiny_llama, ragged, pool=ragged.train, shots=3, n_prompts=3, seed=1)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # left padding exercised
    cache, form, why = kv_cache.prefix_cache(tiny_llama, batch.input_ids, batch.attention_mask)
    assert cache is not None, why  # this transformers / TransformerLens pairing has a route
    assert [cache.get_seq_length(l) for l in range(3)] == [batch.input_ids.shape[1] - 1] * 3
    slow = indirect_effects_loop(tiny_llama, ragged, mz, batch=batch)
    assert slow.abs().max() > 100 * AIE_ATOL_F32  # patching matters: equality means something
    for batch_size in (1, 7, 64):  # one head per forward, uneven chunks, all heads at once
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            fast = indirect_effects(tiny_llama, ragged, mz, batch=batch, batch_size=batch_size,
                                    prefix_cache=True)  # raises unless the cache is used
        _no_runtime_warning(record)
        assert not torch.isnan(fast).any()
        torch.testing.assert_close(fast, slow, atol=AIE_ATOL_F32, rtol=0)
    full = indirect_effects(tiny_llama, ragged, mz, batch=batch, prefix_cache=False)
    torch.testing.assert_close(full, slow, atol=AIE_ATOL_F32, rtol=0)


def test_a_kv_cache_without_the_prefix_is_refused_on_a_tiny_hf_llama(tiny_llama, ragged,
                                                                     monkeypatch):
    """The transformers 5.24 + TransformerLens 4.3 failure was an attention that never
    writes to the cache, so the last token was recomputed without its prompt. Simulated
    here two ways; each check refuses it, and "auto" warns and equals the loop."""
    import transformers

    from tvlens import kv_cache

    mz = mean_head_outputs(tiny_llama, ragged, pool=ragged.train, shots=3, n_prompts=4, batch_size=4)
    batch = shuffled_prompts(tiny_llama, ragged, pool=ragged.train, shots=3, n_prompts=3, seed=1)
    slow = indirect_effects_loop(tiny_llama, ragged, mz, batch=batch)
    n_prefix = batch.input_ids.shape[1] - 1
    with monkeypatch.context() as m:  # 1. attention computes K/V but the cache keeps none
        m.setattr(transformers.DynamicCache, "update", lambda self, k, v, *a, **kw: (k, v))
        with pytest.raises(TvlensError, match=rf"holds \[0\] positions per layer, not the "
                                              rf"prefix length {n_prefix}.*prefix_cache=False"):
            indirect_effects(tiny_llama, ragged, mz, batch=batch, prefix_cache=True)
        with pytest.warns(RuntimeWarning, match=r"prefix KV cache not used \(after the prefix"):
            auto = indirect_effects(tiny_llama, ragged, mz, batch=batch)
        torch.testing.assert_close(auto, slow, atol=AIE_ATOL_F32, rtol=0)
    real = kv_cache.cache_forms(kv_cache.hf_model(tiny_llama))[-1]
    with monkeypatch.context() as m:  # 2. a cache that passed the length check but is empty
        m.setattr(kv_cache, "prefix_cache", lambda model, ids, mask: (
            transformers.DynamicCache(config=model.original_model.config), real, ""))
        with pytest.raises(TvlensError, match=r"last-token probabilities differ from a full "
                                              r"forward's by .*prefix_cache=False"):
            indirect_effects(tiny_llama, ragged, mz, batch=batch, prefix_cache=True)
        with pytest.warns(RuntimeWarning, match="running full forwards instead"):
            auto = indirect_effects(tiny_llama, ragged, mz, batch=batch)
        torch.testing.assert_close(auto, slow, atol=AIE_ATOL_F32, rtol=0)


def _set_b_O(model) -> list[Tensor]:
    """Give every attention layer a non-zero output bias (tiny models start with zeros, so
    a test of "+ b_O" would pass whatever the rule); returns the biases set, per layer."""
    biases = []
    for block in model.blocks:
        b = torch.randn(int(model.cfg.d_model))
        with torch.no_grad():
            block.attn.b_O.copy_(b)
        biases.append(b)
    assert all(float(block.attn.b_O.abs().min()) > 0 for block in model.blocks)
    return biases


def _W_O(model, layer: int, h: int) -> Tensor:
    """W_O of one head from the output projection's weight ``[d_model, n_heads·d_head]``,
    not from the bridge's ``W_O`` property that fv_from_heads reads."""
    d = int(model.cfg.d_head)
    return model.blocks[layer].attn.o.weight.detach()[:, h * d : (h + 1) * d].T


def test_function_vector_is_sum_of_top_heads_through_W_O(tiny, task):
    b_O = _set_b_O(tiny)
    fv = function_vector(tiny, task, k=3, layer=1, shots=3, n_prompts=5, n_ie_prompts=3,
                         query_split="train", icl_filter=False)
    mz = mean_head_outputs(tiny, task, pool=task.train, shots=3, n_prompts=5, template="qa")
    aie = torch.tensor(fv.history["indirect_effects"])
    heads = fv.history["heads"]
    order = sorted(((l, h) for l in range(3) for h in range(4)), key=lambda lh: -aie[lh].item())
    assert heads == [list(lh) for lh in order[:3]]
    oracle = sum(mz[l, h] @ tiny.blocks[l].attn.W_O[h].detach() + tiny.blocks[l].attn.b_O.detach()
                 for l, h in heads)  # the default bias rule: once per head (Todd's)
    torch.testing.assert_close(fv.vectors[0, 0], oracle, atol=1e-5, rtol=1e-5)
    independent = sum(mz[l, h] @ _W_O(tiny, l, h) + b_O[l] for l, h in heads)
    torch.testing.assert_close(fv.vectors[0, 0], independent, atol=1e-5, rtol=1e-5)
    assert fv.mode == "add" and fv.layers == (1,) and fv.method == "fv"


def _todd_head_term(model, layer: int, h: int, z: Tensor) -> Tensor:
    """Todd's ``compute_function_vector`` rule for one head, literally: the layer's output
    projection applied to a ``[n_heads·d_head]`` input that is zero but for head ``h``'s
    slice, which is z̄[l, h] (so the projection's bias comes with every head)."""
    d = int(model.cfg.d_head)
    x = torch.zeros(int(model.cfg.n_heads) * d)
    x[h * d : (h + 1) * d] = z
    o = model.blocks[layer].attn.o
    return x @ o.weight.detach().T + model.blocks[layer].attn.b_O.detach()


def test_fv_bias_rules_per_head_is_todds_and_per_layer_counts_once(tiny, task):
    """Top heads (1, 0), (1, 2), (2, 3): layer 1 twice, so once per layer and once per head
    give different vectors (by b_O[1], a norm-~5 vector). The default is Todd's rule (his
    ``out_proj`` per head, rebuilt in :func:`_todd_head_term`); ``bias="per_layer"`` adds
    each layer's bias once."""
    b_O = _set_b_O(tiny)
    mz = mean_head_outputs(tiny, task, pool=task.train, shots=3, n_prompts=4, template="qa")
    aie = torch.zeros(3, 4)
    aie[1, 0], aie[1, 2], aie[2, 3] = 3.0, 2.0, 1.0
    heads = [(1, 0), (1, 2), (2, 3)]
    todd = function_vector(tiny, task, k=3, layer=0, mean_z=mz, aie=aie)
    assert todd.history["heads"] == [list(lh) for lh in heads]
    assert todd.hyperparameters["bias"] == "per_head"
    oracle = sum(_todd_head_term(tiny, l, h, mz[l, h]) for l, h in heads)
    torch.testing.assert_close(todd.vectors[0, 0], oracle, atol=1e-5, rtol=1e-5)
    ours = function_vector(tiny, task, k=3, layer=0, mean_z=mz, aie=aie, bias="per_layer")
    once_per_layer = sum(mz[l, h] @ _W_O(tiny, l, h) for l, h in heads) + b_O[1] + b_O[2]
    torch.testing.assert_close(ours.vectors[0, 0], once_per_layer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(todd.vectors[0, 0] - ours.vectors[0, 0], b_O[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(TvlensError, match="per_head, per_layer"):
        function_vector(tiny, task, k=3, mean_z=mz, aie=aie, bias="twice")


def test_fv_of_a_whole_layer_is_its_mean_attention_output(tiny, task):
    """Linearity: Σ_h z̄_h W_O[h] + b_O = mean over prompts of hook_attn_out at the last token
    (the layer's own output carries its bias once: ``bias="per_layer"``)."""
    _set_b_O(tiny)  # non-zero, so the "+ b_O" is checked against the model's own output
    mz = mean_head_outputs(tiny, task, pool=task.train, shots=3, n_prompts=4, template="qa")
    aie = torch.full((3, 4), -1.0)
    aie[1] = 1.0  # top-4 heads = all heads of layer 1
    fv = function_vector(tiny, task, k=4, layer=0, shots=3, n_prompts=4, mean_z=mz, aie=aie,
                         bias="per_layer")
    examples = make_examples(sample_queries(task, 4, seed=0, shots=3), task.train, shots=3, seed=0)
    oracle = _one_by_one(tiny, examples, get_template("qa"), "blocks.1.hook_attn_out").mean(0)
    torch.testing.assert_close(fv.vectors[0, 0], oracle, atol=1e-5, rtol=1e-5)


def test_fv_folds_gemma3s_post_attention_norm(task, make_hf_gemma):
    """Gemma-3 normalises the attention output (``ln1_post``, gain 1 + w) before the residual
    add. With every head of layer 1 selected and one clean prompt, the folded FV is exactly
    what that layer's attention adds to the residual: ``ln1_post``'s output at the last
    token (float32, same ops in another order: 1e-5). The unfolded sum (Todd's ``out_proj``
    rule) is its input — a different vector — and fv_from_heads refuses to build it silently."""
    gemma = make_hf_gemma(task, gemma3=True)
    kw = dict(pool=task.train, shots=3, n_prompts=1, template="qa")
    mz = mean_head_outputs(gemma, task, **kw)
    aie = torch.full((3, 4), -1.0)
    aie[1] = 1.0  # top-4 heads = all heads of layer 1
    fv = function_vector(gemma, task, k=4, layer=0, shots=3, n_prompts=1, mean_z=mz, aie=aie,
                         bias="per_layer", query_split="train", icl_filter=False, template="qa")
    examples = make_examples(sample_queries(task, 1, seed=0, shots=3), task.train, shots=3, seed=0)
    added = _one_by_one(gemma, examples, get_template("qa"), "blocks.1.ln1_post.hook_out").mean(0)
    torch.testing.assert_close(fv.vectors[0, 0], added, atol=1e-5, rtol=1e-5)
    raw = _one_by_one(gemma, examples, get_template("qa"), "blocks.1.ln1_post.hook_in").mean(0)
    assert (raw - added).norm() > 0.1 * added.norm()
    scale = post_norm_scales(gemma, task, **kw)
    assert scale.shape == (3,) and fv.history["post_norm_scales"] == pytest.approx(scale.tolist())
    with pytest.raises(TvlensError, match="post_scales=post_norm_scales"):
        fv_from_heads(gemma, mz, [(1, 0)])


def test_bad_input(tiny, task):
    with pytest.raises(TvlensError, match="12 heads"):
        function_vector(tiny, task, k=13, mean_z=torch.zeros(3, 4, 8), aie=torch.zeros(3, 4))
    with pytest.raises(TvlensError, match="12 heads"):
        HeadTable(torch.zeros(3, 4), "indirect_effect").top(k=0)
    with pytest.raises(TvlensError, match="out of range"):
        icl_task_vector(tiny, task, 3)
    with pytest.raises(TvlensError, match="n_prompts"):
        vanilla_task_vector(tiny, task, 0, n_prompts=0)
    with pytest.raises(TvlensError, match="unknown method"):
        layer_sweep(tiny, task, "pca")
    with pytest.raises(TvlensError, match="'auto'"):
        extract(tiny, task, "icl-tv", layer="best")
    multi = Task("multi", tuple((f"w{i}", f"o{i % 7} o{(i + 1) % 7}") for i in range(40)))
    with pytest.raises(TvlensError, match="several tokens"):
        layer_sweep(tiny, multi, "icl-tv", [0])


def test_layer_sweep_matches_direct_evaluation(tiny, task):
    sweep = layer_sweep(tiny, task, "vanilla", n=8, n_prompts=4, shots=3)
    c = sweep.curve
    assert list(c["layer"]) == [0, 1, 2] and (c["n"] == 8).all()
    # every layer's row is what evaluate gives for that layer's vector, CI included, and
    # the best layer is the one whose independently evaluated dev accuracy is highest
    direct = [evaluate(tiny, task, vector=sweep.vectors[layer], split="dev", n=8) for layer in (0, 1, 2)]
    for layer, d in zip((0, 1, 2), direct):
        assert (c["accuracy"][layer], c["ci_low"][layer], c["ci_high"][layer]) == pytest.approx(
            (d.accuracy, d.ci_low, d.ci_high))
    best = max(d.accuracy for d in direct)
    assert direct[sweep.best_layer].accuracy == best
    assert sweep.best_layer == min(i for i, d in enumerate(direct) if d.accuracy == best)  # ties: first
    zs = evaluate(tiny, task, split="dev", n=8)
    assert sweep.zero_shot == pytest.approx((zs.accuracy, zs.ci_low, zs.ci_high))
    assert sweep.to_dict()["best_layer"] == sweep.best_layer


def test_extract_auto_picks_dev_best_and_reports_test(tiny, task):
    res = extract(tiny, task, "icl-tv", layer="auto", shots=3, n_prompts=4, n=6, n_dev=6)
    assert res.layer == res.sweep.best_layer and res.sweep.split == "dev"
    d = res.to_dict()
    assert d["method"] == "icl-tv" and d["layer"] == res.layer
    direct = evaluate(tiny, task, vector=res.vector, n=6)
    assert (d["accuracy"], d["ci_low"], d["ci_high"]) == pytest.approx(
        (direct.accuracy, direct.ci_low, direct.ci_high))
    zs, icl = evaluate(tiny, task, n=6), evaluate(tiny, task, n=6, shots=3)
    assert d["zero_shot"] == pytest.approx(zs.accuracy)
    assert d["icl"] == pytest.approx(icl.accuracy)


def test_fv_defaults_are_todds():
    from tvlens.methods import FVConfig

    cfg = FVConfig()
    assert (cfg.n_prompts, cfg.n_ie_prompts, cfg.shots, cfg.k) == (100, 25, 10, 10)
    assert (cfg.query_split, cfg.icl_filter, cfg.bias, cfg.template) == ("dev", True, "per_head", "fv")


def test_sample_queries_draws_from_the_pool_with_replacement(task):
    pool = task.dev[:3]
    drawn = sample_queries(task, 40, seed=5, shots=3, pool=pool)
    assert set(drawn) <= set(pool) and len(set(drawn)) == 3  # 40 draws of 3: all seen
    assert sample_queries(task, 6, seed=5, shots=3) == sample_queries(task, 6, seed=5, shots=3,
                                                                     pool=task.train)


def test_query_pool_keeps_the_dev_items_icl_answers(tiny, task):
    """Todd's filter: the pool is the dev items K-shot ICL answers correctly (the tiny
    model gets 1 of 8 by chance: a proper subset), or all of them without the filter."""
    records = evaluate(tiny, task, shots=3, split="dev", template="fv").records
    expected = [pair for pair, ok in zip(task.dev, records["correct"]) if ok]
    assert 0 < len(expected) < len(task.dev)
    assert query_pool(tiny, task, shots=3) == expected
    assert query_pool(tiny, task, shots=3, icl_filter=False) == list(task.dev)
    assert query_pool(tiny, task, split="train", icl_filter=False) == list(task.train)


def test_query_pool_refuses_a_task_icl_cannot_do(tiny, task):
    """With the answer words' logits pushed to -1e4 the model never answers: the filter
    keeps nothing, which is a clear error, not an FV built from nothing."""
    answer_ids = {tiny.tokenizer.encode(" " + y, add_special_tokens=False)[0] for _, y in task.pairs}
    with torch.no_grad():
        tiny.unembed.b_U[list(answer_ids)] = -1e4
    assert evaluate(tiny, task, shots=3, split="dev", template="fv").accuracy == 0.0
    with pytest.raises(TvlensError, match="icl_filter=False"):
        query_pool(tiny, task, shots=3)
    with pytest.raises(TvlensError, match="icl_filter=False"):
        function_vector(tiny, task, k=3, shots=3, n_prompts=2, n_ie_prompts=2)


def test_sweep_settings_go_to_the_methods_that_have_them(tiny, task):
    with pytest.raises(TvlensError, match="unknown setting"):
        layer_sweep(tiny, task, "icl-tv", [0], n=4, shots=3, n_promts=3)
    # k and icl_filter are FV's: ignored by icl-tv, whose vectors are then those of its config
    a = layer_sweep(tiny, task, "icl-tv", [0], n=4, shots=3, n_prompts=3, k=5, icl_filter=False)
    b = layer_sweep(tiny, task, "icl-tv", [0], n=4, shots=3, n_prompts=3)
    torch.testing.assert_close(a.vectors[0].vectors, b.vectors[0].vectors, atol=0, rtol=0)
    assert a.vectors[0].hyperparameters["n_prompts"] == 3


@pytest.mark.slow
def test_query_pool_keeps_the_dev_items_icl_answers_on_smollm2(smol):
    """Todd's filter on the embedded model: the pool is the dev items that 5-shot ICL gets
    right (scored by evaluate with the same seed and format), a proper non-empty subset."""
    from tvlens import load_task

    task = load_task("antonym")
    pool = query_pool(smol, task, shots=5)
    records = evaluate(smol, task, shots=5, split="dev", template="fv").records
    assert pool == [pair for pair, ok in zip(task.dev, records["correct"]) if ok]
    assert 0 < len(pool) < len(task.dev)


@pytest.mark.slow
def test_icl_tv_at_best_layer_beats_zero_shot_on_smollm2(smol):
    from tvlens import load_task

    task = load_task("capitalize")
    sweep = layer_sweep(smol, task, "icl-tv", layers=[18, 21], n=12, n_prompts=8,
                        template="qa")
    best = sweep.best_layer
    test = layer_sweep(smol, task, "icl-tv", [best], split="test", n=24,
                       template="qa", vectors={best: sweep.vectors[best]})
    assert test.curve["accuracy"][0] > test.zero_shot[0] + 0.2, (test.curve, test.zero_shot)


@pytest.mark.slow
def test_kv_cached_indirect_effects_match_loop_on_smollm2(smol):
    from tvlens import load_task

    task = load_task("capitalize")
    mz = mean_head_outputs(smol, task, pool=task.train, shots=3, n_prompts=2)
    batch = shuffled_prompts(smol, task, pool=task.train, shots=3, n_prompts=2)
    heads = [(1, 0), (14, 5), (29, 8)]
    fast = indirect_effects(smol, task, mz, batch=batch, heads=heads, prefix_cache=True)
    slow = indirect_effects_loop(smol, task, mz, batch=batch, heads=heads)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0, equal_nan=True)


def _ranks(x: Tensor) -> Tensor:
    return torch.argsort(torch.argsort(x)).double()


@pytest.mark.slow
def test_kv_cached_aie_ranks_heads_like_the_loop_on_smollm2(smol):
    """27 heads (all of layers 0, 14, 29): the KV-cached AIEs equal the loop's within
    AIE_ATOL_F32, with the same ranking (Spearman 1) and the same top 10. prefix_cache=True
    raises unless the cache was built and passed both checks, so this is the fast path."""
    import warnings

    from tvlens import load_task

    task = load_task("capitalize")
    mz = mean_head_outputs(smol, task, pool=task.train, shots=3, n_prompts=2)
    batch = shuffled_prompts(smol, task, pool=task.train, shots=3, n_prompts=2)
    heads = [(layer, h) for layer in (0, 14, 29) for h in range(9)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = indirect_effects(smol, task, mz, batch=batch, heads=heads, prefix_cache=True)
    _no_runtime_warning(record)
    assert not [w for w in record if "past_key_values" in str(w.message)]  # 5.24's deprecation
    slow = indirect_effects_loop(smol, task, mz, batch=batch, heads=heads)
    f = torch.stack([fast[lh] for lh in heads])
    s = torch.stack([slow[lh] for lh in heads])
    assert s.abs().max() > 1e-3  # (the uncached rerun of 5.24 was off by 6e-3)
    torch.testing.assert_close(f, s, atol=AIE_ATOL_F32, rtol=0)
    assert torch.corrcoef(torch.stack([_ranks(f), _ranks(s)]))[0, 1] > 1 - 1e-9  # Spearman
    assert set(torch.topk(f, 10).indices.tolist()) == set(torch.topk(s, 10).indices.tolist())


@pytest.mark.slow
def test_a_kv_cache_without_the_prefix_is_refused_not_used(smol, monkeypatch):
    """The transformers-5.24 failure: a cache that does not hold the prefix. Both checks
    (its length; cached vs full answer probabilities) refuse it, and "auto" falls back to
    the exact path."""
    import transformers

    from tvlens import load_task
    from tvlens import kv_cache

    task = load_task("capitalize")
    mz = mean_head_outputs(smol, task, pool=task.train, shots=3, n_prompts=2)
    batch = shuffled_prompts(smol, task, pool=task.train, shots=3, n_prompts=2)
    heads = [(14, 5), (29, 8)]
    slow = indirect_effects_loop(smol, task, mz, batch=batch, heads=heads)
    with monkeypatch.context() as m:  # the length check
        m.setattr(transformers.DynamicCache, "get_seq_length", lambda self, *a, **k: 0)
        with pytest.raises(TvlensError, match=r"holds \[0\] positions per layer"):
            indirect_effects(smol, task, mz, batch=batch, heads=heads, prefix_cache=True)
        with pytest.warns(RuntimeWarning, match="prefix KV cache not used"):
            auto = indirect_effects(smol, task, mz, batch=batch, heads=heads)
        torch.testing.assert_close(auto, slow, atol=1e-5, rtol=0, equal_nan=True)
    with monkeypatch.context() as m:  # an empty cache that passed the length check
        form = kv_cache.cache_forms(kv_cache.hf_model(smol))[0]
        m.setattr(kv_cache, "prefix_cache", lambda model, ids, mask:
                  (transformers.DynamicCache(config=smol.original_model.config), form, ""))
        with pytest.raises(TvlensError, match="full forward's by"):
            indirect_effects(smol, task, mz, batch=batch, heads=heads, prefix_cache=True)


def test_cli_rejects_bad_method_and_layer_before_loading(tmp_path, capsys):
    from tvlens.cli import main

    out = str(tmp_path / "v.safetensors")
    assert main(["extract", "--method", "pca", "--task", "capitalize", "--out", out]) == 2
    assert "unknown method 'pca'" in capsys.readouterr().err
    assert main(["extract", "--method", "fv", "--task", "capitalize", "--layer", "best",
                 "--out", out]) == 2
    assert "--layer must be an integer or 'auto'" in capsys.readouterr().err
    assert main(["sweep", "--method", "icl-tv", "--task", "capitalize", "--layers", "1,x",
                 "--out", str(tmp_path / "s")]) == 2
    assert "comma-separated" in capsys.readouterr().err


def test_sweep_figure_has_curve_and_references(tiny, task):
    sweep = layer_sweep(tiny, task, "icl-tv", [0, 2], n=4, n_prompts=3, shots=3)
    fig = sweep.figure()
    names = [t.name for t in fig.data if t.name]
    assert "icl-tv" in names and any(n.startswith("zero-shot") for n in names)
    assert any(n.startswith("ICL (3-shot)") for n in names)
