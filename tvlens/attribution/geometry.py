"""Rotation vs scaling: is a vector's effect on the final residual a fixed linear map?

For a vector θ at layer ``l`` (one position) and a prompt ``b``, let ``Δ_b(θ')`` be the
change of the residual after the last block at the query's last position when θ' is
injected (same mode as θ) instead of nothing. ``N`` noise-perturbed copies

    θ'_i = c + λ ‖c‖ ε_i / √d,     ε_i ~ N(0, I)    (c = scale · θ, λ = ``noise``)

are each injected into every one of ``B`` zero-shot train prompts, giving the grid
``Δ[b, i] = Δ_b(θ'_i)`` ``[B, N, d]`` (:func:`final_change_grid`). The map is fitted
through the origin by ridge regression, ``X = [θ'_i]`` (rows, the first ``N_fit`` copies):

    Wᵀ = (XᵀX + α I)⁻¹ XᵀY,     α = ridge · tr(XᵀX) / d,

with ``Y`` one of three designs (:data:`DESIGNS`, all fitted from the one grid):

- ``"per_prompt"`` (default): ``Y = Δ[b]``, one map ``W_b`` per prompt — the prompt is
  fixed, so only θ' varies and ``W_b`` can explain all of ``Δ_b``. Reported as the mean over
  prompts with the percentile-bootstrap 95% interval over prompts (:func:`tvlens.stats.accuracy`).
- ``"mean"``: ``Y = mean_b Δ[b]``, the prompt-averaged change. Least squares is linear in
  ``Y``, so its map is exactly ``W̄ = mean_b W_b``.
- ``"mixed"``: copy ``i`` paired with prompt ``i mod B`` only (tvlens ≤ 0.4's design): ``W``
  cannot depend on the prompt, so the prompt-to-prompt variance of Δ is left unexplained
  and its held-out R² is low or negative by construction. Kept as a control.

``ridge = 0`` is least squares and needs ``N_fit ≥ d + 1`` (:func:`copies_needed`);
``N − N_fit = N // 5`` copies (≥ 2) are held out for ``fit_r2 = 1 − SS_res / SS_tot`` on
them (``SS_tot`` around their mean). Polar decomposition ``W = Q S`` (SVD ``W = U Σ Vᵀ``:
``Q = U Vᵀ`` orthogonal, ``S = V Σ Vᵀ`` symmetric PSD): rotation ``cos(c, Qc)``, scaling
``‖Sc‖/‖c‖``. Check: ``linear`` accuracy adds ``W̄c`` (the ``mixed`` design: its own ``W``)
after the last block at the query instead of injecting θ; it, θ's accuracy and zero-shot are
scored together on one test prompt set (:func:`tvlens.evaluation.condition_accuracies`), each
with its CI. The
logit lens (:func:`tvlens.attribution.readout.logit_lens`) reads c, Qc and Wc through the
model's own final norm and unembedding.

The grid is one :func:`~tvlens.runner.run_variants` call (the copies along the batch). With
a vector at the last position and a Hugging Face model, its forwards share each prompt's
prefix through the checked KV prefix cache (:mod:`tvlens.kv_cache`): only the last token
runs per copy; otherwise (native models, other positions) full forwards.
:func:`final_change` (one forward per chunk of copies, no stacking, no cache) is the
reference path the grid is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import ci_list, single_vector
from tvlens.attribution.readout import logit_lens
from tvlens.errors import TvlensError
from tvlens.evaluation import condition_accuracies, resolve_template
from tvlens.interventions import ResidualEdit, resid_hook_name
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.runner import run, run_variants
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector

DESIGNS = ("per_prompt", "mean", "mixed")


def held_out(n_copies: int) -> int:
    """Copies held out for R²: ``max(2, n_copies // 5)``."""
    return max(2, n_copies // 5)


def copies_needed(d: int) -> int:
    """The fewest ``n_copies`` whose fitting part (all but :func:`held_out`) is ``≥ d + 1``,
    what an unregularised fit of a ``d × d`` map needs."""
    n = d + 3
    while n - held_out(n) < d + 1:
        n += 1
    return n


def fit_linear_map(X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"], ridge: float = 0.0
                   ) -> Float[Tensor, "d_out d_in"]:
    """``W`` minimising ``‖X Wᵀ − Y‖² + α‖W‖²``, ``α = ridge · tr(XᵀX)/d_in`` (float64)."""
    return (_solver(X, ridge) @ Y.double()).T.float()


def _solver(X: Float[Tensor, "n d"], ridge: float) -> Float[Tensor, "d n"]:
    """``(XᵀX + αI)⁻¹ Xᵀ`` in float64 (so ``Wᵀ = solver @ Y``), refusing a singular design."""
    n, d = X.shape
    if ridge < 0:
        raise TvlensError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0 and n < d + 1:
        raise TvlensError(f"an unregularised fit of a {d}×{d} map needs at least {d + 1} copies, "
                          f"got {n}; give more copies or ridge > 0")
    Xd = X.double()
    G = Xd.T @ Xd
    alpha = ridge * float(torch.trace(G)) / d
    return torch.linalg.solve(G + alpha * torch.eye(d, dtype=G.dtype, device=G.device), Xd.T)


def polar(W: Float[Tensor, "d d"]) -> tuple[Float[Tensor, "d d"], Float[Tensor, "d d"]]:
    """``W = Q S`` with ``Q`` orthogonal and ``S`` symmetric positive semidefinite (via SVD)."""
    U, sig, Vh = torch.linalg.svd(W.double())
    Q = U @ Vh
    S = Vh.T @ torch.diag(sig) @ Vh
    return Q.float(), ((S + S.T) / 2).float()


def r2(Y: Tensor, Y_hat: Tensor) -> float:
    """``1 − Σ(Y − Ŷ)² / Σ(Y − Ȳ)²`` over all rows and columns (``Ȳ``: the column means)."""
    ss_res = ((Y - Y_hat) ** 2).sum()
    ss_tot = ((Y - Y.mean(0, keepdim=True)) ** 2).sum()
    return float(1 - ss_res / ss_tot)


def _geometry(W: Tensor, c: Tensor) -> tuple[float, float]:
    """``(cos(c, Qc), ‖Sc‖/‖c‖)`` of ``W = QS``."""
    Q, S = polar(W)
    return (float(torch.nn.functional.cosine_similarity(c, Q @ c, dim=0)),
            float((S @ c).norm() / c.norm()))


def fit_designs(X: Float[Tensor, "n d"], D: Float[Tensor, "prompts n d"], c: Float[Tensor, " d"], *,
                ridge: float, n_fit: int, seed: int = 0) -> dict:
    """Fit every design of the module docstring from the grid ``D[b, i] = Δ_b(X[i])``.

    Returns ``{design: {"W", "rotation_cos", "scale_ratio", "fit_r2", "train_r2"}}``
    (``train_r2``: R² on the fitting copies; least squares with ``N_fit`` near ``d`` fits
    noise, its held-out residual growing as ``1 + d / (N_fit − d − 1)``, so a gap between the
    two says "more copies or ridge", not "nonlinear"). ``per_prompt``'s numbers are
    :class:`~tvlens.stats.Accuracy` (mean over prompts, bootstrap CI over prompts), with the
    per-prompt values under ``"values"`` and the maps under ``"Ws"``.
    """
    B, N, d = D.shape
    if not 0 < n_fit <= N - 2:
        raise TvlensError(f"n_fit={n_fit} must leave at least 2 of {N} copies held out")
    Xf, Xh = X[:n_fit].double(), X[n_fit:].double()
    M = _solver(X[:n_fit], ridge)  # [d, n_fit]

    def scores(W: Tensor, Y: Tensor) -> dict:  # W [d, d] float64, Y [N, d] the copies' Δ
        cos, sc = _geometry(W.float(), c)
        return {"rotation_cos": cos, "scale_ratio": sc, "fit_r2": r2(Y[n_fit:], Xh @ W.T),
                "train_r2": r2(Y[:n_fit], Xf @ W.T)}

    Dd = D.double()
    Ws = torch.einsum("dn,bne->bed", M, Dd[:, :n_fit])  # W_b = (M D_b)ᵀ
    rows = [scores(Ws[b], Dd[b]) for b in range(B)]
    vals = {k: [r[k] for r in rows] for k in rows[0]}
    out = {"per_prompt": {"W": Ws.mean(0).float(), "Ws": Ws.float(), "values": vals,
                          **{k: accuracy(v, seed=seed) for k, v in vals.items()}}}
    W_bar = Ws.mean(0)  # = the fit of the prompt-averaged Δ (least squares is linear in Y)
    out["mean"] = {"W": W_bar.float(), **scores(W_bar, Dd.mean(0))}
    Ym = Dd[torch.arange(N) % B, torch.arange(N)]  # copy i in prompt i mod B
    W_mix = (M @ Ym[:n_fit]).T
    out["mixed"] = {"W": W_mix.float(), **scores(W_mix, Ym)}
    return out


def _final(model, prompts, iv=None) -> Tensor:
    """[rows, d]: the final residual at the query (one forward)."""
    name = resid_hook_name(int(model.cfg.n_layers) - 1)
    return run(model, prompts, iv, capture=[name], capture_at="last", logits=None,
               batch_size=None, progress=False).captured[name].float()


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TvlensError(f"batch_size must be a positive integer, got {batch_size!r}")


def final_change(model, batch: PromptBatch | PromptSet, vector: TaskVector,
                 thetas: Float[Tensor, "n d_model"], *, prompt_of: list[int] | None = None,
                 batch_size: int = 256) -> Float[Tensor, "n d_model"]:
    """``Δ_i``: final residual at the query with ``thetas[i]`` injected (at ``vector``'s layer,
    position and mode, scale 1) into prompt ``prompt_of[i]`` (default ``i mod B``), minus that
    prompt's final residual without any injection. Full forwards (the reference path);
    ``batch_size``: copies per forward."""
    batch = getattr(batch, "batch", batch)
    _check_batch_size(batch_size)
    prompt_of = [i % len(batch) for i in range(len(thetas))] if prompt_of is None else list(prompt_of)
    if len(prompt_of) != len(thetas) or any(not 0 <= b < len(batch) for b in prompt_of):
        raise TvlensError(f"prompt_of needs one prompt index in [0, {len(batch)}) per copy")
    clean = _final(model, batch)  # [B, d]
    out = []
    # one per-copy vector per forward: each forward binds its own rows (a per-example
    # vector cannot be split by the runner's chunks)
    for start in range(0, len(thetas), batch_size):
        idx = prompt_of[start : start + batch_size]
        v = replace(vector, vectors=thetas[start : start + len(idx)].reshape(len(idx), 1, 1, -1)
                    .to(vector.vectors.dtype), scale=1.0, history={})
        out.append(_final(model, batch.select(idx), v) - clean[idx])
    return torch.cat(out)


def final_change_grid(model, batch: PromptBatch | PromptSet, vector: TaskVector,
                      thetas: Float[Tensor, "n d_model"], *, batch_size: int = 256,
                      prefix_cache: bool | str = "auto") -> tuple[Float[Tensor, "prompts n d_model"], bool]:
    """``(Δ, cached)``: ``Δ[b, i]`` = :func:`final_change` of ``thetas[i]`` in prompt ``b``,
    for every prompt and copy; ``cached``: whether the KV prefix cache ran.

    One :func:`~tvlens.runner.run_variants` call: copy ``i`` is the variant that writes
    ``thetas[i]`` where ``vector`` sits (its layer, position and mode, scale 1), every
    prompt's copies go along the batch (one merged write per forward,
    :meth:`~tvlens.interventions.ResidualEdit.stack`), and the final residual at the query
    is captured. ``prefix_cache``: ``"auto"`` uses the KV prefix cache when the vector sits
    at the last position and the model has a checked Hugging Face cache, ``True`` requires
    it, ``False`` never. ``batch_size``: rows (prompts × copies) per forward.
    """
    batch = getattr(batch, "batch", batch)
    _check_batch_size(batch_size)
    layer, position, _ = single_vector(model, vector)
    if prefix_cache == "auto" and position not in ("last", -1):
        prefix_cache = False  # nothing to share: the copies differ before the query
    dtype = vector.vectors.dtype
    variants = [ResidualEdit((layer,), (position,), th.reshape(1, 1, -1).to(dtype), vector.mode, 1.0)
                for th in thetas]
    name = resid_hook_name(int(model.cfg.n_layers) - 1)
    out = run_variants(model, batch, variants, batch_size=batch_size, prefix_cache=prefix_cache,
                       capture=name, desc="copies")
    D = out.captured.transpose(0, 1).float() - out.base_captured.float()[:, None]
    return D, out.prefix_cache


@dataclass
class RotationScaling:
    """The fitted maps of one vector and what they say; ``to_dict()`` is plain JSON (no ``W``).

    Attributes:
        design: which design the headline ``fit_r2``, ``rotation_cos``, ``scale_ratio`` are of
            (``per_prompt``: means over prompts, with ``intervals`` over prompts).
        designs: every design's numbers (``per_prompt`` with its per-prompt ``values``).
        W: ``[d_model, d_model]`` the map of the linear check: ``W̄ = mean_b W_b`` (the
            ``mixed`` design: its own).
        accuracies: ``vector`` (θ injected), ``linear`` (``Wc`` added after the last block),
            ``zero_shot``, each with its CI, on the same prompts.
        logit_lens: of ``theta``, ``Q_theta`` and ``W_theta`` (with ``W``'s polar ``Q``).
    """

    layer: int
    n_copies: int
    n_fit_prompts: int
    noise: float
    ridge: float
    design: str
    fit_r2: float
    rotation_cos: float
    scale_ratio: float
    intervals: dict[str, Accuracy | None]
    designs: dict
    accuracies: dict[str, Accuracy]
    logit_lens: dict
    W: Float[Tensor, "d_model d_model"]
    template: str
    prefix_cache: bool = False
    Ws: Tensor | None = field(default=None, repr=False)

    @property
    def vector_accuracy(self) -> float:
        return self.accuracies["vector"].value

    @property
    def linear_accuracy(self) -> float:
        return self.accuracies["linear"].value

    @property
    def zero_shot(self) -> float:
        return self.accuracies["zero_shot"].value

    def to_frame(self):
        """Accuracy with CI of θ, of its linear readout Wθ, and zero-shot."""
        from tvlens.results import accuracy_frame

        return accuracy_frame(self.accuracies)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "design": self.design, "n_copies": self.n_copies,
                "n_fit_prompts": self.n_fit_prompts, "noise": self.noise, "ridge": self.ridge,
                "fit_r2": self.fit_r2, "rotation_cos": self.rotation_cos,
                "scale_ratio": self.scale_ratio,
                **{f"{k}_ci": ci_list(a) for k, a in self.intervals.items()},
                "designs": self.designs,
                "vector_accuracy": self.vector_accuracy, "linear_accuracy": self.linear_accuracy,
                "zero_shot": self.zero_shot, "logit_lens": self.logit_lens,
                **{f"{k}_ci": ci_list(a) for k, a in self.accuracies.items()},
                "template": self.template, "prefix_cache": self.prefix_cache}


def _plain(fit: dict) -> dict:
    """A design's numbers as JSON (no maps; an Accuracy as its value, CI and n)."""
    out = {}
    for k, v in fit.items():
        if isinstance(v, Accuracy):
            out[k], out[f"{k}_ci"] = v.value, ci_list(v)
        elif k not in ("W", "Ws"):
            out[k] = v
    return out


def rotation_scaling(model, task: Task, vector: TaskVector, *, n_copies: int = 1024,
                     noise: float = 0.5, ridge: float = 1e-2, design: str = "per_prompt",
                     n: int = 32, n_fit_prompts: int = 8, template=None, seed: int = 0,
                     batch_size: int = 256, prefix_cache: bool | str = "auto") -> RotationScaling:
    """Fit ``W`` for one vector (every design, module docstring) and report R², rotation,
    scaling, the linear check and the logit lens.

    Args:
        n_copies: perturbed copies, each injected into every fit prompt (``n_copies ×
            n_fit_prompts`` rows); :func:`held_out` of them kept for R². Held-out R² needs
            ``N_fit`` of several ``d`` (SmolLM2, layer 15: −0.05 at 1.1 d, 0.56 at 4 d).
        noise: λ, the noise norm relative to ‖c‖.
        ridge: regulariser (module docstring); 0 = least squares, needs
            ``n_copies ≥ copies_needed(d_model)``.
        design: the headline design, one of :data:`DESIGNS`.
        n: test prompts for the accuracies; n_fit_prompts: train prompts of the fit (B).
        template: the prompt format (default: the vector's own, else ``"arrow"``).
        batch_size: rows per forward; prefix_cache: as in :func:`final_change_grid`.
    """
    if design not in DESIGNS:
        raise TvlensError(f"unknown design {design!r}; use one of {', '.join(DESIGNS)}")
    layer, position, c = single_vector(model, vector)
    d = int(model.cfg.d_model)
    if isinstance(n_copies, bool) or not isinstance(n_copies, int) or n_copies < 10:
        raise TvlensError(f"n_copies={n_copies!r} is too few: give at least 10 (with ridge > 0) "
                          f"or {copies_needed(d)} for an unregularised fit of d_model={d}")
    n_fit = n_copies - held_out(n_copies)
    if ridge == 0 and n_fit < d + 1:
        raise TvlensError(f"an unregularised fit (ridge=0) of a {d}×{d} map needs ≥ {d + 1} fitting "
                          f"copies, i.e. n_copies ≥ {copies_needed(d)} for d_model={d} "
                          f"({held_out(copies_needed(d))} held out); got n_copies={n_copies}. "
                          "Give more copies or ridge > 0")
    if isinstance(n_fit_prompts, bool) or not isinstance(n_fit_prompts, int) or n_fit_prompts < 2:
        raise TvlensError(f"n_fit_prompts must be an integer ≥ 2 (a distribution over prompts), "
                          f"got {n_fit_prompts!r}")
    template = resolve_template(vector, template, what="rotation_scaling")
    cvec = c.cpu()  # the injected value, scale · θ
    gen = torch.Generator().manual_seed(seed)
    X = cvec[None] + noise * cvec.norm() * torch.randn(n_copies, d, generator=gen) / d ** 0.5
    fit_prompts = PromptSet.build(model, task, split="train", n=n_fit_prompts, template=template,
                                  seed=seed)
    D, cached = final_change_grid(model, fit_prompts, vector, X.to(model.cfg.device),
                                  batch_size=batch_size, prefix_cache=prefix_cache)
    fits = fit_designs(X, D.cpu(), cvec, ridge=ridge, n_fit=n_fit, seed=seed)
    head = fits[design]
    W = head["W"]
    Q, _ = polar(W)
    Wt, Qt = W @ cvec, Q @ cvec
    prompts = PromptSet.build(model, task, n=n, template=template, seed=seed)
    lin = replace(vector, vectors=Wt.reshape(1, 1, -1).to(vector.vectors.dtype),
                  layers=(int(model.cfg.n_layers) - 1,), positions=("last",), mode="add",
                  scale=1.0, history={})
    accs = condition_accuracies(model, prompts, {"vector": vector, "linear": lin, "zero_shot": None},
                                batch_size=batch_size, seed=seed, prefix_cache=prefix_cache)
    answers = prompts.batch.first_answer_ids.tolist()
    lens = {"theta": logit_lens(model, cvec, answers), "Q_theta": logit_lens(model, Qt, answers),
            "W_theta": logit_lens(model, Wt, answers)}
    keys = ("fit_r2", "rotation_cos", "scale_ratio")
    value = lambda x: x.value if isinstance(x, Accuracy) else float(x)  # noqa: E731
    intervals = {k: head[k] if isinstance(head[k], Accuracy) else None for k in keys}
    return RotationScaling(
        layer, n_copies, n_fit_prompts, noise, ridge, design, *(value(head[k]) for k in keys),
        intervals, {k: _plain(f) for k, f in fits.items()}, accs, lens, W, prompts.template_name,
        cached, fits["per_prompt"]["Ws"])


SWEEP_KEYS = ("fit_r2", "rotation_cos", "scale_ratio", "fit_r2_ci", "rotation_cos_ci",
              "scale_ratio_ci", "linear_accuracy", "vector_accuracy", "zero_shot", "vector_ci",
              "linear_ci", "zero_shot_ci")


def geometry_sweep(model, task: Task, vectors: dict[int, TaskVector], **kwargs) -> dict:
    """:func:`rotation_scaling` for one vector per layer; lists aligned with ``layers``
    (plain JSON: the headline design's numbers with their ``*_ci`` over prompts, every
    design's numbers under ``designs``, the accuracies with their ``*_ci``, the logit
    lenses, the ``template``)."""
    if not vectors:
        raise TvlensError("no vectors given: pass {layer: TaskVector}")
    layers = sorted(vectors)
    rows = [rotation_scaling(model, task, vectors[layer], **kwargs).to_dict() for layer in layers]
    out: dict = {"task": task.name, "layers": layers, "design": rows[0]["design"]}
    for key in SWEEP_KEYS + ("designs", "logit_lens"):
        out[key] = [r[key] for r in rows]
    names = [r["template"] for r in rows]
    out["template"] = names[0] if len(set(names)) == 1 else names  # a list, aligned, if they differ
    return out
