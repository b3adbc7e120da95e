"""Shared fixtures: seeded RNGs, tiny native models, and the embedded model (slow tests).

Tiny models are rebuilt per test (0.1 s, seeded) so tests never share mutated state.
The embedded SmolLM2-135M is loaded once per session, for tests marked ``slow``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "function_vectors"


def pytest_collection_modifyitems(items):
    for item in items:
        if item.name.startswith("test_bad"):
            item.add_marker(pytest.mark.bad_input)


@pytest.fixture(autouse=True)
def _types_checked_unless_bad_input(request):
    """The suite runs with jaxtyping's import hook (pyproject addopts). Bad-input tests
    (named ``test_bad*``) pass wrong types on purpose to check the ``TvlensError`` a user
    sees, who runs without the hook, so for them the checks are off."""
    import jaxtyping

    off = request.node.get_closest_marker("bad_input") is not None
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", off)
    yield
    jaxtyping.config.update("jaxtyping_disable", before)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def tiny_task(n: int = 40):
    """A small deterministic task whose words a tiny model's tokenizer covers."""
    from tvlens.tasks import Task

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [f"q{letters[i // 26]}{letters[i % 26]}" for i in range(n)]  # one token each
    colors = ("red", "blue", "green", "gold", "pink", "gray", "teal")
    return Task("tiny", tuple((w, colors[i % 7]) for i, w in enumerate(words)), "tiny test task")


def tiny_hf_llama(texts):
    """A random 3-layer GQA Hugging Face ``LlamaForCausalLM`` under a TransformerBridge
    (0.1 s) whose word tokenizer covers ``texts``: the Hugging Face paths (KV cache,
    ``generate`` with a cache) run without the embedded model. ``initializer_range=0.2``
    makes the heads matter (AIEs ~1e-3, not the ~1e-6 of the default 0.02). Seeded by the
    autouse fixture."""
    import warnings

    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformers import LlamaConfig, LlamaForCausalLM

    from tvlens.models import prepare_bridge
    from tvlens.models.word_tokenizer import word_tokenizer

    tok = word_tokenizer(list(texts))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_bridge(build_bridge_from_module(hf, "LlamaForCausalLM", hf_config=cfg,
                                                       tokenizer=tok, model_name="tiny-llama"))


@pytest.fixture
def one_thread():
    """For tests of many tiny forwards or training loops: one torch thread avoids OpenMP
    contention on a busy 2-core machine (up to 10x slower with 2 threads there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def task():
    return tiny_task()


@pytest.fixture
def tiny(task):
    """A 3-layer GQA native model whose tokenizer covers ``task`` in both templates."""
    from tvlens.models import tiny_model

    texts = [f"{x} -> {y}\nQ: {x}\nA: {y}\n\n" for x, y in task.pairs]
    return tiny_model(texts=texts, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, seed=0)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M, loaded once per test run (from the cache after the first).

    While the session lasts, ``tvlens.models.load_model`` hands this same model to every
    caller that asks for it on the CPU in float32 — the CLI verbs under test included — so
    the suite loads it once, not once per command.
    """
    import tvlens.models
    from tvlens.models import load_model

    model = load_model("smollm2-135m", device="cpu", progress=False)

    def shared(name=None, *, device=None, dtype=None, progress=True):
        if (name in (None, "smollm2-135m") and device in (None, "cpu")
                and dtype in (None, torch.float32, "float32")):
            return model
        return load_model(name, device=device, dtype=dtype, progress=progress)

    patch = pytest.MonkeyPatch()
    patch.setattr(tvlens.models, "load_model", shared)
    yield model
    patch.undo()


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data/function_vectors not found at {SHARED_DATA} (only in CI "
                    "and developer checkouts; the package does not need it)")
    return SHARED_DATA


def tiny_hf_gemma(task, gemma3: bool = False):
    """A random 3-layer GQA Hugging Face Gemma (v1; or Gemma-3 with ``gemma3``) under a
    TransformerBridge: RMSNorm that multiplies by 1 + w (``cfg.rmsnorm_uses_offset``); v1
    has no post-block norms, Gemma-3 has ``ln1_post`` / ``ln2_post``. Norm weights drawn
    N(0, 0.5²) so that w and 1 + w differ everywhere."""
    import warnings

    import transformers
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    from tvlens.models import prepare_bridge
    from tvlens.models.word_tokenizer import word_tokenizer

    tok = word_tokenizer([f"{x} -> {y}\nQ: {x}\nA: {y}\n\n" for x, y in task.pairs])
    arch = "Gemma3ForCausalLM" if gemma3 else "GemmaForCausalLM"
    Config = transformers.Gemma3TextConfig if gemma3 else transformers.GemmaConfig
    cfg = Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    hf = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_bridge(build_bridge_from_module(hf, arch, hf_config=cfg, tokenizer=tok,
                                                       model_name=f"tiny-{arch}"))


@pytest.fixture
def make_hf_gemma():
    """:func:`tiny_hf_gemma`, for tests that need a Gemma-shaped model (offset norms; with
    ``gemma3=True`` post-attention / post-MLP norms too)."""
    return tiny_hf_gemma
