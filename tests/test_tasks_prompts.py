"""Tasks (built-ins, files, splits) and prompts (templates, demos, positions, answers)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tvlens import Template, TvlensError, load_task, load_task_file, make_examples, tokenize
from tvlens.evaluation import evaluate
from tvlens.stats import bootstrap_ci
from tvlens.tasks import builtin_task_names


def test_builtins_cover_the_four_categories():
    names = builtin_task_names()
    assert len(names) >= 12
    cats = {load_task(n).category for n in names}
    assert {"algorithmic", "linguistic", "knowledge", "translation"} <= cats
    for n in names:
        t = load_task(n)
        assert len(t) >= 40 and len({x for x, _ in t.pairs}) == len(t)


def test_split_is_seeded_disjoint_and_complete():
    t = load_task("antonym")
    parts = t.train + t.dev + t.test
    assert sorted(parts) == sorted(t.pairs)
    assert t.train == load_task("antonym").train
    assert t.train != load_task("antonym", seed=1).train


def test_both_public_file_formats(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"input": "x1", "output": "y1"}, {"input": "x2", "output": "y2"}]))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"x1": "y1", "x2": "y2"}))
    assert load_task_file(a).pairs == load_task_file(b).pairs == (("x1", "y1"), ("x2", "y2"))
    assert load_task(str(a)).name == "a"


@pytest.mark.parametrize("content, message", [
    ("[]", "no \\(input, output\\) pairs"),
    ("{", "not valid JSON"),
    ('[{"input": 1, "output": "y"}]', "non-string"),
    ('[{"input": "x"}]', "'input' and 'output'"),
    ('[{"input": " ", "output": "y"}]', "empty input"),
    ('"just a string"', "expected a list"),
])
def test_malformed_task_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TvlensError, match=message):
        load_task_file(path)


def test_unknown_task_name():
    with pytest.raises(TvlensError, match="unknown task"):
        load_task("no_such_task")


def test_templates_move_the_space_into_the_answer():
    t = Template("{x} -> {y}\n")
    assert t.format_query("hot") == "hot ->" and t.format_answer("cold") == " cold"
    qa = Template("Q: {x}\nA: {y}\n\n")
    assert qa.prompt([("a", "b")], "c") == "Q: a\nA: b\n\nQ: c\nA:"
    with pytest.raises(TvlensError):
        Template("{y} then {x}")


def test_shuffled_labels_keep_inputs_and_permute_outputs(task):
    plain = make_examples(task.test[:5], task.train, shots=4, seed=1)
    shuffled = make_examples(task.test[:5], task.train, shots=4, seed=1, shuffle_labels=True)
    for p, s in zip(plain, shuffled):
        assert [x for x, _ in p.demos] == [x for x, _ in s.demos]
        assert sorted(y for _, y in p.demos) == sorted(y for _, y in s.demos)
        assert (p.x, p.y) == (s.x, s.y)
    assert any([y for _, y in p.demos] != [y for _, y in s.demos] for p, s in zip(plain, shuffled))


def test_demos_never_contain_the_query(task):
    for ex in make_examples(task.train[:10], task.train, shots=5, seed=0):
        assert ex.x not in [x for x, _ in ex.demos]


def test_too_many_shots_is_refused(task):
    with pytest.raises(TvlensError, match="shots need at least"):
        make_examples(task.test[:2], task.train[:3], shots=5)


def test_positions_resolve_through_the_mask(tiny, task):
    examples = make_examples(task.test[:3], task.train, shots=0) + make_examples(
        task.test[3:4], task.train, shots=3)
    batch = tokenize(tiny, examples)
    n = batch.lengths.tolist()
    T = batch.seq_len
    assert batch.position_index("last").tolist() == [T - 1] * 4
    assert batch.position_index(0).tolist() == [T - k for k in n]
    assert batch.position_index(-2).tolist() == [T - 2] * 4
    # "separator" is the " ->" token right after the query's input
    sep = batch.position_index("separator")
    for row, col in enumerate(sep.tolist()):
        assert tiny.tokenizer.decode([int(batch.input_ids[row, col])]) == " ->"
    with pytest.raises(TvlensError, match="outside prompt 0"):
        batch.position_index(n[0])


def test_answers_keep_their_leading_space(tiny, task):
    batch = tokenize(tiny, make_examples(task.test[:3], task.train, shots=1))
    for ids, ex in zip(batch.answer_ids, batch.examples):
        assert tiny.tokenizer.decode(ids) == " " + ex.y


def test_evaluate_on_a_tiny_model(tiny, task):
    r = evaluate(tiny, task, shots=2, n=10, exact_match=True, logprob=True, batch_size=3)
    assert r.n == 10 and len(r.records) == 10
    assert r.accuracy == pytest.approx(r.records["correct"].mean())
    # the CI is the seeded bootstrap of these very records (bootstrap_ci itself is held
    # to the Wilson interval in test_scoring.py)
    correct = r.records["correct"].to_numpy(dtype=float)
    assert (r.ci_low, r.ci_high) == bootstrap_ci(correct, seed=0)
    # single-token answers: exact match by greedy decoding is first-token accuracy
    assert (r.records["exact_match"] == r.records["correct"]).all()
    # ... and the mean answer log-prob (teacher forced, logits_to_keep=2 on a longer
    # sequence) is the first-token one (logits_to_keep=1): float32 log-probs of magnitude
    # ~3 from two forwards of different shapes, 1e-5 is ~30 eps of them
    np.testing.assert_allclose(r.records["mean_logprob"], r.records["first_token_logprob"],
                               rtol=1e-5, atol=1e-5)


def test_evaluate_batch_size_does_not_change_results(tiny, task):
    a = evaluate(tiny, task, shots=3, n=9, batch_size=2)
    b = evaluate(tiny, task, shots=3, n=9, batch_size=9)
    assert a.records["prediction"].tolist() == b.records["prediction"].tolist()
    assert (a.records["first_token_logprob"] - b.records["first_token_logprob"]).abs().max() < 1e-4


def _hendel_reference(demos, x):
    """Hendel et al.'s rules, written out from their released code: mapping tasks prefix
    input and output with a space (mapping_task.py), a demo is "example:{x}->{y}", demos
    are joined by "\\n" and the query is "example:{x}->" (few_shot_format.py)."""
    demos = [(" " + a, " " + b) for a, b in demos]
    return "\n".join([f"example:{a}->{b}" for a, b in demos] + [f"example: {x}->"])


def test_hendel_and_fv_formats_are_the_reference_strings_byte_for_byte():
    from tvlens.prompts import get_template

    demos, x = [("apple", "Apple"), ("pear", "Pear")], "plum"
    hendel = get_template("hendel")
    assert hendel.prompt(demos, x) == _hendel_reference(demos, x)
    assert hendel.prompt(demos, x) == "example: apple-> Apple\nexample: pear-> Pear\nexample: plum->"
    assert hendel.format_answer("Plum") == " Plum"  # the answer carries the leading space
    assert hendel.prompt([], x) == _hendel_reference([], x)  # zero-shot: the query alone
    # Todd et al.: "Q: {x}\nA: {y}\n\n" per demo, query "Q: {x}\nA:", answer " {y}"
    fv = get_template("fv")
    assert fv.prompt(demos, x) == "Q: apple\nA: Apple\n\nQ: pear\nA: Pear\n\nQ: plum\nA:"
    assert fv.format_answer("Plum") == " Plum"
