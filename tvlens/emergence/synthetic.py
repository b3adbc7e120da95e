"""Synthetic in-context tasks on a small integer vocabulary, in token ids (no tokenizer).

Values are the ids ``0..V-1``; four more ids are reserved (:class:`Vocab`)::

    BOS = V,  ARROW ("->") = V + 1,  COMMA (",") = V + 2,  PAD = V + 3     d_vocab = V + 4

A task is a map ``f: {0..V-1} → {0..V-1}`` drawn from a family:

=============  ==========================================  ===========================
family         map                                         parameter
=============  ==========================================  ===========================
``offset``     ``y = (x + k) mod V``                       ``(k,)``, ``k ∈ 1..V-1``
``affine``     ``y = (a·x + b) mod V``, ``gcd(a, V) = 1``  ``(a, b)``, not ``(1, 0)``
``permutation``  ``y = π(x)``, ``π`` a seeded random permutation  ``π`` as a V-tuple
=============  ==========================================  ===========================

An ICL sequence of K pairs is ``BOS x1 -> y1 , x2 -> y2 , … , xK -> yK`` (4K tokens):
pair ``i`` (0-based) has ``x`` at ``4i+1``, ``->`` at ``4i+2`` and ``y`` at ``4i+3``, so
``y_i`` is predicted from the arrow at ``4i+2``. A zero-shot query is ``BOS x ->``.
:meth:`Vocab.render` reads ids back as text (``"<bos> 3 -> 5 , 2 ->"``), and
:func:`token_prompt_batch` makes token-level prompts that end at an arrow into the
package's :class:`tvlens.prompts.PromptBatch` (through ``PromptSet.from_tokens``).
:func:`task_split` holds out some parameters of each family (out-of-distribution tasks);
longer contexts (more pairs than in training) are the other OOD axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.prompts import PromptBatch, PromptSet

FAMILIES = ("offset", "affine", "permutation")


@dataclass(frozen=True)
class Vocab:
    """Token ids for ``n_values`` values and the four reserved symbols."""

    n_values: int

    @property
    def bos(self) -> int:
        return self.n_values

    @property
    def arrow(self) -> int:
        return self.n_values + 1

    @property
    def comma(self) -> int:
        return self.n_values + 2

    @property
    def pad(self) -> int:
        return self.n_values + 3

    @property
    def d_vocab(self) -> int:
        return self.n_values + 4

    def token(self, i: int) -> str:
        """The text of id ``i``: the value's digits, ``<bos>``, ``->``, ``,`` or ``<pad>``."""
        i = int(i)
        if 0 <= i < self.n_values:
            return str(i)
        names = {self.bos: "<bos>", self.arrow: "->", self.comma: ",", self.pad: "<pad>"}
        if i not in names:
            raise TvlensError(f"id {i} is outside the synthetic vocabulary (0..{self.d_vocab - 1})")
        return names[i]

    def render(self, ids: Sequence[int]) -> str:
        """The vocabulary's decode to text: ids joined by spaces, e.g. ``"<bos> 3 -> 5 , 2 ->"``."""
        return " ".join(self.token(i) for i in ids)


@dataclass(frozen=True)
class SyntheticTask:
    """One map of a family: ``family``, its ``param`` and the value count ``n_values``."""

    family: str
    param: tuple[int, ...]
    n_values: int

    def apply(self, x: int) -> int:
        V = self.n_values
        if self.family == "offset":
            return (x + self.param[0]) % V
        if self.family == "affine":
            a, b = self.param
            return (a * x + b) % V
        return self.param[x]

    def table(self) -> list[int]:
        """``[f(0), …, f(V-1)]``."""
        return [self.apply(x) for x in range(self.n_values)]


def family_parameters(family: str, n_values: int) -> list[tuple[int, ...]]:
    """Every parameter of a closed-form family (not ``permutation``: it is sampled)."""
    V = n_values
    if family == "offset":
        return [(k,) for k in range(1, V)]
    if family == "affine":
        return [(a, b) for a in range(1, V) if math.gcd(a, V) == 1 for b in range(V)
                if (a, b) != (1, 0)]
    raise TvlensError(f"family {family!r} has no closed parameter list; use one of {FAMILIES}")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise TvlensError(f"unknown task family {family!r}; use one of {FAMILIES}")


def task_split(
    families: Sequence[str],
    n_values: int,
    *,
    n_heldout: int = 2,
    n_permutations: int = 8,
    seed: int = 0,
) -> tuple[list[SyntheticTask], list[SyntheticTask]]:
    """Seeded (train tasks, held-out tasks) over ``families``.

    Closed-form families: ``n_heldout`` of their parameters are held out, the rest train.
    ``permutation``: ``n_permutations`` seeded permutations train and ``n_heldout`` fresh
    ones are held out.

    Raises:
        TvlensError: an unknown family, or a vocabulary too small to leave a training
            task after holding out ``n_heldout`` (e.g. ``offset`` with V = 3 has 2 tasks).
    """
    if not families:
        raise TvlensError("no task families given; use some of " + ", ".join(FAMILIES))
    if n_values < 3:
        raise TvlensError(f"n_values={n_values} is too small for any task family; use at least 3")
    if n_heldout < 0:
        raise TvlensError(f"n_heldout must be >= 0, got {n_heldout}")
    g = torch.Generator().manual_seed(seed)
    train: list[SyntheticTask] = []
    held: list[SyntheticTask] = []
    for family in families:
        _check_family(family)
        if family == "permutation":
            if n_permutations < 1:
                raise TvlensError(f"n_permutations must be >= 1, got {n_permutations}")
            perms: list[tuple[int, ...]] = []
            identity = tuple(range(n_values))
            while len(perms) < n_permutations + n_heldout:
                p = tuple(torch.randperm(n_values, generator=g).tolist())
                if p != identity and p not in perms:
                    perms.append(p)
            tr, ho = perms[:n_permutations], perms[n_permutations:]
        else:
            params = family_parameters(family, n_values)
            if len(params) <= n_heldout:
                raise TvlensError(
                    f"family {family!r} has {len(params)} tasks with n_values={n_values}, too few "
                    f"to hold out {n_heldout} and train on the rest; use a larger n_values or a "
                    "smaller n_heldout"
                )
            order = torch.randperm(len(params), generator=g).tolist()
            ho = [params[i] for i in order[:n_heldout]]
            tr = [params[i] for i in sorted(order[n_heldout:])]
        train += [SyntheticTask(family, p, n_values) for p in tr]
        held += [SyntheticTask(family, p, n_values) for p in ho]
    return train, held


def task_tables(tasks: Sequence[SyntheticTask]) -> Int[Tensor, "n_tasks n_values"]:
    """Lookup tables ``T[t, x] = f_t(x)`` for vectorised sampling."""
    if not tasks:
        raise TvlensError("no tasks to sample from")
    return torch.tensor([t.table() for t in tasks], dtype=torch.long)


@dataclass
class ICLBatch:
    """Sampled ICL sequences and zero-shot queries for the same tasks.

    Attributes:
        ids: ``[B, 4K]`` full ICL sequences (ending with ``y_K``).
        task_index: ``[B]`` index into the task list the batch was drawn from.
        xs, ys: ``[B, K]`` the pairs.
        query_ids: ``[B, 3]`` zero-shot queries ``BOS x' ->`` (``x' ≠ x_K``).
        query_answers: ``[B]`` ``f(x')``.
    """

    ids: Int[Tensor, "batch seq"]
    task_index: Int[Tensor, " batch"]
    xs: Int[Tensor, "batch pairs"]
    ys: Int[Tensor, "batch pairs"]
    query_ids: Int[Tensor, "batch 3"]
    query_answers: Int[Tensor, " batch"]

    @property
    def n_pairs(self) -> int:
        return self.xs.shape[1]

    def prompt_ids(self) -> Int[Tensor, "batch seq_minus_1"]:
        """The ICL prompts cut before ``y_K`` (they end at the last arrow)."""
        return self.ids[:, :-1]


def y_positions(n_pairs: int) -> Int[Tensor, " pairs"]:
    """Columns of ``y_1..y_K`` in an ICL sequence; ``y_i`` is predicted at column - 1."""
    return torch.arange(n_pairs) * 4 + 3


def sample_batch(
    tables: Int[Tensor, "n_tasks n_values"],
    n_pairs: int,
    batch_size: int,
    generator: torch.Generator,
) -> ICLBatch:
    """Draw ``batch_size`` (task, K pairs, zero-shot query) triples, tasks uniformly.

    ``x`` values are uniform with replacement; the zero-shot query's ``x'`` differs
    from ``x_K`` so a vector that only carries ``y_K`` cannot answer it.
    """
    if n_pairs < 1:
        raise TvlensError(f"n_pairs must be >= 1, got {n_pairs}")
    if batch_size < 1:
        raise TvlensError(f"batch_size must be >= 1, got {batch_size}")
    n_tasks, V = tables.shape
    vocab = Vocab(V)
    t = torch.randint(0, n_tasks, (batch_size,), generator=generator)
    xs = torch.randint(0, V, (batch_size, n_pairs), generator=generator)
    ys = tables[t[:, None], xs]
    ids = torch.full((batch_size, 4 * n_pairs), vocab.comma, dtype=torch.long)
    ids[:, 0] = vocab.bos
    ids[:, 1::4] = xs
    ids[:, 2::4] = vocab.arrow
    ids[:, 3::4] = ys
    shift = torch.randint(1, V, (batch_size,), generator=generator)
    xq = (xs[:, -1] + shift) % V
    query = torch.stack([torch.full_like(xq, vocab.bos), xq, torch.full_like(xq, vocab.arrow)], 1)
    return ICLBatch(ids, t, xs, ys, query, tables[t, xq])


def token_prompt_batch(
    input_ids: Int[Tensor, "batch seq"],
    answers: Int[Tensor, " batch"],
    n_values: int,
) -> PromptBatch:
    """Token-level prompts ending at an arrow (zero-shot queries ``BOS x ->`` or ICL prompts
    cut before ``y_K``) as a :class:`PromptBatch`, built by ``PromptSet.from_tokens``.

    Rows are unpadded (mask of ones), each answer is the one value id ``f(x)``, the
    ``"separator"`` is the last arrow (the last column), and ``examples`` / ``prompts``
    hold :meth:`Vocab.render` of each row. Raises :class:`TvlensError` for ids outside the
    vocabulary or a row that does not end at an arrow.
    """
    vocab = Vocab(n_values)
    B, T = input_ids.shape
    if answers.shape[0] != B:
        raise TvlensError(f"{B} prompt(s) but {answers.shape[0]} answers; give one answer per prompt")
    rows = input_ids.tolist()
    if any(r[-1] != vocab.arrow for r in rows):
        raise TvlensError("token-level prompts must end at the arrow '->' the answer follows")
    prompts = PromptSet.from_tokens(
        input_ids, [[int(y)] for y in answers.tolist()], renderings=[vocab.render(r) for r in rows],
        separator_index=[T - 1] * B, n_values=n_values)
    return prompts.batch


def encode(pairs: Sequence[tuple[int, int]], n_values: int) -> list[int]:
    """``BOS x1 -> y1 , … , xK -> yK`` for ``pairs`` (a zero-shot query if ``y`` is None)."""
    v = Vocab(n_values)
    out = [v.bos]
    for i, (x, y) in enumerate(pairs):
        if i:
            out.append(v.comma)
        out += [x, v.arrow] + ([] if y is None else [y])
    return out


def decode(ids: Sequence[int], n_values: int) -> tuple[list[tuple[int, int]], int | None]:
    """Invert :func:`encode`: the ``(x, y)`` pairs and a trailing query ``x`` (or None).

    Raises:
        TvlensError: the ids are not a well-formed sequence (names the offending column).
    """
    v = Vocab(n_values)
    ids = [int(i) for i in ids]
    if not ids or ids[0] != v.bos:
        raise TvlensError("a synthetic sequence must start with BOS (id n_values)")
    pairs, i, query = [], 1, None
    while i < len(ids):
        if pairs:
            if ids[i] != v.comma:
                raise TvlensError(f"expected ',' at column {i}, found id {ids[i]}")
            i += 1
        x = ids[i] if i < len(ids) else -1
        if not 0 <= x < n_values or i + 1 >= len(ids) or ids[i + 1] != v.arrow:
            raise TvlensError(f"expected 'x ->' at column {i}, found {ids[i:i + 2]}")
        if i + 2 == len(ids):
            query = x
            break
        y = ids[i + 2]
        if not 0 <= y < n_values:
            raise TvlensError(f"expected a value at column {i + 2}, found id {y}")
        pairs.append((x, y))
        i += 3
    return pairs, query


def consistent_tasks(
    pairs: Sequence[tuple[int, int]], candidates: Sequence[SyntheticTask]
) -> list[SyntheticTask]:
    """The candidate tasks that map every ``x`` of ``pairs`` to its ``y``.

    With enough distinct ``x`` this identifies the task (for ``offset`` one pair does).
    """
    return [t for t in candidates if all(t.apply(x) == y for x, y in pairs)]
