"""Scores of a model's answers: first-token predictions, answer log-probabilities, greedy
decoding, and the bootstrap confidence interval reported with every accuracy.

All functions take a left-padded :class:`~tvlens.prompts.PromptBatch` and optional
``fwd_hooks`` (an injection, an ablation), so every method scores the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tvlens.injection import Hook, forward, run_logits
from tvlens.prompts import PromptBatch, TeacherForcedBatch, with_answers


def last_token_logits(model, batch: PromptBatch, hooks: Sequence[Hook] = ()) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at each prompt's last real token."""
    cols = batch.position_index("last")
    if bool((cols == batch.seq_len - 1).all()):  # left padding: every prompt ends the row
        return forward(model, batch, hooks, logits_to_keep=1)[:, -1]
    logits = forward(model, batch, hooks)
    return logits[torch.arange(len(batch), device=logits.device), cols.to(logits.device)]


def answer_logprobs(
    model, batch: PromptBatch | TeacherForcedBatch, hooks: Sequence[Hook] = ()
) -> tuple[Float[Tensor, "batch answer"], Tensor]:
    """Teacher-forced log p of every answer token: ``(logprobs [B, A], mask [B, A])``.

    Hooks bound to the prompt batch stay valid: the answer is appended on the right, so
    prompt columns do not move. ``mask`` is True where a row has an answer token.
    """
    tf = batch if isinstance(batch, TeacherForcedBatch) else with_answers(batch, _pad_id(model))
    A = tf.targets.shape[1]
    # columns P-1 .. P+A-2 predict the answer tokens: the last A+1 columns hold them
    logits = run_logits(model, tf.input_ids, tf.attention_mask, hooks, logits_to_keep=A + 1)
    pred = logits[:, :A].float().log_softmax(-1)
    targets = tf.targets.to(model.cfg.device)
    valid = targets != -100
    lp = pred.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * valid, valid


def answer_nll(model, batch, hooks: Sequence[Hook] = ()) -> Float[Tensor, " batch"]:
    """−(mean over answer tokens of log p), per example: the LTV / ATV training loss."""
    lp, valid = answer_logprobs(model, batch, hooks)
    return -(lp.sum(-1) / valid.sum(-1))


@torch.no_grad()
def greedy_answers(model, batch: PromptBatch, hooks: Sequence[Hook] = (),
                   max_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy continuations, ``len(answer)`` tokens per row (or ``max_new_tokens``).

    Re-runs the whole sequence each step (no KV cache), so hooks bound to the prompt act
    on the same columns every step; answers are a few tokens, so this costs little.
    """
    n_new = max_new_tokens or max(len(a) for a in batch.answer_ids)
    device = model.cfg.device
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    out = []
    for _ in range(n_new):
        logits = run_logits(model, ids, mask, hooks, logits_to_keep=1)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    gen = torch.cat(out, dim=1).tolist()
    return [g[: (max_new_tokens or len(a))] for g, a in zip(gen, batch.answer_ids)]


def bootstrap_ci(correct: Sequence[float] | np.ndarray, *, n_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``correct`` (0/1 scores); seeded."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _pad_id(model) -> int:
    tok = getattr(model, "tokenizer", None)
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def first_token_correct(logits: Float[Tensor, "batch vocab"], targets: Int[Tensor, " batch"]) -> Tensor:
    return logits.argmax(-1).cpu() == targets.cpu()
