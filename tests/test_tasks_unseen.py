"""The classification suite of ATV's unseen-task test (``tvlens.tasks.builtin``): unseen
tasks are new tasks whose answer format occurs in training, with inputs disjoint from
every training input, checked on the shipped data."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from tvlens import TvlensError, load_task
from tvlens.adaptive import check_unseen, input_overlap
from tvlens.tasks import Task, builtin_task_names
from tvlens.tasks.builtin import ATV_TRAIN_SUITE, ATV_UNSEEN_SUITE

# The module docstring's table: each unseen task and the training task whose labels it uses.
FORMAT_DONOR = {"number_sign": "sentiment", "city_language": "language_id",
                "french_category": "category_of"}
# Balance bound: the most frequent label at most 1.5x the least frequent, in every task that
# carries an answer format (category_of, the tightest, has 18 animals vs 12 colors).
MAX_LABEL_RATIO = 1.5


def _suite():
    return [load_task(t) for t in ATV_TRAIN_SUITE], [load_task(t) for t in ATV_UNSEEN_SUITE]


def _labels(task: Task) -> set[str]:
    return {y for _, y in task.pairs}


def test_suite_is_registered_and_shaped():
    names = builtin_task_names()
    assert set(ATV_TRAIN_SUITE) | set(ATV_UNSEEN_SUITE) <= set(names)
    assert len(ATV_TRAIN_SUITE) == 6 and len(ATV_UNSEEN_SUITE) == 3
    assert set(FORMAT_DONOR) == set(ATV_UNSEEN_SUITE)
    for t in (*_suite()[0], *_suite()[1]):
        assert 40 <= len(t) <= 400, t.name  # small: a few hundred items at most
        assert len({x for x, _ in t.pairs}) == len(t), t.name  # no repeated input


def test_every_unseen_task_passes_check_unseen_on_the_shipped_data():
    train, unseen = _suite()
    check_unseen(train, unseen)  # raises on any shared input
    seen = {x for t in train for x, _ in t.pairs}
    for t in unseen:
        assert input_overlap([x for x, _ in t.pairs], seen) == 0.0, t.name
    # the check can fail: an "unseen" task holding one training input is refused
    leaky = Task("leaky", unseen[0].pairs + ((train[2].pairs[0][0], "positive"),))
    with pytest.raises(TvlensError, match="not unseen"):
        check_unseen(train, [leaky])


def test_every_unseen_label_set_occurs_in_a_training_task():
    train, unseen = _suite()
    by_name = {t.name: t for t in train}
    for t in unseen:
        labels = _labels(t)
        assert len(labels) >= 2, t.name  # a classification task, not a mapping
        assert labels <= _labels(by_name[FORMAT_DONOR[t.name]]), t.name
        assert any(labels <= _labels(d) for d in train)
        # the format is the donor's: its labels recur (a label set, not one-off outputs)
        donor = by_name[FORMAT_DONOR[t.name]]
        assert len(donor) >= 5 * len(_labels(donor)), donor.name


@pytest.mark.parametrize("name", [*ATV_UNSEEN_SUITE, *FORMAT_DONOR.values()])
def test_labels_are_balanced(name):
    task = load_task(name)
    counts = collections.Counter(y for _, y in task.pairs)
    assert max(counts.values()) <= MAX_LABEL_RATIO * min(counts.values()), counts
    # every label can be demonstrated: it occurs in the train split the demos come from
    assert {y for _, y in task.train} == set(counts), name


def test_generated_suite_tasks_are_deterministic():
    from tvlens.tasks import builtin

    before = {n: load_task(n).pairs for n in ("number_sign", "language_id")}
    builtin._builtin.cache_clear()
    assert {n: load_task(n).pairs for n in before} == before
    sign = dict(before["number_sign"])
    assert all((int(x) > 0) == (y == "positive") for x, y in sign.items())
    assert load_task("number_sign").category == "classification"


def test_loading_needs_no_shared_data(tmp_path):
    """A fresh interpreter, outside the repository, that refuses to open anything under a
    ``shared`` folder or the function-vector data, loads every suite task."""
    code = f"""
import sys
def guard(event, args):
    if event == "open" and isinstance(args[0], str) and (
            "/shared/" in args[0] or "function_vectors" in args[0]):
        raise RuntimeError("opened " + args[0])
sys.addaudithook(guard)
import json, tvlens
from tvlens.tasks.builtin import ATV_TRAIN_SUITE, ATV_UNSEEN_SUITE
print(json.dumps({{n: len(tvlens.load_task(n)) for n in ATV_TRAIN_SUITE + ATV_UNSEEN_SUITE}}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes == {n: len(load_task(n)) for n in (*ATV_TRAIN_SUITE, *ATV_UNSEEN_SUITE)}


def test_copied_data_carries_its_licence():
    from importlib import resources

    path = resources.files("tvlens.tasks") / "data" / "sentiment.json"
    data = json.loads(path.read_text("utf-8"))
    assert data["license"].startswith("MIT License") and "Eric Todd" in data["license"]
    assert "function_vectors" in data["source"]


@pytest.mark.slow
def test_label_first_tokens_are_distinct_on_smollm2(smol):
    """Scoring reads the answer's first token (with the template's leading space): in every
    suite task with a label set, each label has one first token and no two labels share it."""
    from tvlens.methods import ATVConfig
    from tvlens.prompts import make_examples, tokenize

    for name in (*ATV_UNSEEN_SUITE, *FORMAT_DONOR.values()):
        task = load_task(name)
        batch = tokenize(smol, make_examples(task.pairs), ATVConfig().target_template)
        first: dict[str, set[int]] = collections.defaultdict(set)
        for ex, ids in zip(batch.examples, batch.answer_ids):
            first[ex.y].add(ids[0])
        assert all(len(v) == 1 for v in first.values()), (name, dict(first))
        assert len({next(iter(v)) for v in first.values()}) == len(first), (name, dict(first))
