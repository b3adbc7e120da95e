"""The built-in tasks: word lists shipped in ``tasks/data`` and algorithmic tasks
generated from a word pool.

All were written for tvlens (none is copied from a published dataset). Generated tasks
are deterministic: the same pool and seed give the same pairs on every machine.
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


def builtin_task_names() -> list[str]:
    """Names of every built-in task, algorithmic first."""
    return list(_GENERATED) + list(_LISTED)


@cache
def _builtin(name: str) -> Task:
    if name in _GENERATED:
        description, make = _GENERATED[name]
        return Task(name, tuple(make()), description, "algorithmic")
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
