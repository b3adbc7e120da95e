"""ATV recipes: the released ATV code's prompt strings, init, hook placement and training
order (issue 13), checked against rules written from the reference code."""

from __future__ import annotations

import math

import pytest
import torch

import tvlens
from tvlens.adaptive import make_generator, train_generator, training_pairs
from tvlens.errors import TvlensError
from tvlens.prompts import make_examples, tokenize
from tvlens.runner import answer_nll


pytestmark = pytest.mark.usefixtures("one_thread")


# ----- recipes: the released ATV code's rules (issue 13) --------------------------------
# The expected strings below are written from the reference code's rules, not from tvlens:
#   generator:  "Q: {input} \n A: ".format(input=x.strip())          (ATV_training.py:1060)
#   target:     (natural.format(input=x.strip()) + "\nA:") ; answer " " + y
#               demos: natural.format(input=x) + "\nA:" + " " + y + "\n\n"  (data_utils.py:250-257)
#   no natural template: "Q:" + " " + x + "\n" + "A:" ; answer " " + y (data_utils.py:90-137, 273)
#   tokens: the tokenizer's defaults (BOS where it adds one); answer ids = ids(prompt + answer)
#   beyond ids(prompt) (eval_utils.py:37-41).
NATURAL = ("Give the antonym of the word.\n\nQuestion: {x}", "{x}\nQuestion: What is the opposite?")


def _recipe_gen(target, texts, **kw):
    from tvlens.adaptive import recipe_config

    return make_generator(target, "native", texts=texts, config=recipe_config("reference", **kw))


def test_atv_prompt_strings_byte_for_byte():
    from tvlens.templates import ATV_QUERY_TEMPLATE, TEMPLATES, atv_template, atv_templates

    pairs, (qx, qy) = [("up", "down"), ("big", "small")], ("hot", "cold")
    instr = "Give the antonym of the word.\n\nQuestion: "
    t = atv_template(NATURAL[0])
    assert t.prompt((), qx) == instr + "hot\nA:" and t.format_answer(qy) == " cold"
    assert t.prompt(pairs, qx) == (instr + "up\nA: down\n\n" + instr + "big\nA: small\n\n"
                                   + instr + "hot\nA:")
    assert atv_template(NATURAL[1]).prompt((), qx) == "hot\nQuestion: What is the opposite?\nA:"
    # ATV's own file writes {input}: a template of natural_prompts_manual.json, verbatim
    ethics = atv_template("{input}\nQuestion: Is this wrong? Answer Yes or No.")
    assert ethics.prompt((), "I lied.") == "I lied.\nQuestion: Is this wrong? Answer Yes or No.\nA:"
    # a task without natural templates: the released fallback, "Q: x\nA:" then " y"
    assert atv_templates("no_such_task") == [TEMPLATES["atv"]]
    assert TEMPLATES["atv"].prompt(pairs, qx) == "Q: up\nA: down\n\nQ: big\nA: small\n\nQ: hot\nA:"
    assert [x.prompt((), "w") for x in atv_templates("antonym")] == [
        "Give the antonym of the word.\n\nQuestion: w\nA:", "w\nQuestion: What is the opposite of "
        "this word?\nA:", "Give the antonym of the word.\n\nQ: w\nA:"]
    assert ATV_QUERY_TEMPLATE.replace("{x}", "apple") == "Q: apple \n A: "
    # tokens: the target's tokenizer defaults (this word tokenizer prepends BOS, as Llama-3's
    # does); the generator reads its query with its own tokenizer's defaults
    ref = [instr + "hot\nA:", "Q: hot\nA:"]
    target = tvlens.tiny_model(texts=[r + " cold" for r in ref], n_layers=1, d_model=16, n_heads=2)
    tok = target.tokenizer
    for tmpl, text in zip((t, TEMPLATES["atv"]), ref):
        batch = tokenize(target, make_examples([(qx, qy)]), tmpl)
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and batch.input_ids[0].tolist() == ids
        assert batch.answer_ids[0] == tok(text + " cold")["input_ids"][len(ids):]
    gen = _recipe_gen(target, ["hot"])
    assert gen.queries(["hot"]) == ["Q: hot \n A: "]
    enc = gen.encoder.model.tokenizer
    from tvlens.adaptive.encoders import query_batch
    assert query_batch(enc, gen.queries(["hot"]), 99).input_ids[0].tolist() == enc("Q: hot \n A: ")["input_ids"]


def test_reference_recipe_settings_and_bad_input():
    from tvlens.adaptive import RECIPES, recipe_config
    from tvlens.methods import ATVConfig

    ref = recipe_config("reference")
    assert (ref.recipe, ref.scale, ref.init, ref.position, ref.hidden, ref.batch_size, ref.epochs,
            ref.n_per_task, ref.shuffle, ref.natural_templates, ref.lr, ref.weight_decay) == (
        "reference", 0.001, "default", "all", "final", 1, 15, 90, False, True, 5e-4, 1e-5)
    assert ref.query_template == "Q: {x} \n A: " and ref.target_template == "atv"
    assert recipe_config("fast") == ATVConfig() and set(RECIPES) == {"fast", "reference"}
    assert recipe_config("reference", epochs=2).epochs == 2
    with pytest.raises(TvlensError, match="unknown ATV recipe 'paper'; use one of fast, reference"):
        recipe_config("paper")
    for bad in (-1.0, 0.0, math.nan, math.inf):
        with pytest.raises(TvlensError, match="λ"):
            recipe_config("reference", scale=bad)


def test_reference_init_is_nn_linears_default(tiny, task):
    # make_generator seeds the RNG with cfg.seed right before the expansion is built, so
    # nn.Linear(d_gen, L·d) drawn from the same seed is the same bits (nothing computed)
    gen = _recipe_gen(tiny, [x for x, _ in task.pairs])
    d_gen, out = gen.encoder.d_gen, len(gen.layers) * int(tiny.cfg.d_model)
    torch.manual_seed(gen.config.seed)
    ref = torch.nn.Linear(d_gen, out)
    assert torch.equal(gen.expansion.up.weight, ref.weight) and torch.equal(gen.expansion.up.bias, ref.bias)
    bound = 1 / math.sqrt(d_gen)  # kaiming_uniform(a=√5) and the bias: U(±1/√fan_in)
    w = gen.expansion.up.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and w.std() > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(make_generator(tiny, "native", texts=["qaa"]).expansion.up.weight) == 0


def test_reference_hooks_add_at_every_position_under_teacher_forcing(tiny, task):
    from tvlens.forward import with_answers

    gen = _recipe_gen(tiny, [x for x, _ in task.pairs] + ["qaa qab"])
    assert gen.layers == tuple(range(int(tiny.cfg.n_layers))) and gen.scale == 0.001
    examples = make_examples(task.test[:3]) + [tvlens.Example("qaa qab", "red blue")]  # 2-token answer
    batch = tokenize(tiny, examples, "atv")
    tf = with_answers(batch, 0)
    v = gen.generate([e.x for e in examples]).detach()  # [B, L, d]
    store = {}

    def saver(key):
        def fn(act, hook=None):
            store[key] = act.detach().clone()
            return act
        return fn

    name = "blocks.0.hook_resid_post"  # the first edited layer: nothing upstream changed
    hooks = [(name, saver("pre")), *gen.hooks(tiny, batch), (name, saver("post"))]
    with torch.no_grad():
        tiny.run_with_hooks(tf.input_ids, attention_mask=tf.attention_mask, fwd_hooks=hooks)
    diff = store["post"] - store["pre"]
    P, A = batch.seq_len, tf.input_ids.shape[1] - batch.seq_len
    assert A == 2
    for b in range(len(examples)):
        real = [c for c in range(P) if batch.attention_mask[b, c]] + list(range(P, P + len(batch.answer_ids[b])))
        assert len(real) == int(batch.lengths[b]) + len(batch.answer_ids[b])
        # float32 add of a 1e-3-scaled vector to O(1) residuals: rounding ≤ ~1e-7
        torch.testing.assert_close(diff[b, real], (0.001 * v[b, 0]).expand(len(real), -1),
                                   atol=1e-6, rtol=0)
        pads = [c for c in range(P) if not batch.attention_mask[b, c]]
        assert torch.equal(diff[b, pads], torch.zeros_like(diff[b, pads]))  # untouched: bits


def _two_task_target():
    from tvlens.tasks.task import Task

    one = Task("one", tuple((f"qa{c}", col) for c, col in zip("abcdefgh", ("red", "blue") * 4)))
    two = Task("two", tuple((f"qb{c}", col) for c, col in zip("abcdefgh", ("gold", "pink") * 4)))
    texts = [NATURAL[0].replace("{x}", x) + "\nA: " + y + "\n\n" + NATURAL[1].replace("{x}", x)
             + "\nA: " + y + "\n\nQ: " + x + "\nA: " + y for t in (one, two) for x, y in t.pairs]
    target = tvlens.tiny_model(texts=texts, n_layers=2, d_model=32, n_heads=4, seed=0)
    return target, one, two


def test_template_averaged_loss_is_the_mean_of_per_template_losses():
    from tvlens.adaptive import training_loss
    from tvlens.templates import TEMPLATES, atv_template

    target, one, two = _two_task_target()
    gen = _recipe_gen(target, [x for t in (one, two) for x, _ in t.pairs], scale=0.5)
    gen.eval()
    pairs = [("one", x, y) for x, y in one.pairs[:3]] + [("two", x, y) for x, y in two.pairs[:2]]
    t1, t2, t3 = atv_template(NATURAL[0]), atv_template(NATURAL[1]), TEMPLATES["atv"]
    with torch.no_grad():
        got = training_loss(target, gen, pairs, {"one": [t1, t2], "two": [t3]})
        # the oracle: each template's per-pair NLL through the generator as the intervention
        def nll(tmpl, rows):
            b = tokenize(target, make_examples([p[1:] for p in rows]), tmpl)
            return answer_nll(target, b, gen.hooks(target, b))
        a, b, c = nll(t1, pairs[:3]), nll(t2, pairs[:3]), nll(t3, pairs[3:])
        want = torch.cat([(a + b) / 2, c]).mean()
        # one template each: the plain per-template loss
        solo = [training_loss(target, gen, pairs[:3], {"one": [t]}) for t in (t1, t2)]
    assert not torch.allclose(a, b)  # the templates differ, so the average means something
    # float32 means of O(1) NLLs: ≤ 1e-6 relative
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(training_loss(target, gen, pairs[:3], {"one": [t1, t2]}),
                               (solo[0] + solo[1]) / 2, rtol=1e-5, atol=0)


@pytest.mark.parametrize("recipe", ["fast", "reference"])
def test_tiny_training_lowers_the_loss(recipe, tmp_path):
    from tvlens.adaptive import recipe_config, target_templates, training_loss

    target, one, two = _two_task_target()
    # the recipe's rules; a shorter schedule and a larger lr, so a tiny run moves
    cfg = recipe_config(recipe, epochs=8, lr=5e-2, n_per_task=6)
    gen = make_generator(target, "native", texts=[x for t in (one, two) for x, _ in t.pairs], config=cfg)
    natural = {"one": list(NATURAL), "two": list(NATURAL)} if recipe == "reference" else None
    tasks = [one, two]
    per_task = target_templates(tasks, cfg, natural)
    assert [len(v) for v in per_task.values()] == ([2, 2] if recipe == "reference" else [1, 1])
    data = training_pairs(tasks, 6)

    def loss():
        gen.eval()
        with torch.no_grad():
            return float(training_loss(target, gen, data, per_task))

    before = loss()
    hist = train_generator(target, gen, tasks, templates=natural, checkpoint_dir=tmp_path,
                           progress=False)
    after = loss()
    assert after < 0.9 * before, (before, after)
    assert hist["steps"] == 8 * (8 if recipe == "reference" else 1)  # 8 train pairs: batch 1 vs 16
    assert hist["recipe"] == recipe and gen.config.recipe == recipe
    from tvlens.io import load_tensors
    _, meta = load_tensors(tmp_path / "checkpoint.safetensors", key="tvlens_atv_checkpoint")
    assert meta["config"]["settings"]["recipe"] == recipe and meta["history"]["recipe"] == recipe


def test_reference_order_is_task_after_task(monkeypatch):
    import tvlens.adaptive.training as training

    target, one, two = _two_task_target()
    gen = _recipe_gen(target, [x for t in (one, two) for x, _ in t.pairs], epochs=2, n_per_task=3)
    seen = []

    def recording(target, generator, pairs, templates):
        seen.append([p[:2] for p in pairs])
        return generator.generate([x for _, x, _ in pairs]).sum() * 0.0

    monkeypatch.setattr(training, "training_loss", recording)
    train_generator(target, gen, [one, two], progress=False)
    order = [[(n, x)] for n, x, _ in training_pairs([one, two], 3)]
    assert seen == order * 2  # batch 1, no shuffling, the same order each epoch
