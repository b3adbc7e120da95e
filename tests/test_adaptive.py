"""Adaptive task vectors: expansion shapes, the injection oracle, training, files, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import tvlens
from tvlens.adaptive import (
    AdaptiveGenerator, Expansion, check_unseen, expansion_parameter_count, make_generator,
    train_generator, training_pairs,
)
from tvlens.adaptive.analysis import (
    generated_vectors, layer_norm_profile, projection_2d, similarity_structure,
)
from tvlens.errors import TvlensError
from tvlens.prompts import make_examples, tokenize
from tvlens.runner import answer_nll


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(tiny, task, **kw):
    kw.setdefault("init", "default")
    return make_generator(tiny, "native", texts=[x for x, _ in task.pairs], **kw)


# ----- expansion ------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [None, 5])
def test_expansion_shapes_and_parameter_count(rank):
    d_gen, L, d = 24, 3, 16
    exp = Expansion(d_gen, L, d, rank=rank, init="default")
    out = exp(torch.randn(7, d_gen))
    assert out.shape == (7, L, d)
    counted = sum(p.numel() for p in exp.parameters())
    expected = d_gen * L * d + L * d if rank is None else d_gen * rank + rank * L * d + L * d
    assert counted == expected == expansion_parameter_count(d_gen, L, d, rank)


def test_expansion_is_linear_and_zero_initialised():
    exp = Expansion(8, 2, 4, init="default")
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    bias = exp(torch.zeros(1, 8))
    torch.testing.assert_close(exp(a + b) - bias, (exp(a) - bias) + (exp(b) - bias), atol=1e-5, rtol=0)
    # zero weights and bias: 0·x + 0 is exactly 0 (by construction, any kernel)
    assert torch.count_nonzero(Expansion(8, 2, 4)(torch.randn(3, 8))) == 0


# ----- the injection oracle -------------------------------------------------------------
@pytest.mark.parametrize("position", ["last", "all"])
def test_injected_residual_is_each_examples_own_vector(tiny, task, position):
    gen = _gen(tiny, task, layers=(0, 2), position=position, scale=0.7)
    examples = make_examples(task.test[:5])
    examples[1] = tvlens.Example("w1 w2 w3", "o1")  # a longer prompt: real left padding
    batch = tokenize(tiny, examples, "qa")
    v = gen.generate([e.x for e in examples]).detach()  # [B, L, d]
    store = {}

    def saver(key):
        def fn(act, hook=None):
            store[key] = act.detach().clone()
            return act
        return fn

    hooks = []
    for layer in gen.layers:
        hooks.append((f"blocks.{layer}.hook_resid_post", saver(("pre", layer))))
    hooks += gen.hooks(tiny, batch)
    for layer in gen.layers:
        hooks.append((f"blocks.{layer}.hook_resid_post", saver(("post", layer))))
    with torch.no_grad():
        tiny.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    last = batch.position_index("last")
    mask = batch.attention_mask.bool()
    for li, layer in enumerate(gen.layers):
        diff = store[("post", layer)] - store[("pre", layer)]
        expected = torch.zeros_like(diff)
        for b in range(len(batch)):
            if position == "last":
                expected[b, last[b]] = 0.7 * v[b, li]
            else:
                expected[b, mask[b]] = 0.7 * v[b, li]
        torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v[0], v[2])  # the vectors really are per query


def test_task_vector_applies_like_the_generator(tiny, task):
    gen = _gen(tiny, task, layers=(1,), scale=2.0)
    xs = [x for x, _ in task.test[:4]]
    batch = tokenize(tiny, make_examples(task.test[:4]), "qa")
    tv = gen.task_vector(xs, task="tiny")
    assert isinstance(tv, tvlens.TaskVector) and tv.vectors.shape == (4, 1, 1, 32)
    with torch.no_grad():
        a = tvlens.forward(tiny, batch, gen.hooks(tiny, batch))
        b = tvlens.forward(tiny, batch, tv.hooks(tiny, batch))
        c = tvlens.forward(tiny, batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3
    one = gen.task_vector(xs[0])
    torch.testing.assert_close(one.vectors, tv.vectors[0])


# ----- training -------------------------------------------------------------------------
class _Rolled:
    """The generator's vectors, each given to the next query of the batch: right vectors,
    wrong queries. An intervention for ``evaluate``."""

    method = "rolled"

    def __init__(self, gen):
        self.gen = gen

    def hooks(self, model, batch):
        from dataclasses import replace

        tv = self.gen.task_vector([e.x for e in batch.examples])
        return replace(tv, vectors=tv.vectors.roll(1, 0)).hooks(model, batch)


def test_training_lowers_the_loss_of_a_fixed_mapping(task):
    # A wider target than the `tiny` fixture: a random 32-wide model with tied embeddings
    # bounds its logits so tightly that even free per-example vectors stall near loss 1.7.
    # The answers are 7 colours, one first token each, cycling over the inputs: only a
    # vector made for its own query names the right one.
    target = tvlens.tiny_model(texts=[f"Q: {x}\nA: {y}\n\n" for x, y in task.pairs],
                               n_layers=2, d_model=128, n_heads=4, seed=0)
    gen = make_generator(target, "native", texts=[x for x, _ in task.pairs], position="all")
    batch = tokenize(target, make_examples(task.train), "qa")

    def loss():
        with torch.no_grad():
            return float(answer_nll(target, batch, gen.hooks(target, batch)).mean())

    before = loss()
    frozen = [p.detach().clone() for p in target.parameters()]
    hist = train_generator(target, gen, [task], epochs=40, batch_size=10, lr=5e-3, progress=False)
    after = loss()
    assert after < 0.3 * before, (before, after)
    assert hist["steps"] == 80 and len(hist["loss"]) == 80
    assert all(torch.equal(a, b) for a, b in zip(frozen, target.parameters()))  # frozen: bits
    assert all(p.requires_grad for p in target.parameters())  # flags restored
    train = tokenize(target, make_examples(task.train), "qa")
    assert len(set(train.first_answer_ids.tolist())) == 7  # a wrong vector can be wrong
    kw = dict(template="qa", split="train")
    acc = tvlens.evaluate(target, task, vector=gen, **kw).accuracy
    assert acc == 1.0
    # the same vectors on the wrong queries, and no vector: far from it
    assert tvlens.evaluate(target, task, vector=_Rolled(gen), **kw).accuracy < 0.5
    assert tvlens.evaluate(target, task, **kw).accuracy < 0.5


def test_resume_takes_the_same_steps(tiny, task, tmp_path):
    kw = dict(epochs=2, batch_size=8, lr=5e-3, progress=False, seed=3)
    straight = _gen(tiny, task, init="zeros")
    full = train_generator(tiny, straight, [task], **kw)
    resumed = _gen(tiny, task, init="zeros")
    train_generator(tiny, resumed, [task], checkpoint_dir=tmp_path, max_steps=3, **kw)
    again = _gen(tiny, task, init="zeros")
    hist = train_generator(tiny, again, [task], checkpoint_dir=tmp_path, resume=True, **kw)
    assert hist["steps"] == 6
    for (n, a), (_, b) in zip(straight.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)
    # the checkpoint copies bits (weights, Adam's state, the step counter): the resumed
    # run takes exactly the uninterrupted run's steps, on one thread
    assert hist["loss"] == full["loss"]
    for (n, a), (_, b) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]  # no pickle


def test_optimizer_state_round_trips_through_safetensors(tiny, task, tmp_path):
    from tvlens.io import load_tensors, optimizer_state, optimizer_tensors, save_tensors

    gen = _gen(tiny, task)
    params = [p for p in gen.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.95), weight_decay=1e-5)
    gen.generate(["w1", "w2"]).pow(2).sum().backward()
    opt.step()
    tensors, meta = optimizer_tensors(opt.state_dict())
    save_tensors(tmp_path / "opt.safetensors", tensors, meta, key="opt")
    back_tensors, back_meta = load_tensors(tmp_path / "opt.safetensors", key="opt")
    fresh = torch.optim.Adam(params, lr=5.0)
    fresh.load_state_dict(optimizer_state(back_tensors, back_meta))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"] and b["param_groups"][0]["betas"] == (0.8, 0.95)
    assert set(a["state"]) == set(b["state"]) and len(a["state"]) > 20  # every param with a grad
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_make_generator_leaves_the_global_rng_alone(tiny, task):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    gen = _gen(tiny, task, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # another global state: the same weights, from the seed alone
    again = _gen(tiny, task, seed=5)
    for (n, a), (_, b) in zip(gen.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n
    other = _gen(tiny, task, seed=6)
    assert not torch.equal(gen.expansion.up.weight, other.expansion.up.weight)


def test_generator_is_an_intervention_with_its_template_and_model(tiny, task):
    from tvlens.interventions import HeadPatch
    from tvlens.methods import ATVConfig

    gen = _gen(tiny, task, layers=(1,), scale=2.0)
    assert gen.template == "atv" and gen.made_for == tvlens.fingerprint(tiny)
    assert gen.config.settings == ATVConfig(scale=2.0, init="default")
    assert gen.config.scale == 2.0 and set(gen.config.versions) >= {"tvlens", "torch"}
    # evaluate writes the prompts in the generator's format when not told otherwise
    kw = dict(n=5, progress=False)
    implicit = tvlens.evaluate(tiny, task, vector=gen, **kw)
    explicit = tvlens.evaluate(tiny, task, vector=gen, template="qa", **kw)
    assert implicit.template == "atv"  # the same bytes as "qa" (ATV's fallback format)
    assert implicit.records.first_token_logprob.tolist() == explicit.records.first_token_logprob.tolist()
    with pytest.warns(UserWarning, match="'arrow'"):
        tvlens.evaluate(tiny, task, vector=gen, template="arrow", **kw)
    tv = gen.task_vector([x for x, _ in task.test[:5]])
    assert tv.template == "atv"
    # composition: with a head patch for the same model; refused for another model
    both = gen + HeadPatch.zero(tiny, [(0, 1)])
    assert tvlens.evaluate(tiny, task, vector=both, **kw).n == 5
    other = tvlens.tiny_model(texts=["Q: a\nA: b"], n_layers=2, d_model=16, n_heads=2)
    with pytest.raises(TvlensError, match="cannot compose"):
        gen + HeadPatch([(0, 1)], 0, made_for=tvlens.fingerprint(other))
    # settings from a config; keywords that differ from the defaults override it
    from_cfg = make_generator(tiny, "native", texts=[x for x, _ in task.pairs],
                              config=ATVConfig(scale=0.5, rank=3), rank=4)
    assert from_cfg.scale == 0.5 and from_cfg.config.rank == 4


# ----- files ----------------------------------------------------------------------------
def test_save_load_reproduces_the_vectors(tiny, task, tmp_path):
    gen = _gen(tiny, task, rank=4, position="all", scale=0.5)
    gen.save(tmp_path / "g")
    back = AdaptiveGenerator.load(tmp_path / "g", tiny)
    xs = [x for x, _ in task.test]
    with torch.no_grad():  # the loaded weights are the saved bits, run on the same batch
        assert torch.equal(gen.generate(xs), back.generate(xs))
    assert back.config == gen.config
    other = tvlens.tiny_model(texts=["Q: a\nA: b"], n_layers=2, d_model=16, n_heads=2)
    with pytest.raises(TvlensError, match="trained for"):
        AdaptiveGenerator.load(tmp_path / "g", other)
    with pytest.raises(TvlensError, match="no saved generator"):
        AdaptiveGenerator.load(tmp_path / "missing", tiny)
    batch = tokenize(other, make_examples([("a", "b")]), "qa")
    with pytest.raises(TvlensError, match="trained for"):
        gen.hooks(other, batch)


def test_saved_config_is_checked(tiny, task, tmp_path):
    import json

    gen = _gen(tiny, task)
    folder = gen.save(tmp_path / "g")
    data = json.loads((folder / "config.json").read_text())
    assert data["settings"]["target_template"] == "atv" and "versions" in data
    data["settings"]["from_the_future"] = 1
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(TvlensError, match="from_the_future"):
        AdaptiveGenerator.load(folder, tiny)
    gen.save(folder)
    _gen(tiny, task, scale=3.0).save(tmp_path / "h")  # a config.json of another save
    (folder / "config.json").write_text((tmp_path / "h" / "config.json").read_text())
    with pytest.raises(TvlensError, match="different saves"):
        AdaptiveGenerator.load(folder, tiny)


# ----- bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0, 0.0, math.inf, math.nan, "1"])
def test_bad_scale(tiny, task, scale):
    with pytest.raises(TvlensError, match="λ"):
        _gen(tiny, task, scale=scale)
    gen = _gen(tiny, task)
    if scale != "1":
        with pytest.raises(TvlensError, match="λ"):
            gen.scaled(scale)


@pytest.mark.parametrize("scale", [-0.001, -1])
def test_bad_negative_scale(tiny, task, scale):
    with pytest.raises(TvlensError, match="must be > 0"):
        _gen(tiny, task, scale=scale)
    with pytest.raises(TvlensError, match="must be > 0"):
        _gen(tiny, task).scaled(scale)


def test_bad_tasks_and_layers(tiny, task):
    with pytest.raises(TvlensError, match="no training tasks"):
        training_pairs([])
    with pytest.raises(TvlensError, match="no training tasks"):
        train_generator(tiny, _gen(tiny, task), [], progress=False)
    with pytest.raises(TvlensError, match="also training tasks"):
        check_unseen(["antonym", "tiny"], [task])
    from tvlens.tasks import Task
    half = Task("half", task.pairs[:20] + tuple((f"new{i}", "red") for i in range(20)))
    with pytest.raises(TvlensError, match="'half' is not unseen: 50% of its inputs"):
        check_unseen([task], [half])
    check_unseen([Task("a", task.pairs[:20])], [Task("b", task.pairs[20:])])  # disjoint: fine
    with pytest.raises(TvlensError, match="out of range"):
        _gen(tiny, task, layers=(5,))
    with pytest.raises(TvlensError, match="separate model"):
        make_generator(tiny, tiny)


def test_query_longer_than_the_generators_context(tiny, task):
    gen = _gen(tiny, task, native={"n_ctx": 10})  # "Q: w1\nA:" is 8 word pieces with BOS
    with pytest.raises(TvlensError, match="longer than the generator's context"):
        gen.generate(["w1 w2 w3 w4 w5 w6 w7"])
    gen.generate(["w1"])  # short queries still fit


# ----- analysis -------------------------------------------------------------------------
def test_similarity_and_projection_on_planted_clusters():
    torch.manual_seed(0)
    a = torch.randn(1, 2, 8) + 0.05 * torch.randn(6, 2, 8)
    b = torch.randn(1, 2, 8) + 0.05 * torch.randn(6, 2, 8)
    labels = ["a"] * 6 + ["b"] * 6
    sims = similarity_structure(torch.cat([a, b]), labels)
    assert sims["within"] > 0.95 and sims["across"] < sims["within"] - 0.2
    df = projection_2d(torch.cat([a, b]), labels)
    gap = abs(df[df.task == "a"].pc1.mean() - df[df.task == "b"].pc1.mean())
    assert gap > 5 * df.groupby("task").pc1.std().max()


def test_generated_vectors_and_norm_profile(tiny, task):
    gen = _gen(tiny, task, layers=(0, 1), scale=3.0)
    v, labels = generated_vectors(gen, [task], n=5)
    assert v.shape == (5, 2, 32) and labels == ["tiny"] * 5
    prof = layer_norm_profile(gen, v)
    # against what is injected: the residual's change at each layer, measured around the
    # generator's hooks in one forward over the same five queries
    batch = tokenize(tiny, make_examples(task.test[:5]), gen.config.target_template)
    store = {}

    def saver(key):
        return lambda act, hook=None: store.__setitem__(key, act.detach().clone())

    hooks = [(f"blocks.{layer}.hook_resid_post", saver(("pre", layer))) for layer in gen.layers]
    hooks += gen.hooks(tiny, batch)
    hooks += [(f"blocks.{layer}.hook_resid_post", saver(("post", layer))) for layer in gen.layers]
    with torch.no_grad():
        tiny.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    last = batch.position_index("last")
    norms = torch.stack([(store[("post", layer)] - store[("pre", layer)])[torch.arange(5), last]
                         .norm(dim=-1) for layer in gen.layers], 1)  # [5, L]
    # (h + λv) − h in float32 rounds at the residual's magnitude: 1e-5 relative is ~80 eps
    torch.testing.assert_close(torch.tensor(prof.mean_norm.tolist()), norms.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(prof.std_norm.tolist()), norms.std(0), rtol=1e-4, atol=1e-5)
    assert norms.min() > 0.1  # the vectors are not zero


# ----- the embedded model ---------------------------------------------------------------
@pytest.mark.slow
def test_oracle_and_one_step_on_smollm2(smol):
    task = tvlens.load_task("antonym")
    gen = make_generator(smol, "native", texts=[x for x, _ in task.pairs], layers=(3, 20),
                         init="default", scale=0.1)
    batch = tokenize(smol, make_examples(task.test[:3]), "qa")
    v = gen.generate([e.x for e in batch.examples]).detach()
    store = {}
    hooks = [("blocks.20.hook_resid_post", lambda a, hook=None: store.setdefault("pre", a.clone()))]
    hooks += gen.hooks(smol, batch)
    hooks += [("blocks.20.hook_resid_post", lambda a, hook=None: store.setdefault("post", a.clone()))]
    with torch.no_grad():
        smol.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask, fwd_hooks=hooks)
    last = batch.position_index("last")
    diff = store["post"] - store["pre"]
    for b in range(3):
        torch.testing.assert_close(diff[b, last[b]], 0.1 * v[b, 1], atol=1e-4, rtol=1e-4)
    r = tvlens.evaluate(smol, task, vector=gen, template="qa", n=4, progress=False)
    assert r.n == 4 and r.vector == "atv"


def test_compare_table_and_ltv_column(tiny, task):
    from tvlens.adaptive.analysis import compare, summary
    from tvlens.tasks import Task

    # in-domain and unseen tasks with disjoint inputs (the words of one task, split in two)
    seen = Task("seen", task.pairs[::2], seed=task.seed)
    other = Task("other", task.pairs[1::2], seed=task.seed)
    gen = _gen(tiny, task)
    table = compare(tiny, gen, [seen], [other], n=5, shots=2, ltv_steps=2)
    assert list(table.method) == ["zero-shot", "icl-2", "atv", "ltv"] * 2
    assert list(table.group) == ["in-domain"] * 4 + ["unseen"] * 4
    # each row is that method's evaluate result on the same queries (the LTV row needs a
    # training run of its own and is left to the LTV tests)
    kw = dict(n=5, template=gen.config.target_template)
    runs = {(t.name, m): r for t in (seen, other) for m, r in (
        ("zero-shot", tvlens.evaluate(tiny, t, **kw)),
        ("icl-2", tvlens.evaluate(tiny, t, shots=2, **kw)),
        ("atv", tvlens.evaluate(tiny, t, vector=gen, **kw)))}
    for _, row in table[table.method != "ltv"].iterrows():
        r = runs[(row.task, row.method)]
        assert (row.accuracy, row.ci_low, row.ci_high, row.n) == pytest.approx(
            (r.accuracy, r.ci_low, r.ci_high, r.n)), row.method
    assert table.n.tolist() == [5] * 8 and table.accuracy.between(0, 1).all()
    means = summary(table)
    assert means.shape == (2, 4)
    assert means.loc["unseen", "icl-2"] == pytest.approx(runs[("other", "icl-2")].accuracy)
    with pytest.raises(TvlensError, match="not unseen: 100% of its inputs"):
        compare(tiny, gen, [seen], [Task("relabelled", tuple((x, "red") for x, _ in seen.pairs))], n=5)
    with pytest.raises(TvlensError, match="also training tasks"):
        compare(tiny, gen, [task], [task], n=5)
    with pytest.raises(TvlensError, match="no tasks"):
        compare(tiny, gen, [], [], n=5)


# ----- CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--tasks", " , "], "no tasks given"),
    (["--tasks", "antonym", "--scale", "0"], "λ"),
    (["--tasks", "antonym", "--scale", "nan"], "λ"),
    (["--tasks", "no_such_task"], "unknown task"),
    (["--tasks", "antonym", "--scale", "-0.001"], "must be > 0"),
    (["--tasks", "antonym", "--recipe", "paper"], "unknown ATV recipe 'paper'; use one of fast, reference"),
])
def test_cli_train_bad_input(tmp_path, capsys, argv, message):
    from tvlens.cli import main

    assert main(["adaptive", "train", "--out", str(tmp_path / "g"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_then_evaluate(smol, tmp_path, capsys):
    import json

    from tvlens.cli import main

    out = tmp_path / "gen"
    argv = ["adaptive", "train", "--tasks", "antonym,uppercase", "--out", str(out), "--layers",
            "10,20", "--max-steps", "1", "--n-per-task", "4", "--batch-size", "4", "--json",
            "--device", "cpu"]
    assert main(argv) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 1 and trained["expansion_parameters"] == 576 * 2 * 576 + 2 * 576
    assert main(["adaptive", "evaluate", "--generator-dir", str(out), "--task", "antonym",
                 "--n", "4", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seen_in_training"] and res["n"] == 4
    from tvlens.adaptive import AdaptiveGenerator
    saved = AdaptiveGenerator.load(out, smol).config.history["train_inputs"]
    assert saved == sorted({x for t in ("antonym", "uppercase")
                            for x, _ in tvlens.load_task(t).train[:4]})  # what it trained on
    for name in ("antonym", "uppercase"):
        assert main(["adaptive", "evaluate", "--generator-dir", str(out), "--task", name,
                     "--n", "4", "--json", "--device", "cpu"]) == 0
        got = json.loads(capsys.readouterr().out)["input_overlap"]
        inputs = [x for x, _ in tvlens.load_task(name).test[:4]]
        assert got == sum(x in saved for x in inputs) / 4
    # a user's task made of the training inputs (plus two new ones): the overlap shows
    mixed = {x: x.upper() for x in saved} | {"zebra": "ZEBRA", "violin": "VIOLIN"}
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(mixed))
    assert main(["adaptive", "evaluate", "--generator-dir", str(out), "--task", str(path),
                 "--n", "4", "--icl-shots", "2", "--json", "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)["input_overlap"]
    inputs = [x for x, _ in tvlens.load_task(str(path)).test[:4]]
    assert got == sum(x in saved for x in inputs) / len(inputs) and got > 0
    assert main(argv[:4] + ["--unseen", "capitalize", "--out", str(tmp_path / "g2")] + argv[6:]) == 2
    assert "'capitalize' is not unseen: 100% of its inputs" in capsys.readouterr().err
    # the reported numbers, recomputed in-process from the saved generator
    from tvlens.adaptive import AdaptiveGenerator

    task = tvlens.load_task("antonym")
    gen = AdaptiveGenerator.load(out, smol)
    tpl = gen.config.target_template
    r = tvlens.evaluate(smol, task, vector=gen, template=tpl, n=4)
    assert (res["accuracy"], res["ci_low"], res["ci_high"]) == pytest.approx(
        (r.accuracy, r.ci_low, r.ci_high))
    assert res["zero_shot"] == pytest.approx(tvlens.evaluate(smol, task, template=tpl, n=4).accuracy)


@pytest.mark.slow
def test_minilm_encoder_reads_queries_offline(tiny, task):
    """The sentence-encoder generator (reviewers' question) loads from its PyPI package."""
    from tvlens.adaptive import make_generator

    gen = make_generator(tiny, "minilm", seed=0)
    vecs = gen.generate([x for x, _ in task.test[:3]])
    assert vecs.shape == (3, tiny.cfg.n_layers, tiny.cfg.d_model)
    emb = gen.encoder.encode(["Q: cat\nA:", "Q: cat\nA:", "Q: house\nA:"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb[0], emb[1])
    assert not torch.allclose(emb[0], emb[2])
