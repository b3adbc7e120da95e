"""Extracted vectors: ICL-TV, vanilla, function vectors, layer sweeps (oracles on tiny models)."""

from __future__ import annotations

import pytest
import torch

from tvlens import TvlensError, evaluate, make_examples, tokenize
from tvlens.extract import (
    extract,
    function_vector,
    icl_task_vector,
    indirect_effects,
    indirect_effects_loop,
    layer_sweep,
    mean_head_outputs,
    shuffled_prompts,
    top_heads,
    vanilla_task_vector,
)
from tvlens.extract.icl_tv import dummy_queries
from tvlens.prompts import get_template
from tvlens.tasks import Task


@pytest.fixture
def ragged():
    """Inputs of 1-3 words, so batched prompts are left-padded to different lengths."""
    pairs = tuple((" ".join(f"w{j % 40}" for j in range(i, i + 1 + i % 3)), f"o{i % 7}")
                  for i in range(40))
    return Task("ragged", pairs)


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
    examples = make_examples(dummy_queries(ragged, 3, 7, 4), ragged.train, shots=3, seed=4)
    assert len({len(tokenize(tiny, [e]).input_ids[0]) for e in examples}) > 1  # really ragged
    for i, layer in enumerate([0, 2]):
        oracle = _one_by_one(tiny, examples, get_template("arrow"),
                             f"blocks.{layer}.hook_resid_post").mean(0)
        torch.testing.assert_close(tv.vectors[i, 0], oracle, atol=1e-5, rtol=1e-5)
    assert tv.mode == "replace" and tv.layers == (0, 2) and tv.positions == ("last",)


def test_vanilla_is_icl_minus_zero_shot_mean(tiny, ragged):
    van = vanilla_task_vector(tiny, ragged, 1, shots=3, n_prompts=6, batch_size=4, seed=2)
    icl = icl_task_vector(tiny, ragged, 1, shots=3, n_prompts=6, batch_size=4, seed=2)
    zero = make_examples(dummy_queries(ragged, 3, 6, 2), shots=0)
    oracle = _one_by_one(tiny, zero, get_template("arrow"), "blocks.1.hook_resid_post").mean(0)
    torch.testing.assert_close(van.vectors[0, 0], icl.vectors[0, 0] - oracle, atol=1e-5, rtol=1e-5)
    assert van.mode == "add" and van.method == "vanilla"


def test_mean_head_outputs_oracle(tiny, ragged):
    mz = mean_head_outputs(tiny, ragged, shots=2, n_prompts=5, template="qa", batch_size=2, seed=3)
    examples = make_examples(dummy_queries(ragged, 2, 5, 3), ragged.train, shots=2, seed=3)
    for layer in range(3):
        oracle = _one_by_one(tiny, examples, get_template("qa"), f"blocks.{layer}.attn.hook_z").mean(0)
        torch.testing.assert_close(mz[layer], oracle, atol=1e-5, rtol=1e-5)


def test_shuffled_prompts_keep_inputs_and_permute_outputs(tiny, task):
    shuf = shuffled_prompts(tiny, task, shots=5, n_prompts=6, seed=7).examples
    clean = make_examples(dummy_queries(task, 5, 6, 7), task.train, shots=5, seed=7)
    assert len(shuf) == len(clean) == 6
    for s, c in zip(shuf, clean):
        assert (s.x, s.y) == (c.x, c.y)
        assert [a for a, _ in s.demos] == [a for a, _ in c.demos]
        assert sorted(b for _, b in s.demos) == sorted(b for _, b in c.demos)
    assert any([b for _, b in s.demos] != [b for _, b in c.demos] for s, c in zip(shuf, clean))


def test_batched_indirect_effects_equal_per_head_loop(tiny, ragged):
    mz = mean_head_outputs(tiny, ragged, shots=3, n_prompts=4, batch_size=4)
    batch = shuffled_prompts(tiny, ragged, shots=3, n_prompts=3, seed=1)
    assert batch.attention_mask.sum(1).unique().numel() > 1  # left padding exercised
    slow = indirect_effects_loop(tiny, ragged, mz, batch=batch)
    assert slow.abs().max() > 1e-4  # patching does something, so equality means something
    for batch_size in (1, 7, 64):  # one head per forward, uneven chunks, all heads at once
        fast = indirect_effects(tiny, ragged, mz, batch=batch, batch_size=batch_size)
        assert fast.shape == (3, 4) and not torch.isnan(fast).any()
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)


def test_indirect_effects_head_subset_and_no_cache_model(tiny, task):
    mz = mean_head_outputs(tiny, task, shots=3, n_prompts=4)
    heads = [(2, 1), (0, 3)]
    batch = shuffled_prompts(tiny, task, shots=3, n_prompts=2)
    aie = indirect_effects(tiny, task, mz, batch=batch, heads=heads)
    assert torch.isnan(aie).sum() == 12 - 2
    torch.testing.assert_close(aie[2, 1], indirect_effects_loop(tiny, task, mz, batch=batch)[2, 1])
    with pytest.raises(TvlensError, match="KV cache"):
        indirect_effects(tiny, task, mz, batch=batch, prefix_cache=True)
    with pytest.raises(TvlensError, match="n_layers, n_heads, d_head"):
        indirect_effects(tiny, task, mz[:2], batch=batch)
    with pytest.raises(TvlensError, match="head 9"):
        indirect_effects(tiny, task, mz, batch=batch, heads=[(0, 9)])


def test_function_vector_is_sum_of_top_heads_through_W_O(tiny, task):
    fv = function_vector(tiny, task, k=3, layer=1, shots=3, n_prompts=5, n_ie_prompts=3)
    mz = mean_head_outputs(tiny, task, shots=3, n_prompts=5, template="qa")
    aie = torch.tensor(fv.history["indirect_effects"])
    heads = fv.history["heads"]
    order = sorted(((l, h) for l in range(3) for h in range(4)), key=lambda lh: -aie[lh].item())
    assert heads == [list(lh) for lh in order[:3]]
    oracle = sum(mz[l, h] @ tiny.blocks[l].attn.W_O[h].detach() for l, h in heads)
    for layer in {l for l, _ in heads}:
        if tiny.blocks[layer].attn.b_O is not None:
            oracle = oracle + tiny.blocks[layer].attn.b_O.detach()
    torch.testing.assert_close(fv.vectors[0, 0], oracle, atol=1e-5, rtol=1e-5)
    assert fv.mode == "add" and fv.layers == (1,) and fv.method == "fv"


def test_fv_of_a_whole_layer_is_its_mean_attention_output(tiny, task):
    """Linearity: Σ_h z̄_h W_O[h] + b_O = mean over prompts of hook_attn_out at the last token."""
    mz = mean_head_outputs(tiny, task, shots=3, n_prompts=4, template="qa")
    aie = torch.full((3, 4), -1.0)
    aie[1] = 1.0  # top-4 heads = all heads of layer 1
    fv = function_vector(tiny, task, k=4, layer=0, shots=3, n_prompts=4, mean_z=mz, aie=aie)
    examples = make_examples(dummy_queries(task, 3, 4, 0), task.train, shots=3, seed=0)
    oracle = _one_by_one(tiny, examples, get_template("qa"), "blocks.1.hook_attn_out").mean(0)
    torch.testing.assert_close(fv.vectors[0, 0], oracle, atol=1e-5, rtol=1e-5)


def test_bad_input(tiny, task):
    with pytest.raises(TvlensError, match="12 heads"):
        function_vector(tiny, task, k=13, mean_z=torch.zeros(3, 4, 8), aie=torch.zeros(3, 4))
    with pytest.raises(TvlensError, match="12 heads"):
        top_heads(torch.zeros(3, 4), 0)
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
    assert ((c["ci_low"] <= c["accuracy"]) & (c["accuracy"] <= c["ci_high"])).all()
    assert sweep.best_layer == int(c["layer"][c["accuracy"].idxmax()])
    direct = evaluate(tiny, task, vector=sweep.vectors[2], split="dev", n=8)
    assert c["accuracy"][2] == pytest.approx(direct.accuracy)
    zs = evaluate(tiny, task, split="dev", n=8)
    assert sweep.zero_shot == pytest.approx((zs.accuracy, zs.ci_low, zs.ci_high))
    assert sweep.to_dict()["best_layer"] == sweep.best_layer


def test_extract_auto_picks_dev_best_and_reports_test(tiny, task):
    res = extract(tiny, task, "icl-tv", layer="auto", shots=3, n_prompts=4, n=6, n_dev=6)
    assert res.layer == res.sweep.best_layer and res.sweep.split == "dev"
    d = res.to_dict()
    for key in ("method", "layer", "accuracy", "ci_low", "ci_high", "zero_shot", "icl"):
        assert key in d
    direct = evaluate(tiny, task, vector=res.vector, n=6)
    assert d["accuracy"] == pytest.approx(direct.accuracy)


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
    mz = mean_head_outputs(smol, task, shots=3, n_prompts=2)
    batch = shuffled_prompts(smol, task, shots=3, n_prompts=2)
    heads = [(1, 0), (14, 5), (29, 8)]
    fast = indirect_effects(smol, task, mz, batch=batch, heads=heads, prefix_cache=True)
    slow = indirect_effects_loop(smol, task, mz, batch=batch, heads=heads)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0, equal_nan=True)


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
