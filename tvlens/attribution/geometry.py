"""Rotation vs scaling: is a vector's effect on the final residual a fixed linear map?

For a vector θ at layer ``l`` (one position), let ``Δ(θ')`` be the change of the residual
after the last block at the query's last position when θ' is injected (same mode as θ)
instead of nothing. Fit ``W ∈ R^{d×d}`` with ``Δ(θ') ≈ W θ'`` (through the origin) from
``N`` noise-perturbed copies

    θ'_i = θ + λ ‖θ‖ ε_i / √d,     ε_i ~ N(0, I)    (λ = ``noise``, relative to ‖θ‖),

copy ``i`` injected into zero-shot train prompt ``i mod B`` (``batch_size`` copies per
forward). Ridge regression, ``X = [θ'_i]``, ``Y = [Δ_i]`` (rows):

    Wᵀ = (XᵀX + α I)⁻¹ XᵀY,     α = ridge · tr(XᵀX) / d.

``ridge = 0`` is ordinary least squares and needs ``N_fit ≥ d + 1`` copies (refused
otherwise); with ``ridge > 0`` fewer work. 20% of the copies are held out for ``fit_r2``
(``1 − SS_res / SS_tot`` on held-out copies, ``SS_tot`` around the held-out mean).

Checks: ``linear_accuracy`` adds ``W θ`` after the last block at the query instead of
injecting θ; it, θ's accuracy and zero-shot are scored by :func:`tvlens.evaluation.evaluate`
on one test prompt set (the vector's own format unless told otherwise), each with its CI.
Polar decomposition ``W = Q S`` (from the SVD ``W = U Σ Vᵀ``: ``Q = U Vᵀ`` orthogonal,
``S = V Σ Vᵀ`` symmetric PSD): rotation ``cos(θ, Qθ)``, scaling ``‖Sθ‖/‖θ‖``.
Logit lens of a vector ``v``: ``(v / rms(v) ⊙ w_f) @ W_U`` — its top tokens, the mean rank
of the task's answer tokens, and the task alignment (mean z-score of the answer tokens'
logits over the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import ci_list, single_vector
from tvlens.errors import TvlensError
from tvlens.evaluation import evaluate, resolve_template
from tvlens.interventions import resid_hook_name
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.runner import run
from tvlens.stats import Accuracy
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector


def fit_linear_map(X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"], ridge: float = 0.0
                   ) -> Float[Tensor, "d_out d_in"]:
    """``W`` minimising ``‖X Wᵀ − Y‖² + α‖W‖²``, ``α = ridge · tr(XᵀX)/d_in`` (float64 solve)."""
    n, d = X.shape
    if ridge < 0:
        raise TvlensError(f"ridge must be >= 0, got {ridge}")
    if ridge == 0 and n < d + 1:
        raise TvlensError(f"an unregularised fit of a {d}×{d} map needs at least {d + 1} copies, "
                          f"got {n}; give more copies or ridge > 0")
    Xd, Yd = X.double(), Y.double()
    G = Xd.T @ Xd
    alpha = ridge * float(torch.trace(G)) / d
    Wt = torch.linalg.solve(G + alpha * torch.eye(d, dtype=G.dtype, device=G.device), Xd.T @ Yd)
    return Wt.T.float()


def polar(W: Float[Tensor, "d d"]) -> tuple[Float[Tensor, "d d"], Float[Tensor, "d d"]]:
    """``W = Q S`` with ``Q`` orthogonal and ``S`` symmetric positive semidefinite (via SVD)."""
    U, sig, Vh = torch.linalg.svd(W.double())
    Q = U @ Vh
    S = Vh.T @ torch.diag(sig) @ Vh
    return Q.float(), ((S + S.T) / 2).float()


def r2(Y: Tensor, Y_hat: Tensor) -> float:
    ss_res = ((Y - Y_hat) ** 2).sum()
    ss_tot = ((Y - Y.mean(0, keepdim=True)) ** 2).sum()
    return float(1 - ss_res / ss_tot)


def final_change(model, batch: PromptBatch | PromptSet, vector: TaskVector,
                 thetas: Float[Tensor, "n d_model"], *, batch_size: int = 256) -> Float[Tensor, "n d_model"]:
    """``Δ_i``: final residual at the query with ``thetas[i]`` injected (at ``vector``'s layer,
    position and mode, scale 1) into prompt ``i mod B``, minus that prompt's final residual
    without any injection. ``batch_size``: copies per forward."""
    batch = getattr(batch, "batch", batch)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TvlensError(f"batch_size must be a positive integer, got {batch_size!r}")
    name = resid_hook_name(int(model.cfg.n_layers) - 1)

    def final(prompts, iv=None) -> Tensor:  # [rows, d]: the final residual at the query
        return run(model, prompts, iv, capture=[name], capture_at="last", logits=None,
                   batch_size=None, progress=False).captured[name].float()

    clean = final(batch)  # [B, d]
    out = []
    # one per-copy vector per forward: each forward binds its own rows (a per-example
    # vector cannot be split by the runner's chunks)
    for start in range(0, len(thetas), batch_size):
        idx = [i % len(batch) for i in range(start, min(start + batch_size, len(thetas)))]
        sub = batch.select(idx)
        v = replace(vector, vectors=thetas[start : start + len(idx)].reshape(len(idx), 1, 1, -1)
                    .to(vector.vectors.dtype), scale=1.0, history={})
        out.append(final(sub, v) - clean[idx])
    return torch.cat(out)


def logit_lens(model, v: Float[Tensor, " d_model"], answer_ids: list[int], *, k: int = 10) -> dict:
    """Top-``k`` tokens of ``v`` under the logit lens, answer-token ranks and task alignment."""
    v = v.float().to(model.W_U.device)
    x = v / v.pow(2).mean().add(float(getattr(model.cfg, "eps", 1e-6))).sqrt()
    logits = (x * model.ln_final.weight.detach().float()) @ model.W_U.detach().float()
    order = logits.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device)
    ids = torch.as_tensor(sorted(set(answer_ids)), device=logits.device)
    z = (logits - logits.mean()) / logits.std()
    tok = model.tokenizer
    top = order[:k].tolist()
    return {"top_tokens": [tok.decode([i]) if tok is not None else str(i) for i in top],
            "answer_rank_mean": float(ranks[ids].float().mean()),
            "answer_rank_best": int(ranks[ids].min()),
            "alignment": float(z[ids].mean())}


@dataclass
class RotationScaling:
    """The fitted map of one vector and what it says; ``to_dict()`` is plain JSON (no ``W``).

    Attributes:
        W: ``[d_model, d_model]`` the fitted map, ``Δ(θ') ≈ W θ'``.
        accuracies: ``vector`` (θ injected), ``linear`` (``Wθ`` added after the last block),
            ``zero_shot``, each with its CI, on the same prompts.
        logit_lens: of ``theta``, ``Q_theta`` and ``W_theta`` (:func:`logit_lens`).
    """

    layer: int
    n_copies: int
    noise: float
    ridge: float
    fit_r2: float
    rotation_cos: float
    scale_ratio: float
    accuracies: dict[str, Accuracy]
    logit_lens: dict
    W: Float[Tensor, "d_model d_model"]
    template: str

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
        return {"layer": self.layer, "n_copies": self.n_copies, "noise": self.noise,
                "ridge": self.ridge, "fit_r2": self.fit_r2,
                "vector_accuracy": self.vector_accuracy, "linear_accuracy": self.linear_accuracy,
                "zero_shot": self.zero_shot, "rotation_cos": self.rotation_cos,
                "scale_ratio": self.scale_ratio, "logit_lens": self.logit_lens,
                **{f"{k}_ci": ci_list(a) for k, a in self.accuracies.items()},
                "template": self.template}


def rotation_scaling(model, task: Task, vector: TaskVector, *, n_copies: int = 1024,
                     noise: float = 0.5, ridge: float = 1e-2, n: int = 32, n_fit_prompts: int = 16,
                     template=None, seed: int = 0, batch_size: int = 256) -> RotationScaling:
    """Fit ``W_l`` for one vector and report R², linear accuracy, rotation, scaling, lens.

    Args:
        n_copies: perturbed copies (80% fit, 20% held out for R²).
        noise: λ, the noise norm relative to ‖θ‖.
        ridge: regulariser (see the module docstring); 0 = least squares.
        n: test prompts for the accuracies; n_fit_prompts: train prompts the copies cycle over.
        template: the prompt format (default: the vector's own, else ``"arrow"``).
        batch_size: rows per forward (perturbed copies of the fit, prompts of the accuracies).
    """
    layer, position, c = single_vector(model, vector)
    d = int(model.cfg.d_model)
    n_fit = int(n_copies * 0.8)
    if n_copies < 10:
        raise TvlensError(f"n_copies={n_copies} is too few: give at least 10 (with ridge > 0) or "
                          f"{int((d + 1) / 0.8) + 1} for an unregularised fit of d_model={d}")
    if ridge == 0 and n_fit < d + 1:
        raise TvlensError(f"an unregularised fit needs ≥ {d + 1} fitting copies (80% of n_copies), "
                          f"i.e. n_copies ≥ {int((d + 1) / 0.8) + 1} for d_model={d}; got "
                          f"{n_copies}. Give more copies or ridge > 0")
    template = resolve_template(vector, template, what="rotation_scaling")
    cvec = c.cpu()  # the injected value, scale · θ
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n_copies, d, generator=gen)
    X = cvec[None] + noise * cvec.norm() * eps / d ** 0.5
    fit_prompts = PromptSet.build(model, task, split="train", n=n_fit_prompts, template=template,
                                  seed=seed)
    Y = final_change(model, fit_prompts, vector, X.to(model.cfg.device), batch_size=batch_size).cpu()
    W = fit_linear_map(X[:n_fit], Y[:n_fit], ridge)
    fit_r2 = r2(Y[n_fit:], X[n_fit:] @ W.T)
    Q, S = polar(W)
    Wt, Qt, St = W @ cvec, Q @ cvec, S @ cvec
    prompts = PromptSet.build(model, task, n=n, template=template, seed=seed)
    lin = replace(vector, vectors=Wt.reshape(1, 1, -1).to(vector.vectors.dtype),
                  layers=(int(model.cfg.n_layers) - 1,), positions=("last",), mode="add",
                  scale=1.0, history={})
    accs = {k: evaluate(model, task, vector=iv, prompts=prompts, batch_size=batch_size, seed=seed,
                        progress=False).interval
            for k, iv in (("vector", vector), ("linear", lin), ("zero_shot", None))}
    answers = prompts.batch.first_answer_ids.tolist()
    lens = {"theta": logit_lens(model, cvec, answers), "Q_theta": logit_lens(model, Qt, answers),
            "W_theta": logit_lens(model, Wt, answers)}
    return RotationScaling(
        layer, n_copies, noise, ridge, fit_r2,
        float(torch.nn.functional.cosine_similarity(cvec, Qt, dim=0)),
        float(St.norm() / cvec.norm()), accs, lens, W, prompts.template_name)


def geometry_sweep(model, task: Task, vectors: dict[int, TaskVector], **kwargs) -> dict:
    """:func:`rotation_scaling` for one vector per layer; lists aligned with ``layers``
    (plain JSON: accuracies with their ``*_ci``, the logit lenses, the ``template``)."""
    if not vectors:
        raise TvlensError("no vectors given: pass {layer: TaskVector}")
    layers = sorted(vectors)
    rows = [rotation_scaling(model, task, vectors[layer], **kwargs).to_dict() for layer in layers]
    out: dict = {"task": task.name, "layers": layers}
    for key in ("rotation_cos", "scale_ratio", "fit_r2", "linear_accuracy", "vector_accuracy",
                "zero_shot", "vector_ci", "linear_ci", "zero_shot_ci"):
        out[key] = [r[key] for r in rows]
    out["logit_lens"] = [r["logit_lens"] for r in rows]
    names = [r["template"] for r in rows]
    out["template"] = names[0] if len(set(names)) == 1 else names  # a list, aligned, if they differ
    return out
