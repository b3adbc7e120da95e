"""Training small native transformers on synthetic ICL tasks, with the TVP loss.

Losses, for a batch of ICL sequences with K pairs (see :mod:`tvlens.emergence.synthetic`)
and one zero-shot query ``BOS x' ->`` per sequence, both from the same task ``f``:

    L_ICL = (1/BK) Σ_b Σ_i  CE(logits_b[4i+2], y_{b,i})           (next token at every y)
    v_b   = h_ℓ(ICL_b)[4K-2]                                      (residual after layer ℓ at
                                                                   the last "->", [d_model])
    L_TVP = (1/B) Σ_b CE(logits(query_b | h_ℓ[query "->"] ← v_b)[-1], f(x'_b))
    L     = L_ICL + λ · L_TVP

One ICL forward serves both losses: a capture hook on ``blocks.{ℓ}.hook_resid_post``
keeps ``v`` in the graph, and the zero-shot forward replaces the same hook's output at
the query's arrow through :class:`tvlens.interventions.ResidualEdit` (``mode="replace"``,
per-example vectors ``[B, 1, 1, d_model]``), so gradients reach the ICL pass through
``v`` (Yang et al. 2025, "Task vectors in in-context learning: emergence, formation,
and benefits"). ``λ = 0`` is the plain ICL baseline (the zero-shot forward is skipped).

Training is seeded AdamW with a linear warm-up and gradient clipping. The initial
weights come from ``cfg.seed`` (:func:`tvlens.emergence.config.build_model`) and the data
from a ``torch.Generator`` seeded by ``cfg.seed + 1``; the global RNG is neither read nor
changed. Checkpoints (:mod:`tvlens.emergence.checkpoint`: safetensors + JSON) hold the
parameters, optimizer state, the data generator's state, the history and the running loss
sums, so a run resumed from a checkpoint ends with the same parameters and history as one
run straight through. :func:`compare` trains the same config with and without TVP.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tvlens.emergence.checkpoint import CHECKPOINT, load_params, read_checkpoint, save_checkpoint
from tvlens.emergence.config import TVPConfig, build_model, get_preset
from tvlens.emergence.measure import evaluate_run, training_metrics
from tvlens.emergence.synthetic import ICLBatch, sample_batch, task_tables, token_prompt_batch, y_positions
from tvlens.errors import TvlensError
from tvlens.interventions import ResidualEdit, resid_hook_name

# Fields that may change between a checkpoint and its resumption.
_RESUMABLE = {"steps", "eval_every", "checkpoint_every", "n_eval"}


def icl_loss(logits: Float[Tensor, "batch seq vocab"], ys: Tensor) -> Tensor:
    """Mean cross-entropy of every ``y_i`` given the tokens before it."""
    cols = y_positions(ys.shape[1]).to(logits.device) - 1
    pred = logits[:, cols]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ys.reshape(-1).to(logits.device))


@dataclass
class TVPOutput:
    """Losses of one batch; ``extracted`` is ``v`` ``[B, d_model]``, ``injected`` (when
    asked for) the zero-shot residual after layer ℓ at the query arrow after the swap."""

    loss: Tensor
    icl: Tensor
    tvp: Tensor | None
    extracted: Tensor
    injected: Tensor | None = None


def tvp_losses(model, batch: ICLBatch, layer: int, lam: float, *,
               capture_injected: bool = False) -> TVPOutput:
    """``L = L_ICL + λ·L_TVP`` on ``batch`` (see the module docstring), with gradients."""
    n_values = model.cfg.d_vocab - 4
    name = resid_hook_name(layer)
    store: dict[str, Tensor] = {}

    def grab(act, hook=None):
        store["icl"] = act
        return act

    device = model.cfg.device
    logits = model.run_with_hooks(batch.ids.to(device), fwd_hooks=[(name, grab)])
    extracted = store["icl"][:, -2]  # the last "->" of the ICL sequence
    l_icl = icl_loss(logits, batch.ys)
    if lam == 0 and not capture_injected:
        return TVPOutput(l_icl, l_icl, None, extracted)
    qb = token_prompt_batch(batch.query_ids, batch.query_answers, n_values).to(device)
    edit = ResidualEdit(layers=(layer,), positions=("last",),
                        vectors=extracted[:, None, None, :], mode="replace")
    hooks = edit.hooks(model, qb)

    def grab_query(act, hook=None):
        store["query"] = act
        return act

    if capture_injected:
        hooks = hooks + [(name, grab_query)]
    q_logits = model.run_with_hooks(qb.input_ids, fwd_hooks=hooks)  # unpadded: no mask
    l_tvp = F.cross_entropy(q_logits[:, -1], batch.query_answers.to(device))
    injected = store["query"][:, -1] if capture_injected else None
    return TVPOutput(l_icl + lam * l_tvp, l_icl, l_tvp, extracted, injected)


@dataclass
class TrainRun:
    """A trained model, its config, the step reached and the evaluation history."""

    model: object
    config: TVPConfig
    step: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def train(cfg: TVPConfig, *, out_dir: str | Path | None = None, resume: bool = False,
          log: Callable[[dict], None] | None = None) -> TrainRun:
    """Train a model on ``cfg``'s training tasks with ``L_ICL + λ·L_TVP``.

    Args:
        out_dir: folder for ``checkpoint.safetensors`` / ``config.json`` (written every
            ``checkpoint_every`` steps and at the end); None keeps everything in memory.
        resume: continue from ``out_dir/checkpoint.safetensors`` up to ``cfg.steps`` (only
            ``steps``, ``eval_every``, ``checkpoint_every``, ``n_eval`` may differ).
        log: called with every history entry (step, losses, accuracies).
    """
    cfg.validate()
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    run = TrainRun(model, cfg, 0)
    sums = _zero_sums()
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if resume:
        if folder is None:
            raise TvlensError(f"resume needs out_dir (the folder holding {CHECKPOINT})")
        ckpt = read_checkpoint(folder / CHECKPOINT)
        if replace(ckpt.config, **{k: getattr(cfg, k) for k in _RESUMABLE}) != cfg:
            raise TvlensError("the checkpoint was trained with another config; resume with the "
                              f"same config (only {sorted(_RESUMABLE)} may change)")
        load_params(model, ckpt.params)
        opt.load_state_dict(ckpt.optimizer)
        data_gen.set_state(ckpt.data_rng)
        run.step, run.history = ckpt.step, ckpt.history
        sums = dict(ckpt.running) if ckpt.running else sums
    train_tasks, _ = cfg.tasks()
    tables = task_tables(train_tasks)
    start = time.perf_counter()
    model.train()
    while run.step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (run.step + 1) / max(1, cfg.warmup))
        batch = sample_batch(tables, cfg.n_pairs, cfg.batch_size, data_gen)
        out = tvp_losses(model, batch, cfg.tvp_layer, cfg.tvp_lambda)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run.step += 1
        sums["loss"] += out.loss.item()
        sums["icl_loss"] += out.icl.item()
        sums["tvp_loss"] += out.tvp.item() if out.tvp is not None else float("nan")
        sums["n"] += 1
        if cfg.eval_every and run.step % cfg.eval_every == 0:
            entry = {"step": run.step, **{k: sums[k] / sums["n"] for k in ("loss", "icl_loss", "tvp_loss")}}
            entry.update(training_metrics(model, cfg))
            model.train()
            run.history.append(entry)
            sums = _zero_sums()
            if log:
                log(entry)
        if folder is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save_checkpoint(folder / CHECKPOINT, run, opt, data_gen, running=sums)
    model.eval()
    run.seconds = time.perf_counter() - start
    if folder is not None:
        save_checkpoint(folder / CHECKPOINT, run, opt, data_gen, running=sums)
    return run


def _zero_sums() -> dict:
    """Loss sums since the last evaluation (averaged into the next history entry)."""
    return {"loss": 0.0, "icl_loss": 0.0, "tvp_loss": 0.0, "n": 0}


def compare(cfg: TVPConfig | str = "tiny", *, tvp_lambda: float | None = None,
            out_dir=None, log: Callable[[str, dict], None] | None = None) -> dict:
    """Train the same seeded config twice, with λ (``with_tvp``) and with λ = 0
    (``without_tvp``), and measure both with :func:`tvlens.emergence.measure.evaluate_run`.

    Returns ``{"config": ..., "with_tvp": {...}, "without_tvp": {...}}``; each arm also has
    its ``history`` (curves over training) and ``train_seconds``.
    """
    cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
    if tvp_lambda is not None:
        cfg = replace(cfg, tvp_lambda=tvp_lambda)
    if cfg.tvp_lambda <= 0:
        raise TvlensError("compare needs tvp_lambda > 0 for the with-TVP arm")
    cfg.validate()
    result = {"config": cfg.to_dict()}
    for arm, lam in (("with_tvp", cfg.tvp_lambda), ("without_tvp", 0.0)):
        arm_cfg = replace(cfg, tvp_lambda=lam)
        start = time.perf_counter()
        folder = None if out_dir is None else f"{out_dir}/{arm}"
        run = train(arm_cfg, out_dir=folder, log=(lambda e, a=arm: log(a, e)) if log else None)
        metrics = evaluate_run(run.model, arm_cfg)
        metrics["history"] = run.history
        metrics["train_seconds"] = time.perf_counter() - start
        result[arm] = metrics
    return result
