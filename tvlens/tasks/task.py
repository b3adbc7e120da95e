"""Tasks: named lists of (input, output) string pairs with a seeded split.

A :class:`Task` is the unit every method works on: demonstrations come from its train
split, layers are chosen on dev, numbers are reported on test. Files in the two public
formats load by path (:func:`load_task_file`):

- a JSON list of ``{"input": ..., "output": ...}`` objects (the function-vector datasets);
- a JSON object ``{input: output, ...}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tvlens.errors import TvlensError

Pair = tuple[str, str]
Split = Literal["train", "dev", "test", "all"]
DEFAULT_FRACTIONS = (0.5, 0.2, 0.3)  # train (demonstrations, vector fitting), dev, test


@dataclass(frozen=True)
class Task:
    """A named in-context task.

    Attributes:
        name: short identifier (a built-in name or the file's stem).
        pairs: the (input, output) pairs, in file order.
        description, category: free text for listings.
        seed: seeds the split; the same seed gives the same split everywhere.
        fractions: train / dev / test fractions (they sum to 1).
    """

    name: str
    pairs: tuple[Pair, ...]
    description: str = ""
    category: str = "user"
    seed: int = 0
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    _splits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate_pairs(self.pairs, source=f"task {self.name!r}")
        if abs(sum(self.fractions) - 1.0) > 1e-9 or min(self.fractions) < 0:
            raise TvlensError(f"split fractions {self.fractions} must be >= 0 and sum to 1")

    def __len__(self) -> int:
        return len(self.pairs)

    def split(self, which: Split) -> list[Pair]:
        """The pairs of one split: a seeded shuffle cut by ``fractions``; ``"all"`` is every pair."""
        if which == "all":
            return list(self.pairs)
        if which not in ("train", "dev", "test"):
            raise TvlensError(f"unknown split {which!r}; use train, dev, test or all")
        if not self._splits:
            order = list(self.pairs)
            random.Random(self.seed).shuffle(order)
            n_train = int(round(self.fractions[0] * len(order)))
            n_dev = int(round(self.fractions[1] * len(order)))
            self._splits.update(
                train=order[:n_train],
                dev=order[n_train : n_train + n_dev],
                test=order[n_train + n_dev :],
            )
        return list(self._splits[which])

    @property
    def train(self) -> list[Pair]:
        return self.split("train")

    @property
    def dev(self) -> list[Pair]:
        return self.split("dev")

    @property
    def test(self) -> list[Pair]:
        return self.split("test")

    def with_seed(self, seed: int) -> Task:
        return Task(self.name, self.pairs, self.description, self.category, seed, self.fractions)


def validate_pairs(pairs, *, source: str) -> None:
    """Refuse empty tasks and non-string or empty inputs/outputs, naming the bad item."""
    if len(pairs) == 0:
        raise TvlensError(f"{source} has no (input, output) pairs; give at least a few")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TvlensError(f"{source}: item {i} is {pair!r}, expected an (input, output) pair")
        x, y = pair
        if not isinstance(x, str) or not isinstance(y, str):
            raise TvlensError(
                f"{source}: item {i} has non-string input or output ({x!r}, {y!r}); "
                "both must be strings"
            )
        if not x.strip() or not y.strip():
            raise TvlensError(f"{source}: item {i} has an empty input or output ({x!r}, {y!r})")


def load_task_file(path: str | Path, *, name: str | None = None) -> Task:
    """Load a task from a JSON file in either public format (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TvlensError(f"task file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TvlensError(f"task file {str(path)!r} is not valid JSON: {err}") from None
    source = f"task file {str(path)!r}"
    description, category = "", "user"
    if isinstance(data, dict) and "pairs" in data:  # tvlens's own built-in format
        description = str(data.get("description", ""))
        category = str(data.get("category", "user"))
        raw = data["pairs"]
        if not isinstance(raw, list):
            raise TvlensError(f"{source}: 'pairs' must be a list of [input, output]")
        pairs = tuple(tuple(p) if isinstance(p, list) else p for p in raw)
    elif isinstance(data, list):
        pairs = []
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "input" not in item or "output" not in item:
                raise TvlensError(
                    f"{source}: item {i} is {str(item)[:80]!r}; expected an object with "
                    "'input' and 'output' keys"
                )
            pairs.append((item["input"], item["output"]))
        pairs = tuple(pairs)
    elif isinstance(data, dict):
        pairs = tuple(data.items())
    else:
        raise TvlensError(
            f"{source} holds a JSON {type(data).__name__}; expected a list of "
            '{"input": ..., "output": ...} objects or an {input: output} object'
        )
    validate_pairs(pairs, source=source)
    return Task(name or path.stem, pairs, description, category)
