"""Prompts, left-padded batches, positions and answers.

A *template* formats one demonstration, e.g. ``"{x} -> {y}\\n"``. An ICL prompt is K
demonstrations then the query, cut at the separator: ``"{x} ->"``. Whitespace between
the separator and ``{y}`` belongs to the answer (``" Paris"``), so answers are scored
with their leading space, as in all five papers.

Batches are **left-padded** with an attention mask. Every position is resolved per
example through the mask — never assumed to be column ``-1`` of an unpadded row:

============  ===========================================================
spec          meaning, for a prompt of ``n`` real tokens in a row of ``T``
============  ===========================================================
``"last"``    the prompt's last token (same as ``-1``)
``-k``        the k-th token from the end of the prompt
``i >= 0``    the prompt's i-th real token (0 is BOS when the tokenizer adds one)
``"separator"``  the first token after the query's input ``x`` (the ``" ->"`` of
              ``"{x} ->"``, the ``"\\n"`` of ``"Q: {x}\\nA:"``)
``"all"``     every real token
============  ===========================================================

Answers carry the full token ids (for multi-token scoring and teacher forcing) and
the first token (the papers' metric). They are tokenized *in context* — the ids the
prompt + answer string gets beyond the prompt's own ids — so tokenizers that merge
or prefix spaces differently (BPE vs SentencePiece) agree with what the model reads.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Union

import torch
from jaxtyping import Int
from torch import Tensor

from tvlens.errors import TvlensError
from tvlens.tasks.task import Pair, Task
from tvlens.templates import TEMPLATES, Template, get_template, template_name  # noqa: F401

Position = Union[int, str]
NAMED_POSITIONS = ("last", "separator", "all")


@dataclass(frozen=True)
class Example:
    """One query with its demonstrations (empty for zero-shot)."""

    x: str
    y: str
    demos: tuple[Pair, ...] = ()


def make_examples(
    queries: Sequence[Pair],
    demo_pool: Sequence[Pair] = (),
    *,
    shots: int = 0,
    seed: int = 0,
    shuffle_labels: bool = False,
) -> list[Example]:
    """Attach ``shots`` demonstrations, sampled from ``demo_pool``, to each query.

    Demonstrations never contain the query's own input. ``shuffle_labels`` permutes
    the outputs among the demonstrations (inputs keep their order; a non-identity
    permutation when ``shots > 1``), as Todd et al.'s indirect-effect prompts need.
    Sampling is seeded: the same arguments give the same prompts.
    """
    if shots < 0:
        raise TvlensError(f"shots must be >= 0, got {shots}")
    if len(queries) == 0:
        raise TvlensError("no queries to build prompts for (is the split empty?)")
    if shots and len({x for x, _ in demo_pool}) - 1 < shots:
        raise TvlensError(
            f"{shots} shots need at least {shots + 1} distinct demonstration pairs, but the "
            f"demonstration split holds {len(demo_pool)}; use fewer shots or a larger task"
        )
    rng = random.Random(seed)
    examples = []
    for i, (x, y) in enumerate(queries):
        demos: list[Pair] = []
        if shots:
            candidates = [p for p in demo_pool if p[0] != x]
            demos = rng.sample(candidates, shots)
            if shuffle_labels and shots > 1:
                # its own RNG, so shuffled prompts have the same demonstrations as clean ones
                shuffler = random.Random(seed * 1_000_003 + i)
                labels = [b for _, b in demos]
                for _ in range(20):
                    perm = shuffler.sample(labels, len(labels))
                    if perm != labels:
                        break
                demos = [(a, b) for (a, _), b in zip(demos, perm)]
        examples.append(Example(x, y, tuple(demos)))
    return examples


@dataclass
class PromptBatch:
    """A left-padded batch of prompts with their answers.

    Attributes:
        input_ids: ``[batch, seq]`` token ids, pad on the left.
        attention_mask: ``[batch, seq]``, 1 on real tokens.
        examples: the examples the rows were built from.
        prompts: the prompt strings.
        answer_ids: per row, the answer's token ids (at least one).
        separator_index: per row, the ``"separator"`` position as an index into the
            row's real tokens.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    examples: list[Example]
    prompts: list[str]
    answer_ids: list[list[int]]
    separator_index: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real tokens per row."""
        return self.attention_mask.sum(dim=1)

    @property
    def first_answer_ids(self) -> Int[Tensor, " batch"]:
        return torch.tensor([ids[0] for ids in self.answer_ids], device=self.input_ids.device)

    def to(self, device) -> PromptBatch:
        return replace(self, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device))

    def select(self, rows: Sequence[int]) -> PromptBatch:
        """The sub-batch of ``rows`` (kept left-padded to this batch's width)."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return PromptBatch(
            self.input_ids[idx.to(self.input_ids.device)],
            self.attention_mask[idx.to(self.input_ids.device)],
            [self.examples[i] for i in rows],
            [self.prompts[i] for i in rows],
            [self.answer_ids[i] for i in rows],
            [self.separator_index[i] for i in rows] if self.separator_index else [],
        )

    def position_index(self, spec: Position) -> Int[Tensor, " batch"]:
        """Column of position ``spec`` in every row (one per row; not ``"all"``).

        Raises :class:`TvlensError` naming the first row the position falls outside.
        """
        lengths = self.lengths.tolist()
        T = self.seq_len
        cols = []
        for row, n in enumerate(lengths):
            if spec == "last":
                i = n - 1
            elif spec == "separator":
                if not self.separator_index:
                    raise TvlensError("this batch has no separator positions")
                i = self.separator_index[row]
            elif isinstance(spec, (int,)) and not isinstance(spec, bool):
                i = spec if spec >= 0 else n + spec
            else:
                raise TvlensError(
                    f"unknown position {spec!r}: use an int (negative counts from the end), "
                    f"or one of {NAMED_POSITIONS}"
                )
            if not 0 <= i < n:
                raise TvlensError(
                    f"position {spec!r} falls outside prompt {row} ({n} tokens: "
                    f"{self.prompts[row][-60:]!r}); use a position within every prompt, "
                    "e.g. a negative offset from the end"
                )
            cols.append(T - n + i)
        return torch.tensor(cols, dtype=torch.long, device=self.input_ids.device)

    def position_entries(self, spec: Position) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
        """(rows, cols) of every token position ``spec`` selects; ``"all"`` gives all real tokens."""
        if spec == "all":
            rows, cols = torch.nonzero(self.attention_mask.bool(), as_tuple=True)
            return rows, cols
        cols = self.position_index(spec)
        return torch.arange(len(self), device=cols.device), cols


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def answer_token_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of ``answer`` as read right after ``prompt`` (see the module docstring)."""
    prompt_ids = _ids(tokenizer, prompt, special=True)
    full_ids = _ids(tokenizer, prompt + answer, special=True)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids) :]
    return _ids(tokenizer, answer, special=False)  # the boundary merged: tokenize alone


def tokenize(
    model_or_tokenizer,
    examples: Sequence[Example],
    template: str | Template = "arrow",
    *,
    max_len: int | None = None,
) -> PromptBatch:
    """Build a left-padded :class:`PromptBatch` from ``examples``.

    Args:
        model_or_tokenizer: a bridge (its tokenizer and ``cfg.n_ctx`` are used) or a tokenizer.
        template: how prompts are written.
        max_len: refuse prompts longer than this many tokens (default: the model's n_ctx).

    Raises:
        TvlensError: an answer tokenizes to nothing, or a prompt is too long.
    """
    tokenizer = getattr(model_or_tokenizer, "tokenizer", model_or_tokenizer)
    if tokenizer is None:
        raise TvlensError("this model has no tokenizer; build it with tiny_model(texts=...)")
    if max_len is None and hasattr(model_or_tokenizer, "cfg"):
        max_len = int(model_or_tokenizer.cfg.n_ctx)
    if len(examples) == 0:
        raise TvlensError("no examples to tokenize")
    template = get_template(template)
    prompts, rows, answers, separators = [], [], [], []
    for ex in examples:
        prompt = template.prompt(ex.demos, ex.x)
        ids = _ids(tokenizer, prompt, special=True)
        answer = answer_token_ids(tokenizer, prompt, template.format_answer(ex.y))
        if not answer:
            raise TvlensError(f"answer {ex.y!r} (for input {ex.x!r}) tokenizes to nothing")
        if max_len is not None and len(ids) + len(answer) > max_len:
            raise TvlensError(
                f"prompt of {len(ids)} tokens plus a {len(answer)}-token answer exceeds the "
                f"model's context of {max_len}; use fewer shots"
            )
        before = _ids(tokenizer, template.text_before_separator(ex.demos, ex.x), special=True)
        prompts.append(prompt)
        rows.append(ids)
        answers.append(answer)
        separators.append(min(len(before), len(ids) - 1))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids, mask = left_pad(rows, pad_id)
    return PromptBatch(input_ids, mask, list(examples), prompts, answers, separators)


def show_prompts(
    task,
    template: str | Template,
    *,
    shots: int = 0,
    n: int = 1,
    split: str = "test",
    seed: int = 0,
    shuffle_labels: bool = False,
) -> list[Example]:
    """The first ``n`` prompts a method would see for ``task``: queries from ``split``,
    ``shots`` demonstrations from the train split (as :func:`make_examples` samples them).
    ``get_template(template).prompt(ex.demos, ex.x)`` is each exact string; ``tvlens prompt``
    prints them."""
    get_template(template)  # an unknown name fails here, listing the names
    return make_examples(task.split(split)[:n], task.train, shots=shots, seed=seed,
                         shuffle_labels=shuffle_labels)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Int[Tensor, "batch seq"], Int[Tensor, "batch seq"]]:
    """Token-id rows → ``(input_ids, attention_mask)``, padded on the left to the longest row."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r) :] = 1
    return input_ids, mask


# ----- the prompt set -------------------------------------------------------------------
def build_examples(task: Task, *, shots: int, split: str = "test", n: int | None = None,
                   seed: int = 0, shuffle_labels: bool = False) -> list[Example]:
    """The queries of ``split`` (first ``n``), each with ``shots`` train demonstrations."""
    queries = task.split(split)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise TvlensError(f"n must be a positive integer, got {n!r}")
        queries = queries[:n]
    if len(queries) == 0:
        raise TvlensError(f"task {task.name!r} has no {split} items; use a larger task or another split")
    return make_examples(queries, task.train, shots=shots, seed=seed, shuffle_labels=shuffle_labels)


def sample_queries(task: Task, n: int, *, seed: int, shots: int = 0,
                   pool: Sequence[Pair] | None = None) -> list[Pair]:
    """``n`` pairs drawn with replacement (seeded) from ``pool`` (default: the train
    split): the dummy queries of the extraction methods (ICL-TV, vanilla; FV draws from
    :func:`tvlens.extract.fv.query_pool`)."""
    train = task.train
    pool = train if pool is None else list(pool)
    if not pool:
        raise TvlensError(f"no pairs to draw queries from for task {task.name!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TvlensError(f"n_prompts must be a positive integer (prompts to average), got {n!r}")
    if len(train) < shots + 1:
        raise TvlensError(
            f"task {task.name!r} has {len(train)} train items; {shots} shots need {shots + 1}; "
            "use fewer shots or a larger task"
        )
    rng = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(pool), (n,), generator=rng).tolist()
    return [pool[i] for i in picks]


@dataclass(frozen=True, eq=False)
class PromptSet:
    """Prompts built once — examples, their tokens, and the recipe that made them.

    Every method takes a prompt set or builds one through :meth:`build` (queries of a
    split) or :meth:`from_examples`; token-level prompts (the synthetic tasks of
    :mod:`tvlens.emergence`) come through :meth:`from_tokens`. The tokens are one
    left-padded :class:`PromptBatch`; the runner cuts it into chunks, each re-padded to its
    own longest prompt, which gives the same tokens as tokenizing the chunk alone.

    Attributes:
        batch: the tokenized prompts.
        template: the format (``template_name`` is its registered name or demo string).
        recipe: what built it (task, split, n, shots, seed, shuffled), for records.
    """

    batch: PromptBatch
    template: Template | None
    recipe: dict = field(default_factory=dict)

    @classmethod
    def build(cls, model, task: Task, *, split: str = "test", n: int | None = None, shots: int = 0,
              template: str | Template = "arrow", seed: int = 0, shuffled: bool = False,
              queries: Sequence[Pair] | None = None) -> PromptSet:
        """Queries from ``split`` (first ``n``) — or the given ``queries`` — each with
        ``shots`` train demonstrations sampled with ``seed`` (labels shuffled if asked)."""
        if queries is None:
            examples = build_examples(task, shots=shots, split=split, n=n, seed=seed,
                                      shuffle_labels=shuffled)
        else:
            examples = make_examples(queries, task.train, shots=shots, seed=seed,
                                     shuffle_labels=shuffled)
            split = "given"
        return cls.from_examples(model, examples, template, task=task.name, split=split, n=n,
                                 shots=shots, seed=seed, shuffled=shuffled)

    @classmethod
    def from_examples(cls, model, examples: Sequence[Example], template: str | Template = "arrow",
                      **recipe) -> PromptSet:
        tmpl = get_template(template)
        return cls(tokenize(model, examples, tmpl), tmpl,
                   {"template": template_name(template), **recipe})

    @classmethod
    def from_tokens(cls, input_ids: Int[Tensor, "batch seq"], answers: Sequence[Sequence[int]], *,
                    attention_mask: Int[Tensor, "batch seq"] | None = None,
                    renderings: Sequence[str] | None = None,
                    separator_index: Sequence[int] | None = None, **recipe) -> PromptSet:
        """Token-level prompts: ids (left-padded, with their mask) and answer ids per row.

        ``renderings`` are readable strings of the prompts (e.g. the synthetic vocabulary's
        decode); they fill ``examples`` / ``prompts`` for records and error messages.
        """
        B = input_ids.shape[0]
        if len(answers) != B or any(len(a) == 0 for a in answers):
            raise TvlensError(f"give one non-empty answer per prompt ({B} prompts, {len(answers)} answers)")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        text = list(renderings) if renderings is not None else [" ".join(map(str, r.tolist())) for r in input_ids]
        examples = [Example(t, " ".join(map(str, a))) for t, a in zip(text, answers)]
        batch = PromptBatch(input_ids, mask, examples, text, [list(map(int, a)) for a in answers],
                            list(separator_index) if separator_index is not None else [])
        return cls(batch, None, {"template": "tokens", **recipe})

    @classmethod
    def from_texts(cls, tokenizer, texts: Sequence[str], *, max_len: int | None = None,
                   **recipe) -> PromptSet:
        """Raw strings as they are (special tokens added, left-padded), without answers:
        for capture-only forwards (an encoder reading queries). ``max_len`` refuses longer
        texts, naming the first."""
        rows = [tokenizer(t)["input_ids"] for t in texts]
        for n, text in zip(map(len, rows), texts):
            if max_len is not None and n > max_len:
                raise TvlensError(f"text {text[:60]!r} is {n} tokens, longer than the context of "
                                  f"{max_len}; shorten it or use a model with a longer context")
        ids, mask = left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        batch = PromptBatch(ids, mask, [Example(t, "") for t in texts], list(texts), [[] for _ in texts])
        return cls(batch, None, {"template": "text", **recipe})

    @property
    def examples(self) -> list[Example]:
        return self.batch.examples

    @property
    def template_name(self) -> str:
        return self.recipe.get("template", "tokens")

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, rows: Sequence[int]) -> PromptSet:
        return PromptSet(self.batch.select(rows), self.template, dict(self.recipe))
