"""``evaluate``: accuracy of a model on a task, zero-shot, with ICL, or with a vector.

The metric of all five papers is top-1 accuracy of the answer's **first token** (the
answer tokenized with its leading space). ``evaluate`` reports it with a 95% bootstrap
CI and per-example records; optionally also multi-token exact match by greedy decoding
and the answer's mean log-probability. Todd et al. score only the test items the model
answers correctly with 10-shot ICL; ``only_icl_correct=10`` does that (Hendel et al. do
not filter, the default).

Anything with a ``hooks(model, batch)`` method can be passed as ``vector``: a
:class:`~tvlens.vector.TaskVector`, an adaptive generator, a head ablation, or a
composition of them (``tv + HeadPatch.zero(model, heads)``). The prompts are written in
the vector's own format (its ``template``) unless ``template`` says otherwise, which
warns naming both formats. All forwards go through :func:`tvlens.runner.run`.

:func:`condition_accuracies` scores one prompt set under many interventions at once (the
conditions along the batch, :func:`tvlens.runner.run_variants`), with the same numbers and
intervals as one :func:`evaluate` per condition; the mechanism analyses use it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from tvlens.errors import TvlensError
from tvlens.interventions.base import as_intervention, describe
from tvlens.models.loading import fingerprint
from tvlens.prompts import (Example, PromptSet, Template, build_examples, get_template,  # noqa: F401
                            make_examples, template_name)
from tvlens.runner import chunk_rows, chunks, for_rows, run, run_variants
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task

DEFAULT_TEMPLATE = "arrow"  # prompts without a vector that names its own format


@dataclass
class EvalResult:
    """Accuracy with its CI and the per-example records (a pandas DataFrame)."""

    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    records: pd.DataFrame = field(repr=False)
    model: str = ""
    task: str = ""
    shots: int = 0
    split: str = "test"
    vector: str | None = None
    exact_match: float | None = None
    mean_logprob: float | None = None
    template: str = DEFAULT_TEMPLATE

    @property
    def interval(self) -> Accuracy:
        return Accuracy(self.accuracy, self.ci_low, self.ci_high, self.n)

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON types (no records)."""
        out = {k: getattr(self, k) for k in ("model", "task", "shots", "split", "n", "accuracy",
                                             "ci_low", "ci_high", "vector", "template")}
        if self.exact_match is not None:
            out["exact_match"] = self.exact_match
        if self.mean_logprob is not None:
            out["mean_logprob"] = self.mean_logprob
        return out

    def to_frame(self) -> pd.DataFrame:
        return self.records

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def vector_template(vector) -> str | None:
    """The prompt format an intervention was made with (None: it does not say)."""
    for part in getattr(vector, "parts", [vector]):
        t = getattr(part, "template", None)
        if t:
            return t
    return None


def resolve_template(vector, template: str | Template | None, *, default: str = DEFAULT_TEMPLATE,
                     what: str = "evaluate") -> str | Template:
    """The format to write prompts in: ``template`` if given (warning when it differs from
    the vector's own), else the vector's, else ``default``."""
    own = vector_template(vector) if vector is not None else None
    if template is None:
        return own or default
    if own is not None and get_template(own) != get_template(template):
        warnings.warn(f"{what}: the vector was made with the {template_name(own)!r} format "
                      f"({get_template(own).demo!r}) but prompts use {template_name(template)!r} "
                      f"({get_template(template).demo!r}); pass template=None to use the vector's",
                      UserWarning, stacklevel=3)
    return template


def evaluate(
    model,
    task: Task,
    *,
    shots: int = 0,
    vector=None,
    split: str = "test",
    template: str | Template | None = None,
    n: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    exact_match: bool = False,
    logprob: bool = False,
    only_icl_correct: int | None = None,
    examples: list[Example] | None = None,
    prompts: PromptSet | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Score ``model`` on ``task``; see the module docstring.

    Args:
        shots: demonstrations per prompt (0 = zero-shot), sampled from the train split.
        vector: injected into every prompt (a TaskVector or anything with ``hooks``).
        split, n: which items (the first ``n`` of the split).
        template: the prompt format (default: the vector's own, else ``"arrow"``).
        batch_size: prompts per forward; bounds memory.
        seed: demonstration sampling and bootstrap seed.
        exact_match: also greedy-decode each full answer and compare token by token.
        logprob: also report the answer's mean token log-probability (teacher forced).
        only_icl_correct: keep only items answered correctly with that many shots.
        examples: prebuilt examples (overrides task/split/shots sampling).
        prompts: a prebuilt :class:`PromptSet` (overrides everything that builds prompts).
        progress: show a progress bar (default: more than 4 batches, on a terminal).
    """
    iv = as_intervention(vector)
    if prompts is None:
        template = resolve_template(iv, template)
        get_template(template)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise TvlensError(f"batch_size must be positive, got {batch_size}")
        if examples is None:
            examples = build_examples(task, shots=shots, split=split, n=n, seed=seed)
        if only_icl_correct is not None:
            examples = _filter_icl_correct(model, task, examples, only_icl_correct, template,
                                           batch_size, seed)
        prompts = PromptSet.from_examples(model, examples, template, task=task.name, split=split,
                                          shots=shots, seed=seed)
    out = run(model, prompts, iv, logits="answer" if logprob else "scores", batch_size=batch_size,
              progress=progress, desc=f"evaluate {task.name}", generate=exact_match)
    batch = prompts.batch
    tokenizer = model.tokenizer
    targets = batch.first_answer_ids.cpu()
    rows = []
    for i, ex in enumerate(batch.examples):
        rec = {
            "input": ex.x,
            "target": ex.y,
            "target_token": tokenizer.decode([int(targets[i])]),
            "prediction": tokenizer.decode([int(out.prediction[i])]),
            "correct": bool(out.prediction[i] == targets[i]),
            "first_token_logprob": float(out.first_answer_logprob[i]),
        }
        if exact_match:
            rec["generated"] = tokenizer.decode(out.generated[i])
            rec["exact_match"] = out.generated[i] == batch.answer_ids[i]
        if logprob:
            valid = out.answer_mask[i]
            rec["mean_logprob"] = float(out.answer_logprobs[i].sum() / valid.sum())
        rows.append(rec)
    records = pd.DataFrame(rows)
    acc = accuracy(records["correct"].to_numpy(dtype=float), seed=seed)
    return EvalResult(
        accuracy=acc.value, ci_low=acc.ci_low, ci_high=acc.ci_high, n=acc.n, records=records,
        model=fingerprint(model).name, task=task.name, shots=shots, split=split,
        vector=_vector_name(iv),
        exact_match=float(records["exact_match"].mean()) if exact_match else None,
        mean_logprob=float(records["mean_logprob"].mean()) if logprob else None,
        template=prompts.template_name,
    )


def condition_correct(model, prompts: PromptSet, conditions: dict, *, common=None,
                      batch_size: int = 64, prefix_cache: bool | str = "auto",
                      progress: bool | None = None) -> dict[str, np.ndarray]:
    """Per prompt, whether the first answer token is the argmax (``1.0`` / ``0.0``, what
    :func:`evaluate` records as ``correct``) under ``common`` plus each intervention of
    ``conditions`` (``None``: ``common`` alone).

    The prompts go in chunks of at most ``batch_size``; each chunk is one
    :func:`~tvlens.runner.run_variants` call, with as many conditions along the batch as fit
    in ``batch_size`` rows (prompt ``i`` under condition ``j`` in row ``i·c + j``), and on a
    model with a Hugging Face KV cache the conditions that touch only the last token share
    one forward of the chunk's prefix (``prefix_cache``: ``"auto"``, ``True`` or ``False``, as
    there). Interventions holding one value per prompt are cut to each chunk (``for_rows``)."""
    names = list(conditions)
    variants = [conditions[k] for k in names if conditions[k] is not None]
    batch = prompts.batch
    B = len(batch)
    base, preds = [], []
    for rows, part in zip(chunk_rows(B, batch_size), chunks(batch, batch_size)):
        out = run_variants(model, part, [for_rows(v, rows, B) for v in variants],
                           common=for_rows(as_intervention(common), rows, B),
                           batch_size=batch_size, prefix_cache=prefix_cache,
                           progress=progress, desc="conditions")
        base.append(out.base_prediction)
        preds.append(out.predictions)
    targets = batch.first_answer_ids.cpu()
    base_t, preds_t = torch.cat(base), iter(torch.cat(preds, dim=1))
    return {k: ((base_t if conditions[k] is None else next(preds_t)) == targets).numpy().astype(float)
            for k in names}


def condition_accuracies(model, prompts: PromptSet, conditions: dict, *, common=None,
                         batch_size: int = 64, seed: int = 0, prefix_cache: bool | str = "auto",
                         progress: bool | None = None) -> dict[str, Accuracy]:
    """:func:`condition_correct` as accuracies, each with the bootstrap CI :func:`evaluate`
    gives it (same ``seed``, same numbers)."""
    correct = condition_correct(model, prompts, conditions, common=common, batch_size=batch_size,
                                prefix_cache=prefix_cache, progress=progress)
    return {k: accuracy(v, seed=seed) for k, v in correct.items()}


def _vector_name(iv) -> str | None:
    if iv is None:
        return None
    method = getattr(iv, "method", None)
    return method if isinstance(method, str) else describe(iv)


def _filter_icl_correct(model, task, examples, shots, template, batch_size, seed) -> list[Example]:
    probe = make_examples([(e.x, e.y) for e in examples], task.train, shots=shots, seed=seed + 1)
    result = evaluate(model, task, examples=probe, template=template, batch_size=batch_size,
                      seed=seed, progress=False)
    keep = [e for e, ok in zip(examples, result.records["correct"]) if ok]
    if not keep:
        raise TvlensError(
            f"no {task.name!r} item is answered correctly with {shots}-shot ICL, so nothing is "
            "left after filtering; drop only_icl_correct"
        )
    return keep
