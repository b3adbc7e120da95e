"""The environment: the lock matches pyproject.toml, tested ranges agree, upgrades warn."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

from tvlens import compat

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_bounds() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split(">=")[0].strip(): d.split(">=")[1].split("#")[0].strip() for d in deps
            if d.split(">=")[0].strip() in compat.TESTED}


def test_tested_ranges_equal_pyproject_bounds():
    bounds = _pyproject_bounds()
    assert set(bounds) == set(compat.TESTED)
    for dist, (low, high) in compat.TESTED.items():
        assert bounds[dist] == f"{low},<{high}", dist


def _lock_module():
    spec = importlib.util.spec_from_file_location("tvlens_lock", ROOT / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lock_matches_pyproject_and_pins_inside_the_tested_ranges():
    out = subprocess.run([sys.executable, "scripts/lock.py", "check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pins = _lock_module().pins((ROOT / "requirements.lock").read_text())
    for dist, (low, high) in compat.TESTED.items():
        assert compat._in_range(pins[dist], low, high), (dist, pins[dist])
    assert pins["torch"].startswith("2.13.0")  # the CPU build on this machine's disk


def test_lock_check_names_the_line_that_differs(tmp_path, monkeypatch, capsys):
    lock = _lock_module()
    (tmp_path / "pyproject.toml").write_text(
        (ROOT / "pyproject.toml").read_text().replace('"scipy>=1.11"', '"scipy>=1.14"'))
    (tmp_path / "requirements.lock").write_text((ROOT / "requirements.lock").read_text())
    monkeypatch.setattr(lock, "ROOT", tmp_path)
    monkeypatch.setattr(lock, "LOCK", tmp_path / "requirements.lock")
    assert lock.check() == 1
    err = capsys.readouterr().err
    assert "in pyproject.toml, not in the lock:  requires: scipy>=1.14" in err
    assert "in the lock, not in pyproject.toml:  requires: scipy>=1.11" in err
    assert "make lock" in err


def test_installed_versions_are_inside_the_tested_range():
    # make test installs from the lock; the lock must sit inside the tested range
    assert compat.untested_versions() == []


def test_an_untested_version_warns_once_naming_the_range(monkeypatch):
    monkeypatch.setattr(compat.metadata, "version",
                        lambda dist: {"transformers": "5.30.1", "transformer-lens": "4.3.0"}[dist])
    assert compat.untested_versions() == ["transformers 5.30.1 (tested: >=5.9,<5.24)"]
    with pytest.warns(RuntimeWarning, match=r"transformers 5\.30\.1 \(tested: >=5\.9,<5\.24\)"):
        compat.warn_if_untested()
    monkeypatch.setattr(compat.metadata, "version", lambda dist: "5.23.0.dev0"
                        if dist == "transformers" else "4.3.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.warn_if_untested()  # a dev build of a tested release is in range


def test_original_component_swap_keeps_the_hooks_and_round_trips():
    """compat's TransformerLens-internals helpers: swap a block's layer, hooks still fire."""
    import torch
    from torch import nn

    from tvlens import TvlensError, tiny_model

    class Skip(nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return (hidden_states,)

    model = tiny_model(d_vocab=20, n_layers=2, d_model=16, n_heads=2, seed=0)
    block = model.blocks[0]
    assert compat.has_original_component(block) and not compat.has_original_component(nn.Linear(2, 2))
    layer = compat.original_component(block)
    ids = torch.randint(0, 20, (1, 5))
    with torch.no_grad():
        before = model(ids)
    seen = {}

    def grab(name):
        def hook(act, hook=None):
            seen[name] = act.detach().clone()
        return hook

    hooks = [(f"blocks.0.hook_resid_{k}", grab(k)) for k in ("pre", "post")]
    assert compat.swap_original_component(block, Skip()) is layer
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(ids)
    finally:
        assert isinstance(compat.swap_original_component(block, layer), Skip)
    assert torch.equal(seen["pre"], seen["post"])  # the skipped block's hooks still fire
    assert compat.original_component(block) is layer
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # swapped back: the same model
    with pytest.raises(TvlensError, match=r"_original_component.*transformer-lens>=4\.3,<4\.4"):
        compat.swap_original_component(nn.Linear(2, 2), Skip())


def test_the_bridges_kv_cached_generate_equals_uncached_generation(task):
    """The drift that keeps transformers 5.24 out of the lock: with TransformerLens 4.3 the
    bridge's KV cache stays empty there, so generate(use_past_kv_cache=True) (the default)
    continues without context. Greedy decoding must not depend on the cache."""
    import torch
    from conftest import tiny_hf_llama

    from tvlens.prompts import make_examples, tokenize

    model = tiny_hf_llama(f"{x} -> {y}\n" for x, y in task.pairs)
    batch = tokenize(model, make_examples(task.test[:3], task.train, shots=2, seed=0))
    kw = dict(attention_mask=batch.attention_mask, max_new_tokens=3, do_sample=False,
              stop_at_eos=False, verbose=False)
    with torch.no_grad():
        cached = model.generate(batch.input_ids, use_past_kv_cache=True, **kw)
        full = model.generate(batch.input_ids, use_past_kv_cache=False, **kw)
    assert cached.tolist() == full.tolist()
