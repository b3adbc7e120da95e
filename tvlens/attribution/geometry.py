"""Rotation vs scaling: is a vector's effect on the final residual a fixed linear map?

For a vector θ at layer ``l`` (one position), let ``Δ(θ')`` be the change of the residual
after the last block at the query's last position when θ' is injected (same mode as θ)
instead of nothing. Fit ``W ∈ R^{d×d}`` with ``Δ(θ') ≈ W θ'`` (through the origin) from
``N`` noise-perturbed copies

    θ'_i = θ + λ ‖θ‖ ε_i / √d,     ε_i ~ N(0, I)    (λ = ``noise``, relative to ‖θ‖),

copy ``i`` injected into zero-shot prompt ``i mod B`` (the copies run as one batched forward
per chunk). Ridge regression, ``X = [θ'_i]``, ``Y = [Δ_i]`` (rows):

    Wᵀ = (XᵀX + α I)⁻¹ XᵀY,     α = ridge · tr(XᵀX) / d.

``ridge = 0`` is ordinary least squares and needs ``N_fit ≥ d + 1`` copies (refused
otherwise); with ``ridge > 0`` fewer work. 20% of the copies are held out for ``fit_r2``
(``1 − SS_res / SS_tot`` on held-out copies, ``SS_tot`` around the held-out mean).

Checks: ``linear_accuracy`` adds ``W θ`` after the last block at the query instead of
injecting θ. Polar decomposition ``W = Q S`` (from the SVD ``W = U Σ Vᵀ``: ``Q = U Vᵀ``
orthogonal, ``S = V Σ Vᵀ`` symmetric PSD): rotation ``cos(θ, Qθ)``, scaling
``‖Sθ‖/‖θ‖``. Logit lens of a vector ``v``: ``(v / rms(v) ⊙ w_f) @ W_U`` — its top tokens,
the mean rank of the task's answer tokens, and the task alignment (mean z-score of the
answer tokens' logits over the vocabulary).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution._common import (
    accuracy, query_batch, single_vector, vector_hooks, with_vectors,
)
from tvlens.activations import at_position, capture
from tvlens.errors import TvlensError
from tvlens.injection import resid_hook_name
from tvlens.prompts import PromptBatch
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


def final_change(model, batch: PromptBatch, vector: TaskVector, thetas: Float[Tensor, "n d_model"],
                 *, chunk: int = 256) -> Float[Tensor, "n d_model"]:
    """``Δ_i``: final residual at the query with ``thetas[i]`` injected (at ``vector``'s layer,
    position and mode, scale 1) into prompt ``i mod B``, minus that prompt's final residual
    without any injection."""
    last = int(model.cfg.n_layers) - 1
    name = resid_hook_name(last)
    with torch.no_grad():
        clean = at_position(capture(model, batch, [name])[name], batch).float()  # [B, d]
        out = []
        for start in range(0, len(thetas), chunk):
            idx = [i % len(batch) for i in range(start, min(start + chunk, len(thetas)))]
            sub = batch.select(idx)
            v = with_vectors(vector, thetas[start : start + len(idx)].reshape(len(idx), 1, 1, -1)
                             .to(vector.vectors.dtype), vector.layers, vector.positions, vector.mode)
            h = at_position(capture(model, sub, [name], v.hooks(model, sub))[name], sub).float()
            out.append(h - clean[idx])
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


def rotation_scaling(model, task: Task, vector: TaskVector, *, n_copies: int = 1024,
                     noise: float = 0.5, ridge: float = 1e-2, n: int = 32, n_fit_prompts: int = 16,
                     template="arrow", seed: int = 0) -> dict:
    """Fit ``W_l`` for one vector and report R², linear accuracy, rotation, scaling, lens.

    Args:
        n_copies: perturbed copies (80% fit, 20% held out for R²).
        noise: λ, the noise norm relative to ‖θ‖.
        ridge: regulariser (see the module docstring); 0 = least squares.
        n: test prompts for the accuracies; n_fit_prompts: train prompts the copies cycle over.
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
    cvec = c.cpu()  # the injected value, scale · θ
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n_copies, d, generator=gen)
    X = cvec[None] + noise * cvec.norm() * eps / d ** 0.5
    fit_batch = query_batch(model, task, n=n_fit_prompts, split="train", template=template, seed=seed)
    Y = final_change(model, fit_batch, vector, X.to(model.cfg.device)).cpu()
    W = fit_linear_map(X[:n_fit], Y[:n_fit], ridge)
    fit_r2 = r2(Y[n_fit:], X[n_fit:] @ W.T)
    Q, S = polar(W)
    Wt, Qt, St = W @ cvec, Q @ cvec, S @ cvec
    batch = query_batch(model, task, n=n, template=template, seed=seed)
    lin = with_vectors(vector, Wt.reshape(1, 1, -1).to(vector.vectors.dtype),
                       (int(model.cfg.n_layers) - 1,), ("last",), "add")
    answers = batch.first_answer_ids.tolist()
    return {
        "layer": layer, "n_copies": n_copies, "noise": noise, "ridge": ridge,
        "fit_r2": fit_r2,
        "vector_accuracy": accuracy(model, batch, vector_hooks(model, vector, batch)),
        "linear_accuracy": accuracy(model, batch, lin.hooks(model, batch)),
        "zero_shot": accuracy(model, batch),
        "rotation_cos": float(torch.nn.functional.cosine_similarity(cvec, Qt, dim=0)),
        "scale_ratio": float(St.norm() / cvec.norm()),
        "logit_lens": {"theta": logit_lens(model, cvec, answers),
                       "Q_theta": logit_lens(model, Qt, answers),
                       "W_theta": logit_lens(model, Wt, answers)},
        "W": W,
    }


def geometry_sweep(model, task: Task, vectors: dict[int, TaskVector], **kwargs) -> dict:
    """:func:`rotation_scaling` for one vector per layer; lists aligned with ``layers``."""
    if not vectors:
        raise TvlensError("no vectors given: pass {layer: TaskVector}")
    layers = sorted(vectors)
    rows = [rotation_scaling(model, task, vectors[layer], **kwargs) for layer in layers]
    out: dict = {"task": task.name, "layers": layers}
    for key in ("rotation_cos", "scale_ratio", "fit_r2", "linear_accuracy", "vector_accuracy",
                "zero_shot"):
        out[key] = [r[key] for r in rows]
    out["logit_lens"] = [r["logit_lens"] for r in rows]
    return out
