"""Learned task vectors: gradients, frozen model, convergence, resume, prefix caching."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tvlens.errors import TvlensError
from tvlens.learn import learn_task_vector
from tvlens.learn.experiments import composed_task
from tvlens.learn.prefix import capture_prefix
from tvlens.learn.trainer import ltv_loss, select_rows
from tvlens.forward import with_answers
from tvlens.prompts import make_examples, tokenize
from tvlens.tasks import Task, load_task

FAST = dict(steps=4, dev_every=2, n_dev=4, progress=False)


WORDS = ("cat dog sun moon tree fish bird rock leaf star lamp desk door wall road hill lake ship "
         "coin ring milk salt rain snow wind fire sand gold iron wood bell drum").split()


@pytest.fixture
def fixed_task():
    """Every input maps to the same one-token output: a constant vector can fit it."""
    return Task("fixed", tuple((w, "yes") for w in WORDS))


@pytest.fixture
def upper_task():
    return Task("upper", tuple((w, w.upper()) for w in WORDS))


@pytest.fixture
def tiny(fixed_task, upper_task):
    """A 3-layer GQA native model whose word tokenizer covers both tasks."""
    from tvlens.models import tiny_model

    texts = [f"{x} -> {y}\n" for t in (fixed_task, upper_task) for x, y in t.pairs]
    model = tiny_model(texts=texts, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, seed=0)
    # A random 32-wide unembedding caps logit margins near 2 nats (the final norm bounds
    # its input), so no vector could fit a mapping; scale it so a fit is reachable.
    with torch.no_grad():
        model.unembed.original_component.weight.mul_(10)
    return model


def _grads(model, tf, layers, positions, theta, prefix):
    theta = theta.clone().requires_grad_(True)
    loss = ltv_loss(model, tf, layers, positions, theta, prefix=prefix)
    (grad,) = torch.autograd.grad(loss, theta)
    return loss.detach(), grad


def _prefix_vs_full(model, task, layers, positions, shots=0):
    examples = make_examples(task.train[:12], task.train, shots=shots, seed=0)
    tf = with_answers(tokenize(model, examples), 0)
    tf = select_rows(tf, list(range(len(examples))))
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(len(layers), len(positions), model.cfg.d_model, generator=gen)
    l0 = min(layers)
    cache, as_tuple = capture_prefix(model, tf, l0)
    full = _grads(model, tf, layers, positions, theta, None)
    cached = _grads(model, tf, layers, positions, theta, (l0, cache, as_tuple))
    # The cached residual comes from a forward whose later blocks were skipped, the full
    # forward runs them: float32 (eps 1.2e-7) sums may reorder in every block. The loss is O(1-10): 1e-5 relative is ~80 eps. The gradient is held
    # relative to its own largest entry (its scale differs by orders of magnitude
    # between models and layers, ~0.03 on SmolLM2): 1e-5 of it, the bound the prefix
    # module promises (measured: 0 on SmolLM2, the same kernels run on the same rows).
    torch.testing.assert_close(cached[0], full[0], atol=0, rtol=1e-5)
    g_scale = full[1].abs().max()
    torch.testing.assert_close(cached[1], full[1], atol=1e-5 * g_scale, rtol=1e-5)
    assert g_scale > 0  # the comparison is not between two zeros
    return as_tuple


@pytest.mark.parametrize("layers,positions", [([1], ["last"]), ([0, 2], ["last", -2])])
def test_prefix_cache_equals_full_forward(tiny, upper_task, layers, positions):
    assert _prefix_vs_full(tiny, upper_task, layers, positions) is True  # native block returns a tuple
    # every block's module is restored after the cached forwards
    assert all(type(b.original_component).__name__ == "NativeBlock" for b in tiny.blocks)


def test_training_with_prefix_cache_equals_training_without(tiny):
    """The trainer's cached path (cache rows picked per step, leading padding trimmed)
    follows the full-forward run step for step."""
    # a few inputs of 4 words: prompts of different lengths, so the sampled rows' batches are
    # left-padded and trimmed differently from the cache's full-batch columns
    mixed = Task("mixed", tuple((" ".join(WORDS[i:i + (4 if i % 10 == 0 else 1)]), "yes")
                                for i in range(28)))
    kw = dict(steps=6, batch_size=4, dev_every=3, n_dev=4, progress=False, lr=0.1)
    cached = learn_task_vector(tiny, mixed, [1, 2], **kw)
    full = learn_task_vector(tiny, mixed, [1, 2], prefix_cache=False, **kw)
    assert cached.history["prefix_cache"] and not full.history["prefix_cache"]
    # float32 forwards of other shapes: the loss agrees to ~1e-6 relative at step 1 (same
    # θ = 0); Adam's steps carry the gradient's relative error forward unamplified (its
    # update is m/√v), so after 6 steps 1e-4 relative still leaves 10x room
    np.testing.assert_allclose(cached.history["loss"], full.history["loss"], rtol=1e-4)
    scale = full.vectors.abs().max()
    torch.testing.assert_close(cached.vectors, full.vectors, atol=1e-4 * scale, rtol=1e-4)
    assert scale > 0 and full.history["loss"][-1] < full.history["loss"][0]  # it trained


def test_cached_step_skips_the_early_blocks(tiny, upper_task):
    calls = []
    handles = [b.original_component.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, b in enumerate(tiny.blocks)]
    tf = with_answers(tokenize(tiny, make_examples(upper_task.train[:4])), 0)
    cache, as_tuple = capture_prefix(tiny, tf, 1)
    assert calls == [0, 1]  # the capture stops after block 1
    calls.clear()
    theta = torch.zeros(1, 1, tiny.cfg.d_model)
    ltv_loss(tiny, tf, [1], ["last"], theta, prefix=(1, cache, as_tuple))
    assert calls == [2]
    for h in handles:
        h.remove()


def test_gradients_reach_theta_only_and_model_is_untouched(tiny, fixed_task):
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    tv = learn_task_vector(tiny, fixed_task, [1], **FAST)
    for n, p in tiny.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == flags[n], n
    assert tv.vectors.abs().sum() > 0 and not tv.vectors.requires_grad
    assert tv.mode == "add" and tv.method == "ltv" and tv.history["prefix_cache"]


def test_training_drives_the_loss_of_a_fixed_mapping_down(tiny, fixed_task):
    tv = learn_task_vector(tiny, fixed_task, [1], steps=30, dev_every=30, n_dev=4,
                           progress=False)
    loss = tv.history["loss"]
    assert loss[0] > 2.0
    assert min(loss[-5:]) < 0.1 * loss[0], loss


def test_resumed_run_equals_uninterrupted(tiny, fixed_task, tmp_path):
    kw = dict(dev_every=3, n_dev=4, progress=False, checkpoint_every=5, patience=50, lr=0.1)
    full = learn_task_vector(tiny, fixed_task, [1], steps=10, **kw)
    (tmp_path / "a").mkdir()
    learn_task_vector(tiny, fixed_task, [1], steps=5, checkpoint_dir=tmp_path / "a", **kw)
    resumed = learn_task_vector(tiny, fixed_task, [1], steps=10, checkpoint_dir=tmp_path / "a",
                                resume=True, **kw)
    torch.testing.assert_close(resumed.vectors, full.vectors, atol=0, rtol=0)
    assert resumed.history["loss"] == full.history["loss"]
    assert resumed.history["dev"] == full.history["dev"]


def test_vector_records_its_config_and_template(tiny, upper_task, tmp_path):
    import os
    import stat

    from tvlens.evaluation import evaluate
    from tvlens.methods import LTVConfig

    cfg = LTVConfig(steps=4, dev_every=2, n_dev=4, template="qa", lr=0.1)
    tv = learn_task_vector(tiny, upper_task, [1], config=cfg, progress=False,
                           checkpoint_dir=tmp_path, checkpoint_every=2)
    assert tv.hyperparameters == cfg.to_dict() and tv.template == "qa"
    assert LTVConfig.from_dict(tv.hyperparameters) == cfg
    # the same settings as keywords give the same bits
    again = learn_task_vector(tiny, upper_task, [1], steps=4, dev_every=2, n_dev=4,
                              template="qa", lr=0.1, progress=False)
    assert torch.equal(tv.vectors, again.vectors) and again.hyperparameters == tv.hyperparameters
    # keywords that differ from the defaults override the config
    assert learn_task_vector(tiny, upper_task, [1], config=cfg, steps=2,
                             progress=False).hyperparameters["steps"] == 2
    # evaluate writes the prompts in the vector's own format
    assert evaluate(tiny, upper_task, vector=tv, n=6).template == "qa"
    # the checkpoint went through tvlens.io: the usual file mode, not a temp file's 0600
    mode = stat.S_IMODE(os.stat(tmp_path / "ltv_checkpoint.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_resume_refuses_another_configuration(tiny, fixed_task, upper_task, tmp_path):
    learn_task_vector(tiny, fixed_task, [1], checkpoint_dir=tmp_path, checkpoint_every=2, **FAST)
    with pytest.raises(TvlensError, match="exists; pass resume=True"):
        learn_task_vector(tiny, fixed_task, [1], checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(TvlensError, match="another run.*layers"):
        learn_task_vector(tiny, fixed_task, [2], checkpoint_dir=tmp_path, resume=True, **FAST)
    with pytest.raises(TvlensError, match="another run.*task"):
        learn_task_vector(tiny, upper_task, [1], checkpoint_dir=tmp_path, resume=True, **FAST)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny, fixed_task, tmp_path):
    from tvlens.learn.checkpoint import checkpoint_path, load_checkpoint

    # lr 1e20: the first step is fine, then θ overflows (a non-finite θ or loss)
    with pytest.raises(TvlensError, match=r"diverged at step (\d+).*last good checkpoint") as err:
        learn_task_vector(tiny, fixed_task, [1], lr=1e20, checkpoint_dir=tmp_path,
                          checkpoint_every=1, **dict(FAST, steps=8))
    bad_step = int(re.search(r"step (\d+)", str(err.value)).group(1))
    tensors, meta = load_checkpoint(checkpoint_path(tmp_path))
    assert bad_step >= 2 and meta["state"]["step"] == bad_step - 1
    assert torch.isfinite(tensors["phi"]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=[]), "no layers"),
    (dict(layers=[1], positions=[]), "no positions"),
    (dict(layers=[1], steps=0), "steps must be a positive"),
    (dict(layers=[7]), "out of range"),
    (dict(layers=[1], positions=[9]), "falls outside"),
])
def test_bad_input(tiny, fixed_task, kwargs, match):
    args = dict(FAST, **kwargs)
    layers = args.pop("layers")
    with pytest.raises(TvlensError, match=match):
        learn_task_vector(tiny, fixed_task, layers, **args)


def test_composed_task_applies_both_maps():
    t = composed_task("english_french", "capitalize")
    assert ("dog", "Chien") in t.pairs and t.name == "english_french+capitalize"
    assert len(t.pairs) == len(load_task("english_french").pairs)


@pytest.mark.slow
def test_prefix_cache_equals_full_forward_on_smollm2(smol):
    task = load_task("antonym")
    assert _prefix_vs_full(smol, task, [10], ["last"]) is False  # HF layer returns a tensor
    _prefix_vs_full(smol, task, [4, 20], ["last", -2], shots=2)


def test_cli_refuses_bad_layers(tmp_path, capsys):
    from tvlens.cli import main

    assert main(["learn", "--task", "antonym", "--layers", "ten", "--out",
                 str(tmp_path / "v.safetensors")]) == 2
    assert "--layers 'ten' must be comma-separated integers" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_learn_json(smol, tmp_path, capsys):
    import json

    from tvlens.cli import main
    from tvlens.evaluation import evaluate
    from tvlens.vector import TaskVector

    out = tmp_path / "v.safetensors"
    assert main(["learn", "--task", "antonym", "--layers", "10", "--steps", "3", "--n", "8",
                 "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"] == [10] and data["positions"] == ["last"] and data["steps"] == 3
    assert data["prefix_cache"] is True and data["n"] == 8
    assert data["stopped"] == "budget"  # 3 steps, no dev evaluation could stop it sooner
    assert isinstance(data["train_seconds"], float) and data["train_seconds"] > 0
    tv = TaskVector.load(out)
    assert tv.method == "ltv" and tv.layers == (10,) and len(tv.history["loss"]) == 3
    assert data["final_loss"] == pytest.approx(tv.history["loss"][-1])
    # the reported numbers, recomputed from the saved vector by evaluate in-process
    task = load_task("antonym")
    res = evaluate(smol, task, vector=tv, n=8)
    assert (data["accuracy"], data["ci_low"], data["ci_high"]) == pytest.approx(
        (res.accuracy, res.ci_low, res.ci_high))
    # the references are in the vector's own format (the LTV default, "qa")
    assert data["template"] == tv.template == "qa"
    assert data["zero_shot"] == pytest.approx(evaluate(smol, task, n=8, template="qa").accuracy)
    assert data["icl"] == pytest.approx(evaluate(smol, task, shots=5, n=8, template="qa").accuracy)


# ----- issue 14: stopping, answer-only unembedding, composition, early position ----------
def test_stopped_says_whether_dev_or_the_budget_ended_training(tiny, fixed_task):
    # lr 1e-30: θ moves by ~1e-30 of the residual scale, below float32's resolution, so
    # dev never improves on its first evaluation and patience 2 ends training after the
    # third (step 3 of 50)
    still = learn_task_vector(tiny, fixed_task, [1], steps=50, dev_every=1, patience=2, n_dev=4,
                              lr=1e-30, progress=False)
    assert still.history["stopped"] == "dev" and still.history["stopped_early"]
    assert still.history["steps_run"] == 3 and still.history["best_step"] == 1
    # two evaluations cannot exhaust patience 3: the budget ends training
    short = learn_task_vector(tiny, fixed_task, [1], steps=4, dev_every=2, patience=3, n_dev=4,
                              lr=0.1, progress=False)
    assert short.history["stopped"] == "budget" and not short.history["stopped_early"]
    assert short.history["steps_run"] == 4


def _full_logits_loss(model, tf, layers, positions, theta):
    """The LTV loss from every column's logits (the reference the answer-only path keeps)."""
    from tvlens.interventions import ResidualEdit

    hooks = ResidualEdit(tuple(layers), tuple(positions), theta, "add").hooks(model, tf.prompt)
    logits = model.run_with_hooks(tf.input_ids, attention_mask=tf.attention_mask, fwd_hooks=hooks)
    assert logits.shape[1] == tf.input_ids.shape[1]  # no column was cut
    lsm = logits.float().log_softmax(-1)
    P, per_row = tf.prompt_len, []
    for b in range(len(tf.prompt)):
        ids = [int(t) for t in tf.targets[b] if t != -100]
        # column P-1+j predicts answer token j
        per_row.append(-torch.stack([lsm[b, P - 1 + j, t] for j, t in enumerate(ids)]).mean())
    return torch.stack(per_row).mean()


def _unembedded_shapes(model):
    shapes = []
    handle = model.unembed.original_component.register_forward_pre_hook(
        lambda m, args: shapes.append((tuple(args[0].shape), args[0].is_contiguous())))
    return shapes, handle


def _answer_only_vs_full(model, tf, layers, positions, tol):
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(len(layers), len(positions), model.cfg.d_model, generator=gen)
    for p in model.parameters():
        p.requires_grad_(False)
    th = theta.clone().requires_grad_(True)
    ref = _full_logits_loss(model, tf, layers, positions, th)
    (g_ref,) = torch.autograd.grad(ref, th)
    shapes, handle = _unembedded_shapes(model)
    try:
        loss, grad = _grads(model, tf, layers, positions, theta, None)
        l0 = min(layers)
        cache, as_tuple = capture_prefix(model, tf, l0)
        c_loss, c_grad = _grads(model, tf, layers, positions, theta, (l0, cache, as_tuple))
    finally:
        handle.remove()
    B, A = tf.targets.shape
    # only the A answer-predicting columns reach W_U, as one contiguous [B, A, d] input
    # (the capture's forward is the runner's scoring path: the same cut)
    assert shapes[0] == ((B, A, model.cfg.d_model), True) and shapes[-1] == shapes[0], shapes
    for lo, gr in ((loss, grad), (c_loss, c_grad)):
        torch.testing.assert_close(lo, ref.detach(), atol=0, rtol=tol)
        scale = g_ref.abs().max()
        torch.testing.assert_close(gr, g_ref, atol=tol * scale, rtol=tol)
    assert g_ref.abs().max() > 0


def test_answer_only_unembedding_equals_the_full_logits_loss(tiny):
    # answers of one and two tokens: right padding (-100 targets) inside the kept columns
    mixed = Task("mixed", tuple((w, "yes" if i % 2 else f"yes {w.upper()}")
                                for i, w in enumerate(WORDS)))
    examples = make_examples(mixed.train[:10], mixed.train, shots=1, seed=0)
    tf = with_answers(tokenize(tiny, examples), 0)
    assert (tf.targets == -100).any() and tf.targets.shape[1] == 2
    # float32: the same dot products in another matmul shape; losses O(1-10), 1e-5
    # relative is ~80 eps; the gradient held to 1e-5 of its largest entry
    _answer_only_vs_full(tiny, tf, [1], ["last"], tol=1e-5)
    _answer_only_vs_full(tiny, tf, [0, 2], ["last", -2], tol=1e-5)


@pytest.mark.slow
def test_answer_only_unembedding_equals_the_full_logits_loss_on_smollm2(smol):
    task = load_task("antonym")
    examples = make_examples(task.train[:8], task.train, shots=2, seed=0)
    tf = select_rows(with_answers(tokenize(smol, examples), 0), list(range(8)))
    # float32 logits ~20 from [B·A, 576] @ [576, 49152] vs the full-sequence product:
    # summation order differs; 1e-5 relative is ~80 eps
    _answer_only_vs_full(smol, tf, [10], ["last"], tol=1e-5)


def test_composition_reports_exact_match_and_single_vector_controls(tiny, upper_task):
    """θ_A + θ_B on x ↦ B(A(x)) by exact match, recomputed by hand with greedy decoding."""
    from tvlens.forward import greedy_answers
    from tvlens.learn.experiments import composition
    from tvlens.prompts import PromptSet

    # B appends " yes": every composed answer "W yes" starts with A's own answer "W",
    # so θ_A alone can get the first token right and still miss the answer
    tag = Task("tag", tuple((w.upper(), f"{w.upper()} yes") for w in WORDS))
    kw = dict(steps=20, dev_every=10, n_dev=4, lr=0.1, progress=False)
    df = composition(tiny, upper_task, tag, 1, template="arrow", **kw)
    assert list(df["name"]) == ["zero-shot", "θ_upper", "θ_tag", "θ_upper + θ_tag", "ICL 5-shot",
                                "θ_upper on upper", "θ_tag on tag"]
    assert list(df["task"]) == ["upper+tag"] * 5 + ["upper", "tag"]
    # the same training (same seed and settings: the same bits), decoded by hand
    va = learn_task_vector(tiny, upper_task, [1], template="arrow", **kw)
    vb = learn_task_vector(tiny, tag, [1], template="arrow", **kw)
    composed = composed_task(upper_task, tag)
    ps = PromptSet.build(tiny, composed, split="test", template="arrow")
    batch = ps.batch
    assert all(len(a) == 2 for a in batch.answer_ids)  # multi-token: "W" "yes"
    for name, vec in (("zero-shot", None), ("θ_upper", va), ("θ_tag", vb),
                      ("θ_upper + θ_tag", va + vb)):
        hooks = vec.hooks(tiny, batch) if vec is not None else []
        gen = greedy_answers(tiny, batch, hooks)
        em = np.mean([g == a for g, a in zip(gen, batch.answer_ids)])
        row = df.set_index("name").loc[name]
        assert row["exact_match"] == pytest.approx(em, abs=1e-12), name
        assert row["em_low"] <= row["exact_match"] <= row["em_high"]
        # an exact match has its first token right: exact match <= first-token accuracy
        assert row["exact_match"] <= row["accuracy"] + 1e-12
        assert row["n"] == len(batch)
    # the positive controls: each vector on its own task's test prompts, decoded by hand
    for name, task, vec in (("θ_upper on upper", upper_task, va), ("θ_tag on tag", tag, vb)):
        own = PromptSet.build(tiny, task, split="test", template="arrow").batch
        gen = greedy_answers(tiny, own, vec.hooks(tiny, own))
        row = df.set_index("name").loc[name]
        assert row["exact_match"] == pytest.approx(np.mean([g == a for g, a in zip(gen, own.answer_ids)]),
                                                   abs=1e-12), name
        assert row["accuracy"] == pytest.approx(np.mean([g[0] == a[0] for g, a in zip(gen, own.answer_ids)]),
                                                abs=1e-12), name
        assert row["n"] == len(own)
    rows = df.set_index("name")
    # θ_upper's own answer "W" is the first token of every composed answer "W yes";
    # tag covers no lowercase input: nothing to compare
    assert rows.loc["θ_upper", "shared_first_token"] == 1.0
    assert rows.loc["θ_upper", "n_shared"] == len(batch)
    assert rows.loc["θ_tag", "n_shared"] == 0 and np.isnan(rows.loc["θ_tag", "shared_first_token"])


def test_early_position_is_index_4_and_refused_on_short_prompts(tiny, fixed_task):
    from tvlens.learn.experiments import configuration

    cfg = configuration(tiny, "early position")
    assert cfg["positions"] == [4] and cfg["layers"] == [1] and cfg["shots"] == 0
    # "Q: cat\nA:" is 7 tokens on the tiny tokenizer (BOS, then 6): index 4 is inside
    assert configuration(tiny, "early position", task=fixed_task, template="qa")["positions"] == [4]
    # "cat ->" is 3 (BOS, cat, ->): index 4 falls outside, refused naming the prompt
    with pytest.raises(TvlensError, match=r"position 4.*'cat ->'.* has only 3 tokens"):
        configuration(tiny, "early position", task=fixed_task, template="arrow")
    # the configuration's θ sits on the fifth real token of every (left-padded) prompt
    tv = learn_task_vector(tiny, fixed_task, cfg["layers"], cfg["positions"], template="qa",
                           **FAST)
    assert tv.positions == (4,)
