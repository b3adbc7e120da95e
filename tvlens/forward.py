"""Forward primitives over one left-padded batch: logits, last-token logits, teacher-forced
answer log-probabilities (:class:`TeacherForcedBatch`), greedy decoding.

Each takes one :class:`~tvlens.prompts.PromptBatch` and ``fwd_hooks``; :func:`tvlens.runner.run`
calls them per chunk (batching, interventions and captures live there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tvlens.interventions.base import Hook
from tvlens.prompts import PromptBatch


@dataclass
class TeacherForcedBatch:
    """A prompt batch with each answer appended (right-padded) for teacher forcing.

    Columns ``0..prompt_len-1`` are exactly the prompt batch's (left padding unchanged,
    so resolved prompt positions stay valid); answer token j of row b sits in column
    ``prompt_len + j`` and is predicted from column ``prompt_len + j - 1``.

    Attributes:
        input_ids, attention_mask: ``[batch, prompt_len + max_answer_len]``.
        targets: ``[batch, max_answer_len]`` answer ids, ``-100`` where a row has none.
        prompt: the prompt batch.
    """

    input_ids: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    targets: Int[Tensor, "batch answer"]
    prompt: PromptBatch

    @property
    def prompt_len(self) -> int:
        return self.prompt.seq_len


def with_answers(batch: PromptBatch, pad_id: int = 0) -> TeacherForcedBatch:
    """Append every row's full answer to ``batch`` (see :class:`TeacherForcedBatch`)."""
    A = max(len(a) for a in batch.answer_ids)
    B = len(batch)
    dev = batch.input_ids.device
    extra = torch.full((B, A), pad_id, dtype=torch.long, device=dev)
    extra_mask = torch.zeros((B, A), dtype=torch.long, device=dev)
    targets = torch.full((B, A), -100, dtype=torch.long, device=dev)
    for i, ans in enumerate(batch.answer_ids):
        t = torch.tensor(ans, dtype=torch.long, device=dev)
        extra[i, : len(ans)] = t
        extra_mask[i, : len(ans)] = 1
        targets[i, : len(ans)] = t
    return TeacherForcedBatch(
        torch.cat([batch.input_ids, extra], dim=1),
        torch.cat([batch.attention_mask, extra_mask], dim=1),
        targets,
        batch,
    )


UNEMBED_IN = "unembed.hook_in"


def _unembed_only(start: int, stop: int) -> Hook:
    """A hook at the unembedding's input keeping columns ``[n - start, n - stop)`` of the
    ``n`` it receives, contiguous.

    ``x[b, n - start : n - stop]`` ``[batch, start - stop, d_model]`` is unembedded
    instead of all ``n`` columns. Contiguity matters as much as the column count: the
    Hugging Face head receives ``h[:, -k:]``, a strided view that ``F.linear`` cannot
    flatten, and multiplies it by ``W_U`` broadcast to ``[batch, d_model, d_vocab]`` (a
    ``bmm``: on SmolLM2, batch 16, about 0.4 s forward and 0.35 s backward for two
    columns, the per-step constant of LTV training); a contiguous input is one
    ``[batch·k, d_model] @ [d_model, d_vocab]`` product. Only the columns read are
    computed; the values of those columns are the same products (float reordering aside).
    """

    def hook(x: Tensor, hook=None) -> Tensor:
        n = x.shape[1]
        if n < start:
            raise RuntimeError(f"the unembedding received {n} columns, fewer than the {start} "
                               "to keep; the model's logits_to_keep handling changed")
        return x[:, n - start: n - stop].contiguous()

    return (UNEMBED_IN, hook)


def run_logits(model, input_ids: Tensor, attention_mask: Tensor, hooks: Sequence[Hook] = (), *,
               logits_to_keep: int | None = None, drop_last: int = 0) -> Tensor:
    """``model`` logits for raw ids and mask, with hooks and an optional last-``k`` cut.

    ``logits_to_keep=k`` returns only the logits of the last ``k`` columns, less the last
    ``drop_last`` of them (``[batch, k - drop_last, vocab]``): columns
    ``seq - k .. seq - drop_last - 1``. Hugging Face models then run the unembedding on
    the kept columns only, others on all and are sliced; where the bridge exposes the
    unembedding's input (``unembed.hook_in``), only the returned columns are unembedded,
    as one contiguous matrix product (:func:`_unembed_only`) — on SmolLM2 ``W_U`` costs
    about as much as eight blocks per column set. Hooks of the caller at
    ``unembed.hook_in`` see what they saw before (the cut is registered after them).
    """
    ids = input_ids.to(model.cfg.device)
    mask = attention_mask.to(model.cfg.device)
    kwargs = {} if logits_to_keep is None else {"logits_to_keep": int(logits_to_keep)}
    hooks = list(hooks)
    cut = logits_to_keep is not None and UNEMBED_IN in getattr(model, "hook_dict", {})
    if cut:
        hooks.append(_unembed_only(int(logits_to_keep), drop_last))
    if hooks:
        logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks, **kwargs)
    else:
        logits = model(ids, attention_mask=mask, **kwargs)
    if logits_to_keep is not None and not cut:
        n = logits.shape[1]
        logits = logits[:, n - int(logits_to_keep): n - drop_last]  # slice what was computed
    if logits_to_keep is not None and logits.shape[1] != int(logits_to_keep) - drop_last:
        raise RuntimeError(f"kept {logits.shape[1]} logit columns, expected "
                           f"{int(logits_to_keep) - drop_last}")
    return logits


def forward(model, batch: PromptBatch, hooks: Sequence[Hook] = (), *,
            logits_to_keep: int | None = None) -> Float[Tensor, "batch seq vocab"]:
    """Logits of ``model`` over a left-padded ``batch`` (mask passed, so positions are right)."""
    return run_logits(model, batch.input_ids, batch.attention_mask, hooks, logits_to_keep=logits_to_keep)


def last_token_logits(model, batch: PromptBatch, hooks: Sequence[Hook] = ()) -> Float[Tensor, "batch vocab"]:
    """Next-token logits at each prompt's last real token."""
    cols = batch.position_index("last")
    if bool((cols == batch.seq_len - 1).all()):  # left padding: every prompt ends the row
        return forward(model, batch, hooks, logits_to_keep=1)[:, -1]
    logits = forward(model, batch, hooks)
    return logits[torch.arange(len(batch), device=logits.device), cols.to(logits.device)]


def pad_id(model) -> int:
    tok = getattr(model, "tokenizer", None)
    return int(tok.pad_token_id) if tok is not None and tok.pad_token_id is not None else 0


def answer_logprobs(model, batch: PromptBatch | TeacherForcedBatch, hooks: Sequence[Hook] = ()
                    ) -> tuple[Float[Tensor, "batch answer"], Tensor]:
    """Teacher-forced log p of every answer token: ``(logprobs [B, A], mask [B, A])``.

    Hooks bound to the prompt batch stay valid: the answer is appended on the right, so
    prompt columns do not move. ``mask`` is True where a row has an answer token.
    """
    tf = batch if isinstance(batch, TeacherForcedBatch) else with_answers(batch, pad_id(model))
    A = tf.targets.shape[1]
    # columns P-1 .. P+A-2 predict the answer tokens: the last A+1 columns less the last
    # (which predicts nothing); only these A are unembedded
    logits = run_logits(model, tf.input_ids, tf.attention_mask, hooks, logits_to_keep=A + 1,
                        drop_last=1)
    pred = logits.float().log_softmax(-1)
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


def answer_probs(last_logits: Tensor, batch: PromptBatch) -> Float[Tensor, " batch"]:
    """p(first answer token) from last-token logits ``[batch, vocab]``."""
    target = batch.first_answer_ids.to(last_logits.device)
    return last_logits.float().softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
