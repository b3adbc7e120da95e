"""Learned task vectors (LTV): θ trained by gradient descent, injected additively.

θ holds one free vector per (layer, position) pair of the layer set 𝓛 and position set
𝓟, ``[L, P, d_model]``. With the model frozen, at every layer l ∈ 𝓛 and resolved
position p ∈ 𝓟 of a (zero-shot, or K-shot) prompt the residual becomes

    h_l[p] ← h_l[p] + θ[l, p]              (a ResidualEdit, mode "add")

and θ minimises the teacher-forced answer loss (:func:`tvlens.runner.answer_nll`)

    𝓛(θ) = E_(x, y) [ −(1/|y|) Σ_j log p(y_j | prompt(x), y_<j ; θ) ]

with AdamW (weight decay 0.01), as in the LTV paper.

**Learning rate and initialisation.** The paper's lr 1e-3 was set for Llama-3.1-8B; the
step Adam takes is ≈ lr per coordinate whatever the gradient's size, so what matters is
lr relative to the residual stream's per-coordinate scale, which differs by an order of
magnitude between models and between layers (SmolLM2-135M: RMS ≈ 2 after block 0, ≈ 6
at layer 10, ≈ 22 at layer 27). tvlens therefore trains φ with θ[l] = s_l · φ[l], where
s_l is the residual RMS ‖h_l‖/√d_model at the injection positions (measured once on the
train prompts), so ``lr`` is in units of "fractions of the residual's scale per step" and
one default works at every layer and for layer sets mixing early and late layers. AdamW's
decoupled weight decay is the same on φ and θ (θ = sφ is linear). θ starts at zero: step
0 *is* the zero-shot model, no random direction has to be unlearned, and the vector's
norm grows only as far as the loss asks. ``relative_lr=False`` gives the paper's
parametrisation (s_l = 1, lr absolute). See docs/results/history/learned.md for the measurements.

**Early stopping and the returned θ.** Every ``dev_every`` steps θ is evaluated on the
dev split (first-token accuracy, ties broken by the mean first-token log-probability);
training stops after ``patience`` evaluations without improvement, and the best θ on dev
is returned. ``history["stopped"]`` says which ended training: ``"dev"`` (patience ran
out) or ``"budget"`` (``steps`` ran out first: the vector may not have converged). The
default budget (LTVConfig.steps) is large enough that dev does the stopping on the
built-in tasks and on small task files (docs/results/history/learned.md).

**Prefix caching** (:mod:`tvlens.learn.prefix`): blocks 0..min 𝓛 are computed once per
training row and skipped at every step. ``history["prefix_cache"]`` says whether it was
used, ``history["prefix_cache_note"]`` why not.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tvlens.progress import tqdm

from tvlens.errors import TvlensError
from tvlens.evaluation import evaluate
from tvlens.interventions import ResidualEdit, check_layer, resid_hook_name
from tvlens.learn import checkpoint as ckpt
from tvlens.learn.prefix import (CACHE_BUDGET_BYTES, cache_nbytes, cached_forward,
                                 capture_prefix, prefix_cache_support)
from tvlens.methods import LTVConfig
from tvlens.models.loading import fingerprint
from tvlens.forward import TeacherForcedBatch, answer_nll, pad_id, with_answers
from tvlens.prompts import Position, PromptBatch, PromptSet, Template, get_template, template_name
from tvlens.runner import run, trim
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector

_DEFAULTS = LTVConfig()


def _check_args(model, layers, positions, steps, lr, batch_size, dev_every, patience,
                checkpoint_every, shots):
    if len(layers) == 0:
        raise TvlensError("no layers to train at: give at least one layer (e.g. layers=[10])")
    if len(positions) == 0:
        raise TvlensError("no positions to train at: give at least one (e.g. positions=['last'])")
    for layer in layers:
        check_layer(model, layer)
    if len(set(layers)) != len(layers):
        raise TvlensError(f"layers {tuple(layers)} repeat a layer; list each layer once")
    if len(set(map(str, positions))) != len(positions):
        raise TvlensError(f"positions {tuple(positions)} repeat a position; list each once")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("dev_every", dev_every),
                        ("checkpoint_every", checkpoint_every), ("patience", patience)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TvlensError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TvlensError(f"lr must be a positive number, got {lr!r}")
    if shots < 0:
        raise TvlensError(f"shots must be >= 0, got {shots}")


def _check_positions(batch: PromptBatch, positions: Sequence[Position], split: str) -> None:
    for p in positions:
        if p != "all":
            try:
                batch.position_index(p)
            except TvlensError as err:
                raise TvlensError(f"{split} prompts: {err}") from None


def _task_hash(task: Task) -> str:
    return hashlib.sha256(json.dumps([task.pairs, task.seed, task.fractions]).encode()).hexdigest()[:16]


def select_rows(tf: TeacherForcedBatch, rows: list[int]) -> TeacherForcedBatch:
    """Rows of a teacher-forced batch, leading all-padding columns trimmed."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    prompt = trim(tf.prompt.select(rows))  # left padding: leading columns
    lead = tf.prompt.seq_len - prompt.seq_len
    return TeacherForcedBatch(tf.input_ids[idx][:, lead:], tf.attention_mask[idx][:, lead:],
                              tf.targets[idx], prompt)


def _residual_rms(model, batch: PromptBatch, layers, positions) -> Tensor:
    """s_l: mean residual RMS ‖h_l‖/√d at the injection positions, ``[L]``."""
    names = [resid_hook_name(layer) for layer in layers]
    store = run(model, batch, capture=names, capture_at=None, logits=None, batch_size=None,
                progress=False).captured
    out = []
    for n in names:
        vals = [store[n][batch.position_entries(p)] for p in positions]
        h = torch.cat(vals).float()
        out.append(h.norm(dim=-1).mean() / math.sqrt(h.shape[-1]))
    return torch.stack(out).cpu()


def ltv_loss(model, batch: TeacherForcedBatch, layers: Sequence[int],
             positions: Sequence[Position], theta: Float[Tensor, "layer pos d_model"],
             *, prefix: tuple[int, Tensor, bool] | None = None) -> Float[Tensor, ""]:
    """Mean answer NLL of ``batch`` with θ added at ``layers`` × ``positions``.

    The loss is :func:`tvlens.runner.answer_nll` over the teacher-forced rows with a
    :class:`~tvlens.interventions.ResidualEdit` (add θ) bound to the prompts. Only the
    ``A`` columns that predict answer tokens (``prompt_len − 1 … prompt_len + A − 2``)
    are unembedded, as one ``[B·A, d_model] @ W_U`` product: the loss and ∂/∂θ are those
    of the full-sequence logits (tested), without the vocabulary-sized cost per column.
    ``prefix = (l, h_l, as_tuple)`` runs the cached path: blocks 0..l skipped, the
    residual after block l replaced by ``h_l`` ``[batch, seq, d_model]`` (from
    :func:`~tvlens.learn.prefix.capture_prefix` over the same batch), then θ added. It
    requires l ≤ min(layers); the loss and ∂/∂θ equal the full forward's.
    """
    hooks = ResidualEdit(tuple(layers), tuple(positions), theta, "add").hooks(model, batch.prompt)
    if prefix is None:
        return answer_nll(model, batch, hooks).mean()
    layer, cached, as_tuple = prefix
    if layer > min(layers):
        raise TvlensError(f"prefix cached up to layer {layer}, but θ sits at layer {min(layers)}; "
                          "cache at most up to min(layers)")
    with cached_forward(model, layer, cached, as_tuple) as first:
        return answer_nll(model, batch, [first] + hooks).mean()


def ltv_settings(config: LTVConfig | None = None, **given) -> LTVConfig:
    """``config`` with the keywords that differ from the defaults on top
    (:meth:`MethodConfig.merged`)."""
    return LTVConfig.merged(config, **given)


def learn_task_vector(
    model,
    task: Task,
    layers: int | Sequence[int],
    positions: Position | Sequence[Position] = ("last",),
    *,
    config: LTVConfig | None = None,
    shots: int = _DEFAULTS.shots,
    steps: int = _DEFAULTS.steps,
    lr: float = _DEFAULTS.lr,
    batch_size: int = _DEFAULTS.batch_size,
    init: str | Tensor = _DEFAULTS.init,
    seed: int = _DEFAULTS.seed,
    dev_every: int = _DEFAULTS.dev_every,
    patience: int = _DEFAULTS.patience,
    n_dev: int | None = _DEFAULTS.n_dev,
    weight_decay: float = _DEFAULTS.weight_decay,
    relative_lr: bool = _DEFAULTS.relative_lr,
    template: str | Template = _DEFAULTS.template,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 20,
    resume: bool = False,
    prefix_cache: bool = True,
    progress: bool = True,
) -> TaskVector:
    """Train an additive task vector for ``task`` at ``layers`` × ``positions``.

    Args:
        layers, positions: 𝓛 and 𝓟 (a single value or a sequence each).
        config: the settings as an :class:`~tvlens.methods.LTVConfig`; the keywords
            below that differ from their defaults override it.
        shots: demonstrations in each training/dev prompt (0: zero-shot, the LTV default;
            K > 0 trains θ on top of K-shot ICL prompts).
        steps: maximum optimiser steps (early stopping may end sooner).
        lr: AdamW learning rate, in units of the residual RMS when ``relative_lr``.
        batch_size: training prompts per step (sampled without replacement per step).
        init: ``"zero"``, ``"random"`` (Gaussian, 0.1 × the residual RMS), or a tensor
            ``[L, P, d_model]`` (θ itself; recorded as ``"tensor"``).
        seed: batch sampling, random init and demonstration sampling.
        dev_every, patience, n_dev: dev evaluation period (steps), evaluations without
            improvement before stopping, dev items scored (first ``n_dev``).
        template: the prompt format (recorded by name, so ``evaluate`` reuses it).
        checkpoint_dir, checkpoint_every, resume: write a checkpoint every N steps;
            ``resume=True`` continues from it (refused if task, model or configuration
            differ).
        prefix_cache: skip blocks 0..min 𝓛 at every step (see :mod:`tvlens.learn.prefix`).

    Returns:
        An add-mode :class:`TaskVector` (method ``"ltv"``), the best θ on dev, whose
        ``hyperparameters`` are the config's ``to_dict()`` and whose ``history`` holds
        ``loss`` (per step), ``dev`` (step, accuracy, logprob), ``train_seconds``,
        ``best_step``, ``steps_run``, ``stopped`` (``"dev"``: early stopping ended
        training; ``"budget"``: ``steps`` ran out while dev was still improving — raise
        ``steps``), ``stopped_early`` (``stopped == "dev"``), ``prefix_cache``.

    Raises:
        TvlensError: empty layer/position set, a position outside some prompt, steps ≤ 0,
            a checkpoint from another run on resume, or a NaN/Inf loss (the last good
            checkpoint is kept).
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    positions = [positions] if isinstance(positions, (int, str)) else list(positions)
    init_tensor = init if isinstance(init, Tensor) else None
    cfg = ltv_settings(config, shots=shots, steps=steps, lr=lr, batch_size=batch_size,
                       init="tensor" if init_tensor is not None else init, seed=seed,
                       dev_every=dev_every, patience=patience, n_dev=n_dev,
                       weight_decay=weight_decay, relative_lr=relative_lr,
                       template=template_name(template))
    _check_args(model, layers, positions, cfg.steps, cfg.lr, cfg.batch_size, cfg.dev_every,
                cfg.patience, checkpoint_every, cfg.shots)
    # a Template object given as the keyword is used as is (its name may drop a prefix)
    tmpl = get_template(template if template_name(template) != _DEFAULTS.template or config is None
                        else cfg.template)

    train = PromptSet.build(model, task, split="train", shots=cfg.shots, template=tmpl, seed=cfg.seed)
    _check_positions(train.batch, positions, "train")
    if not task.dev:
        raise TvlensError(f"task {task.name!r} has no dev items for early stopping; use a larger task")
    dev = PromptSet.build(model, task, split="dev", n=cfg.n_dev or None, shots=cfg.shots,
                          template=tmpl, seed=cfg.seed)
    _check_positions(dev.batch, positions, "dev")
    tf = with_answers(train.batch, pad_id(model))

    # what a checkpoint must share to be resumed (steps and patience may change)
    run_id = {"task": task.name, "task_hash": _task_hash(task), "model": fingerprint(model).to_dict(),
              "layers": layers, "positions": positions,
              **{k: v for k, v in cfg.to_dict().items() if k not in ("steps", "patience")},
              "template": tmpl.demo, "n_dev": len(dev)}
    path = ckpt.checkpoint_path(checkpoint_dir) if checkpoint_dir is not None else None
    if path is not None:
        if not path.parent.is_dir():
            raise TvlensError(f"checkpoint folder {str(path.parent)!r} does not exist; create it first")
        if path.exists() and not resume:
            raise TvlensError(f"{str(path)!r} exists; pass resume=True (CLI: --resume) to continue "
                              "from it, or use another checkpoint_dir")

    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in flags:
            p.requires_grad_(False)
        return _train(model, task, layers, positions, cfg, init_tensor, tf, dev, run_id,
                      path, checkpoint_every, resume, prefix_cache, progress)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)


def _init_phi(cfg: LTVConfig, init_tensor, shape, scale, gen, device) -> Tensor:
    if init_tensor is not None:
        if tuple(init_tensor.shape) != shape:
            raise TvlensError(f"init tensor of shape {tuple(init_tensor.shape)}; expected {shape}")
        return init_tensor.detach().float().to(device) / scale[:, None, None]
    if cfg.init == "zero":
        return torch.zeros(*shape, device=device)
    if cfg.init == "random":
        return 0.1 * torch.randn(*shape, generator=gen).to(device)
    raise TvlensError(f"unknown init {cfg.init!r}; use 'zero', 'random' or a tensor [L, P, d_model]")


def _train(model, task, layers, positions, cfg: LTVConfig, init_tensor, tf, dev: PromptSet,
           run_id, path, checkpoint_every, resume, prefix_cache, progress) -> TaskVector:
    t0 = time.perf_counter()
    device = model.cfg.device
    dtype = next(model.parameters()).dtype
    N, L, P, d_model = len(tf.prompt), len(layers), len(positions), int(model.cfg.d_model)
    steps, dev_every = cfg.steps, cfg.dev_every
    probe = tf.prompt.select(list(range(min(N, 32))))
    rms = _residual_rms(model, probe, layers, positions)
    scale = (rms if cfg.relative_lr else torch.ones(L)).to(device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    phi = nn.Parameter(_init_phi(cfg, init_tensor, (L, P, d_model), scale, gen, device).clone())
    opt = torch.optim.AdamW([phi], lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "loss": [], "dev": [], "best": None, "best_step": 0, "bad": 0,
             "stopped_early": False}
    best_phi = phi.detach().clone()

    if resume and path is not None and path.exists():
        tensors, meta = ckpt.load_checkpoint(path)
        diff = ckpt.config_mismatch(meta["config"], run_id)
        if diff:
            raise TvlensError(f"checkpoint {str(path)!r} is from another run ({'; '.join(diff)}); "
                              "use another checkpoint_dir or the same settings")
        with torch.no_grad():
            phi.copy_(tensors["phi"].to(device))
        best_phi = tensors["best_phi"].to(device)
        opt.state[phi] = {"step": tensors["adam_step"], "exp_avg": tensors["exp_avg"].to(device),
                          "exp_avg_sq": tensors["exp_avg_sq"].to(device)}
        gen.set_state(tensors["rng"])
        state.update(meta["state"])

    use_cache, note = False, ""
    l0 = min(layers)
    if prefix_cache:
        ok, note = prefix_cache_support(model, l0)
        need = cache_nbytes(N, tf.input_ids.shape[1], d_model, dtype)
        if ok and need > CACHE_BUDGET_BYTES:
            ok, note = False, f"the cache would take {need / 1e9:.1f} GB"
        if ok:
            cache, as_tuple = capture_prefix(model, tf, l0)
            use_cache = True
        else:
            warnings.warn(f"prefix caching off, training with the full forward: {note}", stacklevel=3)
    else:
        note = "disabled by the caller"

    def theta() -> Tensor:
        return (scale[:, None, None] * phi).to(dtype)

    def vector(phi_value: Tensor, history: dict) -> TaskVector:
        return TaskVector(vectors=(scale[:, None, None] * phi_value).detach().to(dtype),
                          layers=tuple(layers), positions=tuple(positions), model=fingerprint(model),
                          mode="add", method="ltv", hyperparameters=cfg.to_dict(),
                          task=task.name, history=history)

    def save() -> None:
        a = opt.state.get(phi, {})
        tensors = {"phi": phi, "best_phi": best_phi, "rng": gen.get_state(),
                   "exp_avg": a.get("exp_avg", torch.zeros_like(phi)),
                   "exp_avg_sq": a.get("exp_avg_sq", torch.zeros_like(phi)),
                   "adam_step": torch.as_tensor(a.get("step", 0.0), dtype=torch.float32).reshape(())}
        ckpt.save_checkpoint(path, tensors, {"config": run_id, "state": state})

    def diverged(what: str):
        kept = (f"; the last good checkpoint is kept at {str(path)!r}"
                if path is not None and path.exists() else "")
        raise TvlensError(f"training diverged at step {state['step'] + 1}: {what}{kept}; "
                          f"lower lr (now {cfg.lr}) or use init='zero'")

    def dev_eval():
        res = evaluate(model, task, prompts=dev, vector=vector(phi.detach(), {}), seed=cfg.seed,
                       progress=False)
        return res, float(res.records["first_token_logprob"].mean())

    bar = tqdm(total=steps, initial=state["step"], disable=not progress, desc=f"ltv {task.name}")
    try:
        while state["step"] < steps and not state["stopped_early"]:
            rows = torch.randperm(N, generator=gen)[: min(cfg.batch_size, N)].tolist()
            sub = select_rows(tf, rows)
            opt.zero_grad(set_to_none=True)
            prefix = None
            if use_cache:
                lead = tf.input_ids.shape[1] - sub.input_ids.shape[1]
                prefix = (l0, cache[rows][:, lead:], as_tuple)
            loss = ltv_loss(model, sub, layers, positions, theta(), prefix=prefix)
            if not torch.isfinite(loss):
                diverged(f"the loss is {loss.item()}")
            loss.backward()
            opt.step()
            if not torch.isfinite(phi).all():  # checked before any checkpoint of it
                diverged("the update made θ non-finite")
            state["step"] += 1
            state["loss"].append(loss.item())
            bar.update(1)
            step = state["step"]
            if step % dev_every == 0:
                res, lp = dev_eval()
                state["dev"].append({"step": step, "accuracy": res.accuracy, "logprob": lp})
                if state["best"] is None or (res.accuracy, lp) > tuple(state["best"]):
                    state["best"], state["best_step"], state["bad"] = [res.accuracy, lp], step, 0
                    best_phi = phi.detach().clone()
                else:
                    state["bad"] += 1
                    state["stopped_early"] = state["bad"] >= cfg.patience
                bar.set_postfix(loss=f"{state['loss'][-1]:.3f}", dev=f"{res.accuracy:.2f}")
            else:
                bar.set_postfix(loss=f"{state['loss'][-1]:.3f}")
            if path is not None and (step % checkpoint_every == 0 or step == steps
                                     or state["stopped_early"]):
                save()
    finally:
        bar.close()
    dev_log = list(state["dev"])
    if state["step"] % dev_every and not state["stopped_early"]:
        # the last steps were never scored: score them now, outside the checkpointed
        # state, so an interrupted-and-resumed run keeps the same evaluation schedule
        res, lp = dev_eval()
        dev_log.append({"step": state["step"], "accuracy": res.accuracy, "logprob": lp})
        if state["best"] is None or (res.accuracy, lp) > tuple(state["best"]):
            state["best_step"], best_phi = state["step"], phi.detach().clone()
    history = {"loss": state["loss"], "dev": dev_log, "best_step": state["best_step"],
               "stopped": "dev" if state["stopped_early"] else "budget",
               "stopped_early": state["stopped_early"], "steps_run": state["step"],
               "train_seconds": time.perf_counter() - t0, "prefix_cache": use_cache,
               "prefix_cache_note": note, "residual_rms": rms.tolist()}
    return vector(best_phi, history)
