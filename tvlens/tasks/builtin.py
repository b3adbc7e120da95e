"""The built-in tasks: word lists shipped in ``tasks/data``, algorithmic tasks generated
from a word pool, and a classification suite for ATV's unseen-task test.

All were written for tvlens except ``sentiment``, a 200-item sample of Todd et al.'s
public function-vector data (MIT; the file carries its source and licence). Generated
tasks are deterministic: the same pool and seed give the same pairs on every machine.

The classification suite (:data:`ATV_TRAIN_SUITE`, :data:`ATV_UNSEEN_SUITE`) follows ATV's
unseen-task test (Kang et al. 2025: the unseen tasks are new tasks whose *answer format*
occurs in training). Each unseen task's set of labels is the label set, or a subset, of
one training task, and no unseen input is a training input (``check_unseen`` passes):

=================  ==============================  ===================================
unseen task        answer format                   from training task
=================  ==============================  ===================================
``number_sign``    positive / negative             ``sentiment`` (movie reviews)
``city_language``  English / French / Spanish      ``language_id`` (words)
``french_category`` animal, fruit, color, ...      ``category_of`` (English words)
=================  ==============================  ===================================

Yes/No, True/False and letter (A-D) formats were tried and left out: with 5-shot ICL
SmolLM2-135M stays at the majority-label rate on them (e.g. "is this word plural?" 0.54
vs 0.46, "word, word: same?" 0.56 vs 0.50, "which is a number? (A)..(D)" 0.31 vs 0.19;
ag_news 0.27 vs 0.23), so an unseen test on them could show nothing.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from functools import cache
from importlib import resources

from tvlens.errors import TvlensError
from tvlens.tasks.task import Task, load_task_file

_LISTED = (
    "antonym",
    "present_past",
    "singular_plural",
    "country_capital",
    "country_language",
    "category_of",
    "english_french",
    "english_spanish",
)


def _data_path(stem: str):
    return resources.files("tvlens.tasks") / "data" / f"{stem}.json"


@cache
def _word_pool() -> tuple[str, ...]:
    data = json.loads(_data_path("word_pool").read_text(encoding="utf-8"))
    return tuple(data["words"])


def _list_items(n_items: int, pick: int, seed: int) -> list[tuple[str, str]]:
    """Comma-separated lists of ``n_items`` distinct pool words; output = item ``pick``."""
    rng = random.Random(seed)
    pool = list(_word_pool())
    pairs, seen = [], set()
    while len(pairs) < 120:
        words = rng.sample(pool, n_items)
        key = ", ".join(words)
        if key not in seen:
            seen.add(key)
            pairs.append((key, words[pick]))
    return pairs


_GENERATED: dict[str, tuple[str, Callable[[], list[tuple[str, str]]]]] = {
    "capitalize": (
        "word -> the word with its first letter capitalised",
        lambda: [(w, w.capitalize()) for w in _word_pool()],
    ),
    "uppercase": (
        "word -> the word in capital letters",
        lambda: [(w, w.upper()) for w in _word_pool()],
    ),
    "first_letter": (
        "word -> its first letter",
        lambda: [(w, w[0]) for w in _word_pool()],
    ),
    "next_letter": (
        "letter -> the next letter of the alphabet (lower and upper case)",
        lambda: [(a, b) for s in (string.ascii_lowercase, string.ascii_uppercase)
                 for a, b in zip(s, s[1:])],
    ),
    "first_item": (
        "a list of three words -> its first word",
        lambda: _list_items(3, 0, seed=1),
    ),
    "last_item": (
        "a list of three words -> its last word",
        lambda: _list_items(3, -1, seed=2),
    ),
}


# ----- the classification suite (ATV's unseen-task test; see the module docstring) -----
_SUITE_FILES = ("sentiment", "french_category", "city_language")


def _number_sign(seed: int = 3) -> list[tuple[str, str]]:
    """100 integers in 1..999 -> "positive" and 100 in -999..-1 -> "negative", written
    with their sign (``"+512"`` / ``"-512"``: the explicit ``+`` lifts SmolLM2's 5-shot ICL
    from 0.62 to 0.87 on 60 test items), drawn and shuffled with ``random.Random(seed)``."""
    rng = random.Random(seed)
    pairs = [(f"+{v}", "positive") for v in rng.sample(range(1, 1000), 100)]
    pairs += [(str(-v), "negative") for v in rng.sample(range(1, 1000), 100)]
    rng.shuffle(pairs)
    return pairs


def _language_id(seed: int = 13) -> list[tuple[str, str]]:
    """A word -> its language (English, French or Spanish), from the translation lists:
    for every English word of both ``english_french`` and ``english_spanish`` whose three
    forms differ, the three (form, language) items. Dropped: strings that occur twice
    (ambiguous) and strings that are inputs of a file task of the unseen suite (so
    ``french_category``'s French words stay unseen). Shuffled with ``random.Random(seed)``."""
    fr = dict(load_task_file(_data_path("english_french")).pairs)
    es = dict(load_task_file(_data_path("english_spanish")).pairs)
    items = []
    for w in fr:
        if w in es and len({w, fr[w], es[w]}) == 3:
            items += [(w, "English"), (fr[w], "French"), (es[w], "Spanish")]
    held_out = {x for stem in _SUITE_FILES if stem != "sentiment"
                for x, _ in load_task_file(_data_path(stem)).pairs}
    count: dict[str, int] = {}
    for x, _ in items:
        count[x] = count.get(x, 0) + 1
    pairs = [(x, y) for x, y in items if count[x] == 1 and x not in held_out]
    random.Random(seed).shuffle(pairs)
    return pairs


_SUITE_GENERATED: dict[str, tuple[str, Callable[[], list[tuple[str, str]]]]] = {
    "number_sign": ("a signed integer (+512, -37) -> its sign (positive or negative)",
                    _number_sign),
    "language_id": ("an English, French or Spanish word -> its language", _language_id),
}

#: Training tasks of the ATV unseen-task test: three classification tasks that carry the
#: unseen tasks' answer formats, and three mapping tasks.
ATV_TRAIN_SUITE = ("sentiment", "category_of", "language_id", "antonym", "present_past",
                   "country_capital")
#: Unseen tasks: new tasks whose labels are a training task's (the module docstring's table).
ATV_UNSEEN_SUITE = ("number_sign", "city_language", "french_category")


def builtin_task_names() -> list[str]:
    """Names of every built-in task: algorithmic, listed, then the classification suite
    (category ``"classification"``; ``category_of`` is listed)."""
    return list(_GENERATED) + list(_LISTED) + list(_SUITE_GENERATED) + list(_SUITE_FILES)


@cache
def _builtin(name: str) -> Task:
    if name in _GENERATED:
        description, make = _GENERATED[name]
        return Task(name, tuple(make()), description, "algorithmic")
    if name in _SUITE_GENERATED:
        description, make = _SUITE_GENERATED[name]
        return Task(name, tuple(make()), description, "classification")
    task = load_task_file(_data_path(name), name=name)
    return task


def builtin_task(name: str) -> Task:
    """A built-in task by name (``tvlens tasks`` lists them)."""
    if name not in builtin_task_names():
        raise TvlensError(
            f"unknown task {name!r}: use a built-in ({', '.join(builtin_task_names())}) "
            "or the path of a JSON task file"
        )
    return _builtin(name)


def load_task(name_or_path: str, *, seed: int = 0) -> Task:
    """A built-in task by name, or a task file by path; ``seed`` sets its split."""
    if name_or_path in builtin_task_names():
        task = builtin_task(name_or_path)
    elif name_or_path.endswith(".json") or "/" in name_or_path:
        task = load_task_file(name_or_path)
    else:
        builtin_task(name_or_path)  # raises the unknown-task message
        raise AssertionError("unreachable")
    return task if seed == task.seed else task.with_seed(seed)
