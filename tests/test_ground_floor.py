"""The ground floor against oracles: interventions, the runner, the prompt set, stats, io."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from tvlens import TaskVector, TvlensError
from tvlens.activations import capture
from tvlens.interventions import Compose, HeadPatch, ResidualEdit, z_hook_name
from tvlens.methods import FVConfig, LTVConfig, add_config_flags, config_from_args, get_config
from tvlens.prompts import PromptSet, make_examples, tokenize
from tvlens.runner import chunks, run, run_variants
from tvlens import io, stats


def _prompts(model, task, n=6):
    """Left-padded: prompts with 0, 1, 2, 3 demonstrations."""
    examples = [make_examples([q], task.train, shots=i % 4, seed=3 + i)[0]
                for i, q in enumerate(task.test[:n])]
    return PromptSet.from_examples(model, examples, "arrow")


# ----- head patches -------------------------------------------------------------------
def test_zero_patch_zeroes_exactly_those_heads_at_the_last_token(tiny, task):
    ps = _prompts(tiny, task)
    name = z_hook_name(1)
    before = capture(tiny, ps.batch, [name])[name]
    patch = HeadPatch.zero(tiny, [(1, 2), (1, 0)])
    after = capture(tiny, ps.batch, [name], patch)[name]
    last = ps.batch.position_index("last")
    rows = torch.arange(len(ps))
    assert torch.equal(after[rows, last][:, [0, 2]], torch.zeros(len(ps), 2, after.shape[-1]))
    keep = torch.ones_like(after, dtype=torch.bool)
    keep[rows[:, None], last[:, None], torch.tensor([0, 2])] = False
    assert torch.equal(after[keep], before[keep])  # everything else untouched


def test_mean_patch_writes_the_given_values(tiny, task):
    ps = _prompts(tiny, task)
    means = torch.randn(3, 4, int(tiny.cfg.d_head))
    name = z_hook_name(2)
    z = capture(tiny, ps.batch, [name], HeadPatch.mean(tiny, [(2, 3)], means))[name]
    last = ps.batch.position_index("last")
    assert torch.allclose(z[torch.arange(len(ps)), last, 3], means[2, 3].expand(len(ps), -1))


def test_stacked_variants_equal_one_forward_per_variant(tiny, task):
    """run_variants (one merged index_put per layer, copies along the batch) == a full
    forward per head patch. Tolerance 1e-6: same float32 ops, only batch layout differs."""
    ps = _prompts(tiny, task)
    means = torch.randn(3, 4, int(tiny.cfg.d_head))
    heads = [(0, 1), (1, 3), (2, 0), (2, 2), (1, 1)]
    variants = [HeadPatch.mean(tiny, [h], means) for h in heads]
    out = run_variants(tiny, ps.batch, variants, batch_size=2 * len(ps))  # 2 variants per forward
    for j, v in enumerate(variants):
        ref = run(tiny, ps, v, logits="scores").first_answer_logprob.exp()
        assert torch.allclose(out.probs[j], ref, atol=1e-6)
    assert torch.allclose(out.base, run(tiny, ps).first_answer_logprob.exp(), atol=1e-6)


def test_stacking_any_intervention_equals_running_it_alone(tiny, task):
    """Variants without a merge rule (residual edits) run sliced per copy; same numbers."""
    ps = _prompts(tiny, task, n=4)
    d = int(tiny.cfg.d_model)
    variants = [ResidualEdit((layer,), ("last",), torch.randn(1, 1, d)) for layer in (0, 1, 2)]
    out = run_variants(tiny, ps.batch, variants, batch_size=100)
    for j, v in enumerate(variants):
        ref = run(tiny, ps, v).first_answer_logprob.exp()
        assert torch.allclose(out.probs[j], ref, atol=1e-6)


def test_saliency_probe_gradient_is_the_derivative_wrt_z(tiny, task):
    """An added zero z-delta changes nothing, and its gradient is ∂p/∂z: the central
    difference (p(+s·u) − p(−s·u)) / 2s along u = g/‖g‖ equals ‖g‖ up to O(s²) (2% at
    s = 0.1; p is float32, the change ~1e-4 is far above its rounding ~1e-8)."""
    ps = _prompts(tiny, task, n=3)
    B, H, dh = len(ps), int(tiny.cfg.n_heads), int(tiny.cfg.d_head)
    delta = torch.zeros(H, B, dh, requires_grad=True)
    heads = [(1, h) for h in range(H)]
    p = run(tiny, ps, HeadPatch(heads, list(delta), mode="add"), grad=True,
            batch_size=None).first_answer_logprob.exp()
    assert torch.allclose(p.detach(), run(tiny, ps).first_answer_logprob.exp(), atol=1e-6)
    (g,) = torch.autograd.grad(p.sum(), delta)
    u, s = g / g.norm(), 0.1
    plus = run(tiny, ps, HeadPatch(heads, list(s * u), mode="add")).first_answer_logprob.exp().sum()
    minus = run(tiny, ps, HeadPatch(heads, list(-s * u), mode="add")).first_answer_logprob.exp().sum()
    assert float(plus - minus) / (2 * s) == pytest.approx(float(g.norm()), rel=2e-2)


# ----- composition --------------------------------------------------------------------
def test_vector_plus_ablation_is_both_hooks(tiny, task):
    ps = _prompts(tiny, task)
    tv = TaskVector.single(tiny, torch.randn(int(tiny.cfg.d_model)), 1, "last")
    patch = HeadPatch.zero(tiny, [(2, 1)])
    both = run(tiny, ps, tv + patch, logits="last").last_logits
    by_hand = run(tiny, ps, [*tv.hooks(tiny, ps.batch), *patch.hooks(tiny, ps.batch)],
                  logits="last", batch_size=None).last_logits
    assert torch.equal(both, by_hand)
    assert isinstance(patch + tv, Compose) and isinstance(sum([tv, patch]), Compose)


def test_compositions_that_cannot_go_together_are_refused(tiny, task):
    d = int(tiny.cfg.d_model)
    a = TaskVector.single(tiny, torch.randn(d), 1, "last", mode="replace", method="icl-tv")
    b = TaskVector.single(tiny, torch.randn(d), 1, "last", mode="replace", method="other")
    with pytest.raises(TvlensError, match=r"TaskVector\(icl-tv.*TaskVector\(other.*both replace blocks\.1\.hook_resid_post"):
        a + HeadPatch.zero(tiny, [(0, 0)]) + b
    from tvlens.models import tiny_model
    other = tiny_model(texts=["a b"], n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, seed=1)
    c = TaskVector.single(other, torch.randn(d), 1, "last")
    with pytest.raises(TvlensError, match="made for .*made for"):
        a + c.spec() + HeadPatch.zero(tiny, [(0, 0)], ) + Compose([c])
    with pytest.raises(TvlensError, match=r"cannot compose TaskVector\(custom.*HeadPatch\(set 0\.0"):
        c + HeadPatch.zero(tiny, [(0, 0)])  # a vector and an ablation for different models


# ----- the runner ---------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_batched_run_equals_one_run(tiny, task, batch_size):
    """Chunks are re-padded to their own width; numbers equal the one-forward run to 1e-5
    (padding columns are masked, only reduction order can differ)."""
    ps = _prompts(tiny, task)
    names = ["blocks.1.hook_resid_post", z_hook_name(2)]
    whole = run(tiny, ps, capture=names, capture_at=None, logits="answer", batch_size=None)
    parts = run(tiny, ps, capture=names, capture_at=None, logits="answer", batch_size=batch_size)
    assert torch.equal(whole.prediction, parts.prediction)
    assert torch.allclose(whole.first_answer_logprob, parts.first_answer_logprob, atol=1e-5)
    assert torch.allclose(whole.answer_logprobs, parts.answer_logprobs, atol=1e-5)
    mask, P = ps.batch.attention_mask.bool(), ps.batch.seq_len  # prompt columns (answers follow)
    for n in names:
        assert torch.allclose(whole.captured[n][:, :P][mask], parts.captured[n][:, :P][mask], atol=1e-5)
    last = run(tiny, ps, capture=names, capture_at="last", logits=None, batch_size=batch_size)
    cols = ps.batch.position_index("last")
    for n in names:
        assert torch.allclose(last.captured[n], whole.captured[n][torch.arange(len(ps)), cols], atol=1e-5)


def test_chunks_are_the_prompts_tokenized_alone(tiny, task):
    ps = _prompts(tiny, task)
    for k, part in enumerate(chunks(ps.batch, 4)):
        alone = tokenize(tiny, ps.examples[4 * k : 4 * k + 4], "arrow")
        assert torch.equal(part.input_ids, alone.input_ids)
        assert torch.equal(part.attention_mask, alone.attention_mask)


def test_answer_logits_agree_with_scores(tiny, task):
    ps = _prompts(tiny, task)
    a, s = run(tiny, ps, logits="answer"), run(tiny, ps, logits="scores")
    full = run(tiny, ps, logits="all", batch_size=4)  # two chunks, re-aligned on the right
    from tvlens.forward import forward
    ref = forward(tiny, ps.batch)
    mask = ps.batch.attention_mask.bool()
    assert torch.allclose(full.logits[mask], ref[mask].float(), atol=1e-5)
    assert torch.equal(full.prediction, s.prediction)
    assert torch.equal(a.prediction, s.prediction)
    assert torch.allclose(a.first_answer_logprob, s.first_answer_logprob, atol=1e-5)
    assert torch.allclose(a.answer_logprobs[:, 0], s.first_answer_logprob, atol=1e-5)


def test_bad_runner_input(tiny, task):
    ps = _prompts(tiny, task)
    with pytest.raises(TvlensError, match="logits must be one of"):
        run(tiny, ps, logits="everything")
    with pytest.raises(TvlensError, match="no hook point 'blocks.9.hook_x'"):
        run(tiny, ps, capture=["blocks.9.hook_x"])
    with pytest.raises(TvlensError, match="not an intervention"):
        run(tiny, ps, interventions=object())
    with pytest.raises(TvlensError, match="prefix_cache=True, but"):
        run_variants(tiny, ps.batch, [HeadPatch.zero(tiny, [(0, 0)])], prefix_cache=True)


# ----- stats, io, configs -------------------------------------------------------------
def test_exact_interval_matches_clopper_pearson():
    # closed forms: 0 of n -> [0, 1 - (α/2)^(1/n)]; n of n -> [(α/2)^(1/n), 1]
    lo, hi = stats.exact_ci(0, 10)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    lo, hi = stats.exact_ci(10, 10)
    assert lo == pytest.approx(0.025 ** (1 / 10), rel=1e-9) and hi == 1
    acc = stats.accuracy([1, 0, 1, 1], method="exact")
    assert (acc.value, acc.n) == (0.75, 4) and acc.ci_low < 0.75 < acc.ci_high
    with pytest.raises(TvlensError, match="0/1 scores"):
        stats.accuracy([0.5, 1.0], method="exact")
    assert stats.proportion(0.5, 20).as_tuple() == (0.5, *stats.exact_ci(10, 20))


def test_atomic_writes_keep_the_usual_file_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        p = io.write_json(tmp_path / "a.json", {"x": torch.tensor([1.0])})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.chmod(p, 0o640)
        io.write_json(p, {"x": 2})
        assert stat.S_IMODE(p.stat().st_mode) == 0o640  # a replaced file keeps its mode
        assert io.read_json(p) == {"x": 2}
    finally:
        os.umask(umask)
    with pytest.raises(TvlensError, match="exists; pass overwrite=True"):
        io.write_json(p, {}, overwrite=False)

    def broken(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        io.atomic_write(p, broken)
    assert io.read_json(p) == {"x": 2} and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_tensors_round_trip_without_pickle(tmp_path):
    t = {"w": torch.randn(3, 2)}
    p = io.save_tensors(tmp_path / "t.safetensors", t, {"step": 3}, key="tvlens_test")
    back, meta = io.load_tensors(p, key="tvlens_test")
    assert torch.equal(back["w"], t["w"]) and meta == {"step": 3}
    with pytest.raises(TvlensError, match="not a tvlens thing"):
        io.load_tensors(p, key="other", what="tvlens thing")


def test_configs_round_trip_and_refuse_unknown_fields():
    cfg = FVConfig(k=3, template="hendel")
    assert FVConfig.from_dict(cfg.to_dict()) == cfg
    assert get_config("fv") is FVConfig
    with pytest.raises(TvlensError, match=r"no field\(s\) 'lambda_2'.*newer"):
        LTVConfig.from_dict({"steps": 3, "lambda_2": 1.0})
    with pytest.raises(TvlensError, match="unknown method 'ftv'"):
        get_config("ftv")
    import argparse
    parser = argparse.ArgumentParser()
    add_config_flags(parser, LTVConfig)
    args = parser.parse_args(["--steps", "5", "--no-relative-lr", "--n-dev", "7"])
    assert config_from_args(LTVConfig, args) == LTVConfig(steps=5, relative_lr=False, n_dev=7)
    # an Optional field can be set back to None from the command line ("none"), which a
    # default like the CLI's n_per_task=32 otherwise makes unreachable
    assert config_from_args(LTVConfig, parser.parse_args(["--n-dev", "None"]),
                            base=LTVConfig(n_dev=7)) == LTVConfig(n_dev=None)
    with pytest.raises(SystemExit):
        parser.parse_args(["--n-dev", "all"])  # argparse: "invalid int value: 'all'"


def test_contributing_example_runs(tiny, task):
    """The 15-line example of CONTRIBUTING.md adds an intervention and a method that work."""
    text = (Path(__file__).parents[1] / "CONTRIBUTING.md").read_text()
    code = re.search(r"## Adding an intervention.*?```python\n(.*?)```", text, re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    scope: dict = {}
    exec(compile(code, "CONTRIBUTING.md", "exec"), scope)
    steer = scope["mean_residual"](tiny, task, 1)
    from tvlens import evaluate
    res = evaluate(tiny, task, vector=steer, n=8)
    zero = evaluate(tiny, task, n=8)
    assert 0 <= res.accuracy <= 1 and not torch.equal(
        run(tiny, _prompts(tiny, task), steer, logits="last").last_logits,
        run(tiny, _prompts(tiny, task), logits="last").last_logits)
    assert zero.n == res.n == 8


def test_per_row_interventions_follow_the_chunks(tiny, task):
    """Per-example vectors and per-row head values are cut to each chunk: batched == whole."""
    ps = _prompts(tiny, task)
    B, d, dh = len(ps), int(tiny.cfg.d_model), int(tiny.cfg.d_head)
    edit = ResidualEdit((1,), ("last",), torch.randn(B, 1, 1, d))
    patch = HeadPatch([(2, 1), (0, 3)], [torch.randn(B, dh), torch.randn(dh)], mode="add")
    for iv in (edit, patch, edit + patch):
        whole = run(tiny, ps, iv, logits="last", batch_size=None).last_logits
        parts = run(tiny, ps, iv, logits="last", batch_size=4).last_logits
        assert torch.allclose(whole, parts, atol=1e-5)
    with pytest.raises(TvlensError, match="capture it with batch_size=None"):
        run(tiny, ps, capture=["blocks.0.attn.hook_pattern"], capture_at=None, batch_size=2)


def _module_imports():
    """{module: set of tvlens modules it imports at module level} (and the names)."""
    import ast
    root = Path(__file__).parents[1] / "tvlens"
    out = {}
    for p in root.rglob("*.py"):
        name = ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = [(n.module, [a.name for a in n.names]) for n in ast.parse(p.read_text()).body
                     if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tvlens")]
    return out


def test_no_import_cycle_and_no_private_name_across_packages():
    imports = _module_imports()
    graph = {m: {d for d, _ in deps if d in imports and d != m and not d.startswith(m + ".")}
             for m, deps in imports.items()}
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in graph[m]:
            visit(d)
        path.pop()
        done.add(m)

    for m in graph:
        visit(m)
    for m, deps in imports.items():
        for d, names in deps:
            private = [n for n in names if n.startswith("_")]
            same_package = d.rsplit(".", 1)[0] == m.rsplit(".", 1)[0]
            assert not private or same_package, f"{m} imports private {private} from {d}"
