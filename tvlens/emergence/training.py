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
the query's arrow through :class:`tvlens.injection.InjectionSpec` (``mode="replace"``,
per-example vectors ``[B, 1, 1, d_model]``), so gradients reach the ICL pass through
``v`` (Yang et al. 2025, "Task vectors in in-context learning: emergence, formation,
and benefits"). ``λ = 0`` is the plain ICL baseline (the zero-shot forward is skipped).

Training is seeded AdamW with a linear warm-up and gradient clipping; checkpoints hold
the parameters, optimizer state, the data generator's state and the history, so a run
resumed from a checkpoint ends with the same parameters as one run straight through.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from tvlens.emergence.synthetic import (
    FAMILIES, ICLBatch, SyntheticTask, Vocab, sample_batch, task_split, task_tables,
    y_positions,
)
from tvlens.errors import TvlensError
from tvlens.injection import InjectionSpec, injection_hooks, resid_hook_name
from tvlens.prompts import Example, PromptBatch

CHECKPOINT = "checkpoint.pt"
# Fields that may change between a checkpoint and its resumption.
_RESUMABLE = {"steps", "eval_every", "checkpoint_every", "n_eval"}


@dataclass(frozen=True)
class TVPConfig:
    """Everything that defines a run (saved with every checkpoint as ``config.json``).

    Data: ``n_values`` values, ``families``, ``n_heldout`` held-out parameters per family,
    ``n_permutations`` training permutations, ``n_pairs`` pairs per training sequence,
    ``ood_pairs`` pairs for the long-context test. Model: ``n_layers``, ``d_model``,
    ``n_heads``, ``positional`` (``"rotary"`` / ``"standard"``), ``n_ctx`` (default
    ``4·max(n_pairs, ood_pairs)``). Loss: ``tvp_layer`` ℓ and ``tvp_lambda`` λ.
    Optimisation: ``steps``, ``batch_size``, ``lr``, ``weight_decay``, ``warmup``, ``seed``.
    Logging: evaluate every ``eval_every`` steps on ``n_eval`` prompts (0: never),
    checkpoint every ``checkpoint_every`` steps (0: only at the end).
    """

    n_values: int = 16
    families: Sequence[str] = ("offset",)  # stored as a tuple (__post_init__)
    n_heldout: int = 3
    n_permutations: int = 8
    n_pairs: int = 8
    ood_pairs: int = 16
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    positional: str = "rotary"
    n_ctx: int | None = None
    tvp_layer: int = 1
    tvp_lambda: float = 1.0
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    n_eval: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(self.families))

    @property
    def context(self) -> int:
        return self.n_ctx if self.n_ctx is not None else 4 * max(self.n_pairs, self.ood_pairs)

    def validate(self) -> TVPConfig:
        """Raise :class:`TvlensError` naming the first bad field and its fix."""
        if not isinstance(self.tvp_lambda, (int, float)) or not self.tvp_lambda >= 0:
            raise TvlensError(f"tvp_lambda must be >= 0 (0 turns TVP off), got {self.tvp_lambda!r}")
        if not 0 <= self.tvp_layer < self.n_layers:
            raise TvlensError(
                f"tvp_layer {self.tvp_layer} is outside the model: it has layers 0..{self.n_layers - 1}"
            )
        for f in self.families:
            if f not in FAMILIES:
                raise TvlensError(f"unknown task family {f!r}; use some of {FAMILIES}")
        if self.positional not in ("rotary", "standard"):
            raise TvlensError(f"positional must be 'rotary' or 'standard', got {self.positional!r}")
        need = 4 * max(self.n_pairs, self.ood_pairs)
        if need > self.context:
            raise TvlensError(
                f"{max(self.n_pairs, self.ood_pairs)} pairs need {need} tokens, beyond n_ctx="
                f"{self.context}; raise n_ctx or use fewer pairs"
            )
        for name in ("n_pairs", "ood_pairs", "steps", "batch_size", "n_layers", "n_eval"):
            if getattr(self, name) < 1:
                raise TvlensError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise TvlensError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        task_split(self.families, self.n_values, n_heldout=self.n_heldout,
                   n_permutations=self.n_permutations, seed=self.seed)  # vocabulary checks
        return self

    def tasks(self) -> tuple[list[SyntheticTask], list[SyntheticTask]]:
        """(train tasks, held-out tasks) of this config."""
        return task_split(self.families, self.n_values, n_heldout=self.n_heldout,
                          n_permutations=self.n_permutations, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["families"] = list(self.families)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> TVPConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TvlensError(f"unknown TVP config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def build_model(cfg: TVPConfig):
    """A fresh native model (``tvlens.tiny_model``) sized by ``cfg``, seeded by ``cfg.seed``."""
    from tvlens.models.loading import tiny_model

    return tiny_model(d_vocab=Vocab(cfg.n_values).d_vocab, n_layers=cfg.n_layers,
                      d_model=cfg.d_model, n_heads=cfg.n_heads, n_ctx=cfg.context,
                      positional=cfg.positional, seed=cfg.seed, name="tvp-synthetic")


def query_batch(query_ids: Tensor, answers: Tensor, n_values: int) -> PromptBatch:
    """A :class:`PromptBatch` of zero-shot queries ``BOS x ->`` (separator = the arrow)."""
    B = query_ids.shape[0]
    xs, ys = query_ids[:, 1].tolist(), answers.tolist()
    return PromptBatch(
        query_ids, torch.ones_like(query_ids),
        examples=[Example(x=str(x), y=str(y)) for x, y in zip(xs, ys)],
        prompts=[f"<bos> {x} ->" for x in xs], answer_ids=[[y] for y in ys],
        separator_index=[2] * B,
    )


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
    qb = query_batch(batch.query_ids, batch.query_answers, n_values).to(device)
    spec = InjectionSpec(layers=(layer,), positions=("last",),
                         vectors=extracted[:, None, None, :], mode="replace")
    hooks = injection_hooks(model, qb, spec)

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


def _params(model) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def save_checkpoint(path: str | Path, run: TrainRun, optimizer, data_gen: torch.Generator) -> Path:
    """Write ``run`` (parameters, optimizer, data RNG, history) atomically to ``path``."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": run.config.to_dict(), "step": run.step, "params": _params(run.model),
                "optimizer": optimizer.state_dict(), "data_rng": data_gen.get_state(),
                "history": run.history}, tmp)
    os.replace(tmp, path)
    (path.parent / "config.json").write_text(json.dumps(run.config.to_dict(), indent=2))
    return path


def load_model(folder: str | Path):
    """The trained model of a run folder (its ``checkpoint.pt``) and its config."""
    ckpt = _read_checkpoint(Path(folder) / CHECKPOINT)
    cfg = TVPConfig.from_dict(ckpt["config"])
    model = build_model(cfg)
    _load_params(model, ckpt["params"])
    return model, cfg


def _read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TvlensError(f"no checkpoint at {str(path)!r}; train first (tvlens tvp train --out DIR)")
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_params(model, params: dict[str, Tensor]) -> None:
    own = dict(model.named_parameters())
    if set(own) != set(params):
        raise TvlensError("checkpoint parameters do not match this model's; was the config changed?")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(params[n])


def train(cfg: TVPConfig, *, out_dir: str | Path | None = None, resume: bool = False,
          log: Callable[[dict], None] | None = None) -> TrainRun:
    """Train a model on ``cfg``'s training tasks with ``L_ICL + λ·L_TVP``.

    Args:
        out_dir: folder for ``checkpoint.pt`` / ``config.json`` (written every
            ``checkpoint_every`` steps and at the end); None keeps everything in memory.
        resume: continue from ``out_dir/checkpoint.pt`` up to ``cfg.steps`` (only
            ``steps``, ``eval_every``, ``checkpoint_every``, ``n_eval`` may differ).
        log: called with every history entry (step, losses, accuracies).
    """
    from tvlens.emergence.measure import training_metrics

    cfg.validate()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    run = TrainRun(model, cfg, 0)
    folder = Path(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    if resume:
        if folder is None:
            raise TvlensError("resume needs out_dir (the folder holding checkpoint.pt)")
        ckpt = _read_checkpoint(folder / CHECKPOINT)
        saved = TVPConfig.from_dict(ckpt["config"])
        if replace(saved, **{k: getattr(cfg, k) for k in _RESUMABLE}) != cfg:
            raise TvlensError("the checkpoint was trained with another config; resume with the "
                              f"same config (only {sorted(_RESUMABLE)} may change)")
        _load_params(model, ckpt["params"])
        opt.load_state_dict(ckpt["optimizer"])
        data_gen.set_state(ckpt["data_rng"])
        run.step, run.history = ckpt["step"], ckpt["history"]
    train_tasks, _ = cfg.tasks()
    tables = task_tables(train_tasks)
    sums = {"loss": 0.0, "icl_loss": 0.0, "tvp_loss": 0.0, "n": 0}
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
            sums = dict.fromkeys(sums, 0.0)
            sums["n"] = 0
            if log:
                log(entry)
        if folder is not None and cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save_checkpoint(folder / CHECKPOINT, run, opt, data_gen)
    model.eval()
    run.seconds = time.perf_counter() - start
    if folder is not None:
        save_checkpoint(folder / CHECKPOINT, run, opt, data_gen)
    return run
