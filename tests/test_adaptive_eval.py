"""The released ATV evaluation protocol (issue 13): each natural template under each of
three answer cues, the generator reading the target prompt itself, the vector at the last
token (``ATV_evaluate.py:269, 518-555, 1020``)."""

from __future__ import annotations

import json

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.adaptive import make_generator
from tvlens.prompts import PromptSet
from tvlens.templates import ATV_ANSWER_CUES, TEMPLATES, atv_eval_templates, atv_template

NATURAL = ("Give the antonym of the word.\n\nQuestion: {x}", "{x}\nQuestion: What is the opposite?")


def test_eval_templates_are_the_released_ones_cue_by_cue():
    ts = atv_eval_templates("antonym", NATURAL)
    assert ATV_ANSWER_CUES == ("Answer:", "The answer is", "A:")
    # ATV_evaluate.py:1020: [template + "\n" + cue for cue in cues for template in naturals]
    assert [t.prompt((), "hot") for t in ts] == [
        "Give the antonym of the word.\n\nQuestion: hot\nAnswer:", "hot\nQuestion: What is the opposite?\nAnswer:",
        "Give the antonym of the word.\n\nQuestion: hot\nThe answer is",
        "hot\nQuestion: What is the opposite?\nThe answer is",
        "Give the antonym of the word.\n\nQuestion: hot\nA:", "hot\nQuestion: What is the opposite?\nA:"]
    assert {t.format_answer("cold") for t in ts} == {" cold"}
    assert ts[4:] == [atv_template(n) for n in NATURAL]  # the "A:" cue is training's template
    assert len(atv_eval_templates("antonym")) == 9  # the built-in task's three natural templates
    assert atv_eval_templates("no_such_task") == [TEMPLATES["atv"]]  # the released fallback
    with pytest.raises(TvlensError, match="unknown ATV answer cue 'Ans:'"):
        atv_template(NATURAL[0], cue="Ans:")


def test_every_atv_suite_task_has_natural_templates():
    # else the reference recipe trains it on the single fallback template and the reference
    # protocol evaluates it without the answer cues: both would silently not be ATV's
    from tvlens.tasks.builtin import ATV_TRAIN_SUITE, ATV_UNSEEN_SUITE

    for name in ATV_TRAIN_SUITE + ATV_UNSEEN_SUITE:
        assert len(atv_eval_templates(name)) == 9, name


def test_generator_reading_prompts_writes_the_prompts_own_vector_at_the_last_token(tiny, task):
    gen = make_generator(tiny, "native", texts=[x for x, _ in task.pairs] + ["tiny -> task"], init="default")
    ps = PromptSet.build(tiny, task, n=6, template="arrow")
    view = gen.reading_prompts()
    assert view.last_token_only and not gen.reading_prompts(position="all").last_token_only
    with torch.no_grad():
        v = gen.generate_texts(list(ps.batch.prompts))
        assert not torch.allclose(v, gen.generate([e.x for e in ps.batch.examples]))  # another input
        tv = TaskVector(v.unsqueeze(2) * 50, gen.layers, ("last",), gen.target)  # λ = 50 below
        got = tvlens.evaluate(tiny, task, vector=gen.reading_prompts(scale=50.0), prompts=ps, batch_size=4)
        want = tvlens.evaluate(tiny, task, vector=tv, prompts=ps, batch_size=4)
    assert got.records["prediction"].tolist() == want.records["prediction"].tolist()
    clean = tvlens.evaluate(tiny, task, prompts=ps)
    assert got.records["first_token_logprob"].tolist() != clean.records["first_token_logprob"].tolist()
    with pytest.raises(TvlensError, match="unknown position 'first'"):
        gen.reading_prompts(position="first")


@pytest.mark.slow
def test_cli_evaluate_with_the_reference_protocol(smol, tmp_path, capsys):
    from tvlens.cli import main

    out = tmp_path / "gen"
    assert main(["adaptive", "train", "--tasks", "antonym", "--out", str(out), "--layers", "10",
                 "--max-steps", "1", "--n-per-task", "4", "--batch-size", "4", "--json",
                 "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["adaptive", "evaluate", "--generator-dir", str(out), "--task", "antonym", "--n", "4",
                 "--protocol", "reference", "--icl-shots", "1", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["protocol"] == "reference" and res["template"] == "9 templates" and res["n"] == 36
    assert len(res["per_template"]["atv"]) == 9
    assert res["per_template"]["atv"][0]["template"].endswith("\nAnswer: {y}\n\n")
    assert main(["adaptive", "evaluate", "--generator-dir", str(out), "--task", "antonym",
                 "--protocol", "reference", "--template", "fv", "--device", "cpu"]) == 2
    assert "--protocol reference writes its own prompts" in capsys.readouterr().err
