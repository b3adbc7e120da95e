"""``evaluate``: accuracy of a model on a task, zero-shot, with ICL, or with a vector.

The metric of all five papers is top-1 accuracy of the answer's **first token** (the
answer tokenized with its leading space). ``evaluate`` reports it with a 95% bootstrap
CI and per-example records; optionally also multi-token exact match by greedy decoding
and the answer's mean log-probability. Todd et al. score only the test items the model
answers correctly with 10-shot ICL; ``only_icl_correct=10`` does that (Hendel et al. do
not filter, the default).

Anything with a ``hooks(model, batch)`` method can be passed as ``vector``: a
:class:`~tvlens.vector.TaskVector`, an adaptive generator, an ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from tqdm.auto import tqdm

from tvlens.errors import TvlensError
from tvlens.models.loading import fingerprint
from tvlens.prompts import Example, Template, get_template, make_examples, tokenize
from tvlens.scoring import answer_logprobs, bootstrap_ci, greedy_answers, last_token_logits
from tvlens.tasks.task import Task


@runtime_checkable
class Intervention(Protocol):
    def hooks(self, model, batch) -> list: ...


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

    def to_dict(self) -> dict[str, Any]:
        """The summary as plain JSON types (no records)."""
        out = {k: getattr(self, k) for k in ("model", "task", "shots", "split", "n", "accuracy",
                                             "ci_low", "ci_high", "vector")}
        if self.exact_match is not None:
            out["exact_match"] = self.exact_match
        if self.mean_logprob is not None:
            out["mean_logprob"] = self.mean_logprob
        return out

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}] (n={self.n})"


def build_examples(task: Task, *, shots: int, split: str = "test", n: int | None = None,
                   seed: int = 0, shuffle_labels: bool = False) -> list[Example]:
    """The queries of ``split`` (first ``n``), each with ``shots`` train demonstrations."""
    queries = task.split(split)
    if n is not None:
        if n <= 0:
            raise TvlensError(f"n must be positive, got {n}")
        queries = queries[:n]
    if len(queries) == 0:
        raise TvlensError(f"task {task.name!r} has no {split} items; use a larger task or another split")
    return make_examples(queries, task.train, shots=shots, seed=seed, shuffle_labels=shuffle_labels)


def evaluate(
    model,
    task: Task,
    *,
    shots: int = 0,
    vector: Intervention | None = None,
    split: str = "test",
    template: str | Template = "arrow",
    n: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    exact_match: bool = False,
    logprob: bool = False,
    only_icl_correct: int | None = None,
    examples: list[Example] | None = None,
    progress: bool | None = None,
) -> EvalResult:
    """Score ``model`` on ``task``; see the module docstring.

    Args:
        shots: demonstrations per prompt (0 = zero-shot), sampled from the train split.
        vector: injected into every prompt (a TaskVector or anything with ``hooks``).
        split, n: which items (the first ``n`` of the split).
        batch_size: prompts per forward; bounds memory.
        seed: demonstration sampling and bootstrap seed.
        exact_match: also greedy-decode each full answer and compare token by token.
        logprob: also report the answer's mean token log-probability (teacher forced).
        only_icl_correct: keep only items answered correctly with that many shots.
        examples: prebuilt examples (overrides task/split/shots sampling).
        progress: show a progress bar (default: when there are more than 4 batches).
    """
    template = get_template(template)
    if batch_size <= 0:
        raise TvlensError(f"batch_size must be positive, got {batch_size}")
    if examples is None:
        examples = build_examples(task, shots=shots, split=split, n=n, seed=seed)
    if only_icl_correct is not None:
        examples = _filter_icl_correct(model, task, examples, only_icl_correct, template,
                                       batch_size, seed)
    chunks = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    show = progress if progress is not None else len(chunks) > 4
    rows = []
    tokenizer = model.tokenizer
    with torch.no_grad():
        for chunk in tqdm(chunks, disable=not show, desc=f"evaluate {task.name}", leave=False):
            batch = tokenize(model, chunk, template)
            hooks = vector.hooks(model, batch) if vector is not None else []
            logits = last_token_logits(model, batch, hooks)
            pred = logits.argmax(-1).cpu()
            target = batch.first_answer_ids.cpu()
            lp_first = logits.float().log_softmax(-1).cpu()[torch.arange(len(batch)), target]
            generated = greedy_answers(model, batch, hooks) if exact_match else None
            lps = answer_logprobs(model, batch, hooks) if logprob else None
            for i, ex in enumerate(chunk):
                rec = {
                    "input": ex.x,
                    "target": ex.y,
                    "target_token": tokenizer.decode([int(target[i])]),
                    "prediction": tokenizer.decode([int(pred[i])]),
                    "correct": bool(pred[i] == target[i]),
                    "first_token_logprob": float(lp_first[i]),
                }
                if generated is not None:
                    rec["generated"] = tokenizer.decode(generated[i])
                    rec["exact_match"] = generated[i] == batch.answer_ids[i]
                if lps is not None:
                    lp, valid = lps
                    rec["mean_logprob"] = float(lp[i].sum() / valid[i].sum())
                rows.append(rec)
    records = pd.DataFrame(rows)
    correct = records["correct"].to_numpy(dtype=float)
    lo, hi = bootstrap_ci(correct, seed=seed)
    return EvalResult(
        accuracy=float(correct.mean()), ci_low=lo, ci_high=hi, n=len(records), records=records,
        model=fingerprint(model).name, task=task.name, shots=shots, split=split,
        vector=getattr(vector, "method", type(vector).__name__) if vector is not None else None,
        exact_match=float(records["exact_match"].mean()) if exact_match else None,
        mean_logprob=float(records["mean_logprob"].mean()) if logprob else None,
    )


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
