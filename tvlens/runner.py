"""The runner: every forward tvlens makes goes through here.

:func:`run` takes a model, prompts (a :class:`~tvlens.prompts.PromptSet` or
:class:`~tvlens.prompts.PromptBatch`), the interventions to apply, the activations to
capture and which logits to keep, and does the batching (``batch_size`` rows per
forward, each chunk re-padded to its own longest prompt), the progress bar, the hook
registration (all removed on exit, also on error) and the gathering of outputs:

=================  ==========================================================
``logits=``        kept per prompt
=================  ==========================================================
``"scores"``       ``prediction`` (argmax at the last token) and
                   ``first_answer_logprob`` (log p of the answer's first token)
``"last"``         the above and ``last_logits`` ``[N, vocab]``
``"answer"``       the above and the teacher-forced ``answer_logprobs`` ``[N, A]``
                   with ``answer_mask`` (answers appended on the right)
``"all"``          the scores and ``logits`` ``[N, T, vocab]`` at every prompt column
                   (chunks left-padded with zeros, like whole captures)
``None``           nothing (capture only)
=================  ==========================================================

``capture`` names hook points (or is a predicate over the model's hook names); each is
kept at ``capture_at`` — a position spec, giving ``[N, ...]`` — or, with
``capture_at=None``, whole (``[N, T, ...]``, chunks padded with zeros so that every
prompt ends in the batch's last prompt column). ``grad=True`` keeps the graph (LTV / ATV training, saliency).

:func:`run_variants` runs one batch under many interventions at once — prompt ``i``'s
copy ``j`` in row ``i·c + j`` of a forward over ``c`` copies — and returns the
probability of every prompt's first answer token under each. Head patches are merged
into one ``index_put`` per layer (:meth:`HeadPatch.stack`); with ``prefix_cache`` and
interventions that touch only the last token, the shared prefix runs once into a KV
cache (:mod:`tvlens.kv_cache`). This is FV's indirect effect and the exhaustive
key-head ground truth.

The lower-level forward primitives (:mod:`tvlens.forward`: ``forward``,
``last_token_logits``, ``answer_logprobs``, ``answer_nll``, ``greedy_answers``) take one
left-padded batch and ``fwd_hooks``; :func:`run` calls them per chunk (they are importable
from here too).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tvlens.progress import tqdm

from tvlens.errors import TvlensError
from tvlens.interventions.base import Hook, as_intervention, intervention_hooks
from tvlens.forward import (TeacherForcedBatch, answer_logprobs, answer_nll, answer_probs,  # noqa: F401
                            forward, greedy_answers, last_token_logits, pad_id, run_logits,
                            with_answers)
from tvlens.prompts import Position, PromptBatch

LOGITS = ("scores", "last", "answer", "all", None)


# ----- the runner ---------------------------------------------------------------------
@dataclass
class RunOutput:
    """What :func:`run` kept, per prompt in the order given (see the module docstring)."""

    n: int
    prediction: Tensor | None = None
    first_answer_logprob: Tensor | None = None
    last_logits: Tensor | None = None
    logits: Tensor | None = None
    answer_logprobs: Tensor | None = None
    answer_mask: Tensor | None = None
    captured: dict[str, Tensor] = field(default_factory=dict)
    generated: list[list[int]] | None = None

    @property
    def first_answer_prob(self) -> Tensor:
        return self.first_answer_logprob.exp()


def chunk_rows(n: int, batch_size: int | None) -> list[range]:
    """Consecutive row ranges of at most ``batch_size`` rows covering ``0..n-1``."""
    if batch_size is None:
        return [range(n)]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TvlensError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def chunks(batch: PromptBatch, batch_size: int | None) -> list[PromptBatch]:
    """``batch`` in consecutive sub-batches of ``batch_size`` rows, each left-padded only to
    its own longest prompt (identical tokens and positions to tokenizing it alone)."""
    ranges = chunk_rows(len(batch), batch_size)
    if len(ranges) == 1:
        return [batch]
    return [trim(batch.select(r)) for r in ranges]


def for_rows(intervention, rows: range, n: int):
    """``intervention`` restricted to ``rows`` of an ``n``-row batch: interventions holding
    one value per row (per-example vectors, per-row head values) implement
    ``for_rows(rows)``; the others apply to any rows unchanged."""
    if intervention is None or len(rows) == n:
        return intervention
    fn = getattr(intervention, "for_rows", None)
    return fn(rows) if callable(fn) else intervention


def trim(batch: PromptBatch) -> PromptBatch:
    """Drop leading columns that are padding in every row."""
    lead = int((batch.attention_mask.sum(0) == 0).sum())
    if lead == 0:
        return batch
    from dataclasses import replace
    return replace(batch, input_ids=batch.input_ids[:, lead:], attention_mask=batch.attention_mask[:, lead:])


def _hook_names(model, capture) -> list[str]:
    if callable(capture):
        return [n for n in model.hook_dict if capture(n)]
    names = list(capture)
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise TvlensError(f"no hook point {unknown[0]!r} in this model; names look like "
                          "'blocks.3.hook_resid_post' or 'blocks.3.attn.hook_z'")
    return names


def _at(acts: Tensor, batch: PromptBatch, position: Position) -> Tensor:
    cols = batch.position_index(position).to(acts.device)
    return acts[torch.arange(acts.shape[0], device=acts.device), cols]


def run(model, prompts, interventions=None, *, capture=(), capture_at: Position | None = "last",
        logits: str | None = "scores", batch_size: int | None = 16, progress: bool | None = None,
        desc: str = "run", grad: bool = False, generate: bool = False) -> RunOutput:
    """Run ``model`` over ``prompts`` under ``interventions``; see the module docstring.

    Args:
        prompts: a :class:`~tvlens.prompts.PromptSet` or a :class:`PromptBatch`.
        interventions: an intervention, a list of them (composed), or None.
        capture: hook names (or a predicate over hook names) to keep.
        capture_at: the position kept of each captured activation (None: all columns).
        logits: ``"scores"``, ``"last"``, ``"answer"``, ``"all"`` or None.
        batch_size: rows per forward (None: all at once).
        progress: a progress bar (default: more than 4 chunks, on a terminal).
        grad: keep the autograd graph (outputs stay on the model's device).
        generate: also greedy-decode each answer's length (``generated`` token ids).
    """
    if logits not in LOGITS:
        raise TvlensError(f"logits must be one of {LOGITS}, got {logits!r}")
    batch = getattr(prompts, "batch", prompts)
    if not isinstance(batch, PromptBatch):
        raise TvlensError(f"run() takes a PromptSet or PromptBatch, got {type(prompts).__name__}")
    iv = as_intervention(interventions)
    names = _hook_names(model, capture) if capture else []
    ranges = chunk_rows(len(batch), batch_size)
    parts = chunks(batch, batch_size)
    if capture_at is None and len(parts) > 1:
        odd = [n for n in names if n.endswith(("hook_pattern", "hook_attn_scores"))]
        if odd:
            raise TvlensError(f"{odd[0]} is [batch, head, query, key]: whole captures of it cannot "
                              "be joined across chunks; capture it with batch_size=None")
    show = _show_progress(progress, len(parts))
    keep: dict[str, list] = {k: [] for k in ("prediction", "lp", "last", "alp", "amask", "all")}
    stores: dict[str, list[Tensor]] = {n: [] for n in names}
    generated: list[list[int]] = []
    out_dev = None if grad else "cpu"

    def move(t: Tensor) -> Tensor:
        return t if out_dev is None else t.detach().to(out_dev)

    ctx = nullcontext() if grad else torch.no_grad()
    with ctx:
        for rows, part in tqdm(list(zip(ranges, parts)), disable=not show, desc=desc, leave=False):
            hooks = intervention_hooks(model, for_rows(iv, rows, len(batch)), part)
            store: dict[str, Tensor] = {}

            def saver(name):
                def fn(act, hook=None):
                    store[name] = act if capture_at is None else _at(act, part, capture_at)
                    return act
                return fn

            all_hooks = hooks + [(n, saver(n)) for n in names]
            if logits == "answer":  # one teacher-forced forward gives both
                tf = with_answers(part, pad_id(model))
                A = tf.targets.shape[1]
                lg = run_logits(model, tf.input_ids, tf.attention_mask, all_hooks, logits_to_keep=A + 1)
                targets = tf.targets.to(lg.device)
                valid = targets != -100
                lp = lg[:, :A].float().log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
                keep["alp"].append(move(lp.squeeze(-1) * valid))
                keep["amask"].append(move(valid))
                last = lg[:, 0]  # column prompt_len - 1: every row's last prompt token
            elif logits == "all":
                lg = run_logits(model, part.input_ids, part.attention_mask, all_hooks)
                keep["all"].append(move(_pad(lg.float(), batch.seq_len - part.seq_len, 0)))
                last = lg[torch.arange(len(part), device=lg.device),
                          part.position_index("last").to(lg.device)]
            elif logits is None:
                if all_hooks:
                    run_logits(model, part.input_ids, part.attention_mask, all_hooks, logits_to_keep=1)
                last = None
            else:
                last = last_token_logits(model, part, all_hooks)
            if last is not None:
                target = part.first_answer_ids.to(last.device)
                lsm = last.float().log_softmax(-1)
                keep["prediction"].append(move(last.argmax(-1)))
                keep["lp"].append(move(lsm.gather(-1, target.unsqueeze(-1)).squeeze(-1)))
                if logits == "last":
                    keep["last"].append(move(last.float()))
            for n in names:
                stores[n].append((part.seq_len, move(store[n])))
            if generate:
                generated.extend(greedy_answers(model, part, hooks))
    out = RunOutput(n=len(batch))
    if keep["prediction"]:
        out.prediction = torch.cat(keep["prediction"])
        out.first_answer_logprob = torch.cat(keep["lp"])
    if keep["last"]:
        out.last_logits = torch.cat(keep["last"])
    if keep["all"]:
        out.logits = torch.cat(keep["all"])
    if keep["alp"]:
        A = max(t.shape[1] for t in keep["alp"])
        out.answer_logprobs = torch.cat([_pad_right(t, A, 0.0) for t in keep["alp"]])
        out.answer_mask = torch.cat([_pad_right(t, A, False) for t in keep["amask"]])
    for n, acts in stores.items():
        if capture_at is None and len(acts) > 1:  # realign: prompts end in one column
            extra = max(a.shape[1] - w for w, a in acts)
            acts = [(w, _pad(a, batch.seq_len - w, extra - (a.shape[1] - w))) for w, a in acts]
        out.captured[n] = torch.cat([a for _, a in acts])
    out.generated = generated if generate else None
    return out


def _show_progress(progress: bool | None, n_steps: int) -> bool:
    """``progress`` if given; by default a bar for runs of more than 4 forwards, on a terminal
    only (logs and ``--json`` pipes stay clean)."""
    if progress is not None:
        return bool(progress)
    import sys

    return n_steps > 4 and sys.stderr.isatty()


def _pad_right(t: Tensor, width: int, value) -> Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def _pad(t: Tensor, left: int, right: int) -> Tensor:
    """Zero columns before (left padding) and after (appended answers) ``t [B, T, ...]``."""
    if left == 0 and right == 0:
        return t
    shape = (t.shape[0], *t.shape[2:])
    zeros = lambda k: torch.zeros((shape[0], k, *shape[1:]), dtype=t.dtype, device=t.device)  # noqa: E731
    return torch.cat([zeros(left), t, zeros(right)], dim=1)


# ----- many interventions over one batch ----------------------------------------------
@dataclass
class VariantOutput:
    """What :func:`run_variants` kept, for prompt ``i`` under ``common`` alone (``base*``) and
    under ``common`` + variant ``j`` (``[j, i]``):

    ``base [B]``, ``probs [V, B]``: p(first answer token) at the last position;
    ``base_prediction [B]``, ``predictions [V, B]``: the argmax token there (first-token
    accuracy is ``predictions == batch.first_answer_ids``, as in :func:`tvlens.evaluate`);
    ``base_captured [B, ...]``, ``captured [V, B, ...]``: the ``capture`` hook's activation
    at the last token (None without ``capture``); ``prefix_cache``: whether the KV-cached
    path ran (for the variants that touch only the last token)."""

    base: Tensor
    probs: Tensor
    prefix_cache: bool = False
    base_prediction: Tensor | None = None
    predictions: Tensor | None = None
    base_captured: Tensor | None = None
    captured: Tensor | None = None


def _stacked(model, variants: Sequence, big: PromptBatch, n_prompts: int) -> list[Hook]:
    from tvlens.interventions.heads import HeadPatch
    from tvlens.interventions.residual import ResidualEdit

    if all(isinstance(v, HeadPatch) for v in variants):
        return HeadPatch.stack(list(variants), n_prompts).hooks(model, big)
    if ResidualEdit.stackable(variants):
        return ResidualEdit.stack(list(variants), n_prompts).hooks(model, big)
    # any other intervention: bind it to the prompts and act on its copy's rows only
    c = len(variants)
    small = big.select(range(0, len(big), c))
    hooks: list[Hook] = []
    for j, v in enumerate(variants):
        for name, fn in intervention_hooks(model, v, small):
            def sliced(act, hook=None, fn=fn, j=j):
                part = fn(act[j::c], hook=hook)
                act = act.clone()
                act[j::c] = part
                return act
            hooks.append((name, sliced))
    return hooks


def run_variants(model, batch: PromptBatch, variants: Sequence, *, common=None,
                 batch_size: int = 64, prefix_cache: bool | str = False, capture: str | None = None,
                 progress: bool | None = None, desc: str = "variants") -> VariantOutput:
    """First-answer probabilities and predictions of ``batch`` under each of ``variants``
    (module docstring; :class:`VariantOutput`).

    Args:
        common: an intervention applied in every forward (e.g. a task vector).
        batch_size: rows per forward (prompts × variants of one chunk).
        prefix_cache: ``True``: run the shared prefix once into a KV cache (raises
            :class:`TvlensError` if the model has none or it fails its checks);
            ``"auto"``: when possible, falling back with a ``RuntimeWarning``; ``False``.
            The cache serves the variants that touch only the last token
            (:func:`~tvlens.interventions.base.last_token_only`) and needs ``common`` to
            touch only the last token too; the other variants run full forwards.
        capture: a hook name whose activation at the last token is kept per variant.
    """
    if not (prefix_cache is True or prefix_cache is False or prefix_cache == "auto"):
        raise TvlensError(f"prefix_cache must be True, False or 'auto', got {prefix_cache!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TvlensError(f"batch_size must be a positive integer, got {batch_size!r}")
    if capture is not None:
        _hook_names(model, [capture])
    from tvlens import kv_cache
    from tvlens.interventions.base import last_token_only

    B = len(batch)
    per = max(1, batch_size // B)  # variants per forward
    device = model.cfg.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    common_iv = as_intervention(common)
    cacheable = [j for j, v in enumerate(variants) if last_token_only(v)]
    cache = base_logits = None
    if prefix_cache is not False:
        why = ""
        if ids.shape[1] < 2:
            why = "the prompts have one token (no prefix to cache)"
        elif not last_token_only(common_iv):
            why = "the common intervention touches positions before the last token"
        elif variants and not cacheable:
            why = "every variant touches positions before the last token"
        else:
            with torch.no_grad():
                cache, base_logits, why = kv_cache.checked_prefix_cache(model, ids, mask)
        if cache is None:
            if prefix_cache is True:
                raise TvlensError(f"prefix_cache=True, but {why}; use prefix_cache=False (or 'auto')")
            if kv_cache.has_hf_model(model):  # a cache was expected: say why it is not used
                warnings.warn(f"prefix KV cache not used ({why}); running full forwards instead "
                              "(same result, slower)", RuntimeWarning, stacklevel=3)
    if cache is None:
        cacheable = []

    def last_logits(c: int, variant_part: Sequence, cached: bool) -> tuple[Tensor, Tensor | None]:
        """``[B * c, vocab]`` last-token logits and the captured activation ``[B * c, ...]``."""
        store: dict[str, Tensor] = {}

        def grab(act, hook=None):  # registered last: sees every edit at its hook point
            store["act"] = act[:, -1]
            return act

        rows = [i for i in range(B) for _ in range(c)]
        big = _last_token_view(batch, c) if cached else batch.select(rows)
        # a per-example common intervention (one vector per prompt): its rows repeated too
        common_c = common_iv.for_rows(rows) if getattr(common_iv, "per_example", False) else common_iv
        hooks = intervention_hooks(model, common_c, big)
        if variant_part:
            hooks = hooks + _stacked(model, variant_part, big, B)
        if capture is not None:
            hooks = hooks + [(capture, grab)]
        logits = cache.last_logits(c, hooks) if cached else last_token_logits(model, big, hooks)
        return logits, store.get("act")

    targets = batch.first_answer_ids.to(device)
    V = len(variants)
    probs, preds = torch.empty(V, B), torch.empty(V, B, dtype=torch.long)
    captured = None
    with torch.no_grad():
        if base_logits is None or common_iv is not None or capture is not None:
            base_logits, base_act = last_logits(1, [], cache is not None)
        else:
            base_act = None
        groups = [(True, cacheable), (False, [j for j in range(V) if j not in set(cacheable)])]
        steps = [(cached, idx[s : s + per]) for cached, idx in groups for s in range(0, len(idx), per)]
        show = _show_progress(progress, len(steps))
        for cached, idx in tqdm(steps, disable=not show, desc=desc, leave=False):
            c = len(idx)
            lg, act = last_logits(c, [variants[j] for j in idx], cached)
            probs[idx] = _probs(lg, targets.repeat_interleave(c)).view(B, c).T.cpu()
            preds[idx] = lg.argmax(-1).view(B, c).T.cpu()
            if act is not None:
                act = act.detach().cpu().view(B, c, *act.shape[1:]).transpose(0, 1)
                if captured is None:
                    captured = torch.empty(V, *act.shape[1:], dtype=act.dtype)
                captured[idx] = act
    return VariantOutput(_probs(base_logits, targets).cpu(), probs, cache is not None,
                         base_logits.argmax(-1).cpu(), preds,
                         None if base_act is None else base_act.detach().cpu(), captured)


def _probs(last: Tensor, targets: Tensor) -> Tensor:
    return last.float().softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _last_token_view(batch: PromptBatch, copies: int) -> PromptBatch:
    """The batch as the cached forward sees it: one column, every row's last token, each
    prompt repeated ``copies`` times (positions ``"last"`` / ``-1`` resolve to column 0)."""
    rows = [i for i in range(len(batch)) for _ in range(copies)]
    sub = batch.select(rows)
    return PromptBatch(sub.input_ids[:, -1:], torch.ones_like(sub.attention_mask[:, -1:]),
                       sub.examples, sub.prompts, sub.answer_ids, [0] * len(rows))
