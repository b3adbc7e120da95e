"""OV-circuit decomposition of a task vector's effect (LTV, "Mechanism analyses").

A vector injected at layer ``l`` (residual after block ``l``) and position ``p`` writes
``c = scale · θ`` into the residual stream (added, or replacing it). Every later head
``(l', h)``, ``l' > l``, reads ``c`` through its OV circuit along the direct path. With
``s[b, p]`` the head's input-RMSNorm scale (``blocks.{l'}.ln1.hook_scale``, the rms of the
residual *in the injected run*) and ``w`` the norm's weight,

    θ̂[b]            = c · w / s[b, p]                                  (RMSNorm at frozen scale)
    weighted[b, h]  = A[b, h, q, p] · θ̂[b] @ W_V[kv(h)] @ W_O[h]        [B, H, d_model]
    packaged[h]     = θ̂̄ @ W_V[kv(h)] @ W_O[h],  θ̂̄ = c · w / mean_b s[b, p]   [H, d_model]

with ``q`` the query's last position and ``kv(h) = h // (n_heads // n_kv_heads)`` (GQA
shares ``W_V`` across query heads). RMSNorm is not linear in its input —
``norm(x + θ) − norm(x)`` depends on ``x`` — so θ̂ freezes the run's own scale: at that
scale the norm is linear and the head's value at ``p`` splits exactly into the θ̂ part and
the rest. This makes the decomposition exact:

    attn_out[l'][b, q] = Σ_h weighted[b, h] + Σ_h rest[b, h] + b_O,
    rest[b, h] = Σ_{k≠p} A[q,k] v[k] W_O + A[q,p] (v[p] − θ̂ W_V) W_O,

and with attention patterns and the norm scale frozen, ``weighted`` is exactly a head's
output with θ minus without θ when ``l' = l + 1`` (both checked in the tests). LayerNorm
models would also subtract the mean of θ; this module supports RMSNorm (Llama, SmolLM2,
Gemma) and refuses others.

Direct logit attribution (DLA) of a term t on the answer token y through the final norm at
its frozen scale ``s_f[b, q]`` (``ln_final.hook_scale``): ``(t · w_f / s_f) @ W_U[:, y]``.

Re-injection test (:func:`reinjection_test`): remove θ and instead *add* at the query's
last position, at each later layer ``l'`` (residual after block ``l'``), that layer's
summed terms — the attention-weighted ones (per example), the packaged ones, or the
*MLP path*: the change of block ``l'``'s MLP output at ``q`` caused by θ
(``mlp_out^θ − mlp_out^0``, per example, all paths). ``where="final"`` adds the total at
the last layer instead. The terms of a prompt come from the decomposition of the batch
it runs in (:class:`Reinjection`, an intervention computing them from the batch it is
bound to), so the packaged terms' mean scale ``mean_b s[b, p]`` is over each forward's
``batch_size`` prompts. Every accuracy is scored by :func:`tvlens.evaluation.evaluate` on
one prompt set (so each has its CI) and reported as the fraction of θ's gain recovered,
``(acc_reinjected − acc_zero_shot) / (acc_θ − acc_zero_shot)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import ci_list, single_vector
from tvlens.errors import TvlensError
from tvlens.evaluation import evaluate, resolve_template
from tvlens.interventions import Intervention
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.runner import chunks, run
from tvlens.stats import Accuracy
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector


@dataclass
class OVDecomposition:
    """Per-head OV terms of one vector over one batch; see the module docstring.

    Attributes:
        layer, position: where the vector is injected.
        later_layers: ``l + 1 .. L − 1`` (the layers whose heads are decomposed).
        weighted: ``[B, L', H, d_model]`` attention-weighted terms at the query position.
        packaged: ``[L', H, d_model]`` terms without attention weights.
        attention: ``[B, L', H]`` the weights ``A[q, p]``.
        dla_weighted: ``[B, L', H]`` DLA of each weighted term on the answer token.
        dla_packaged: ``[L', H]`` DLA of each packaged term (mean over the batch).
    """

    layer: int
    position: object
    later_layers: list[int]
    weighted: Tensor
    packaged: Tensor
    attention: Tensor
    dla_weighted: Tensor
    dla_packaged: Tensor
    extras: dict = field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "later_layers": self.later_layers,
            "dla_weighted": self.dla_weighted.mean(0).tolist(),
            "dla_packaged": self.dla_packaged.tolist(),
            "attention": self.attention.mean(0).tolist(),
        }


def _check(model, vector: TaskVector):
    """``single_vector``'s ``(layer, position, c)`` of a vector the decomposition can take."""
    norm = str(getattr(model.cfg, "normalization_type", "RMS") or "RMS")
    if not norm.upper().startswith("RMS"):
        raise TvlensError(f"the OV decomposition supports RMSNorm models; this one uses {norm!r}")
    layer, position, c = single_vector(model, vector)
    L = int(model.cfg.n_layers)
    if layer >= L - 1:
        raise TvlensError(f"the vector sits at the last layer ({layer}); no later heads read it. "
                          f"Use a vector at layer < {L - 1}")
    return layer, position, c


def ov_decomposition(model, batch: PromptBatch | PromptSet, vector: TaskVector) -> OVDecomposition:
    """Decompose the direct OV effect of ``vector`` on every later head, for ``batch``.

    One forward pass with the vector injected, capturing the later layers' ``ln1`` scales
    and attention patterns and the final norm's scale.
    """
    layer, position, c = _check(model, vector)
    batch = getattr(batch, "batch", batch)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    later = list(range(layer + 1, L))
    names = [f"blocks.{j}.ln1.hook_scale" for j in later] + \
            [f"blocks.{j}.attn.hook_pattern" for j in later] + ["ln_final.hook_scale"]
    store = run(model, batch, vector, capture=names, capture_at=None, logits=None,
                batch_size=None, progress=False).captured
    dev = c.device
    rows = torch.arange(len(batch), device=dev)
    p = batch.position_index(position).to(dev)
    q = batch.position_index("last").to(dev)
    weighted, packaged, attn = [], [], []
    for j in later:
        blk = model.blocks[j]
        w = blk.ln1.weight.detach().float()
        s = store[f"blocks.{j}.ln1.hook_scale"].to(dev).float()[rows, p, 0]  # [B]
        theta_hat = c[None] * w[None] / s[:, None]  # [B, d]
        WV = blk.attn.W_V.detach().float()  # [K, d, dh]: one per KV head
        WO = blk.attn.W_O.detach().float()  # [H, dh, d]
        # GQA: query head h reads KV head h // (H / K)
        WV_h = einops.repeat(WV, "kv m e -> (kv rep) m e", rep=H // WV.shape[0])  # [H, d, dh]
        ov = einops.einsum(theta_hat, WV_h, WO, "b m, h m e, h e n -> b h n")  # [B, H, d]
        a = store[f"blocks.{j}.attn.hook_pattern"].to(dev).float()[rows, :, q, p]  # [B, H]
        weighted.append(a[..., None] * ov)
        attn.append(a)
        pk_hat = c * w / s.mean()
        packaged.append(einops.einsum(pk_hat, WV_h, WO, "m, h m e, h e n -> h n"))
    weighted_t = torch.stack(weighted, 1)  # [B, L', H, d]
    packaged_t = torch.stack(packaged, 0)  # [L', H, d]
    s_f = store["ln_final.hook_scale"].to(dev).float()[rows, q, 0]  # [B]
    u = _answer_readout(model, batch)  # [B, d]: w_f * W_U[:, y]
    dla_w = einops.einsum(weighted_t, u, "b l h d, b d -> b l h") / s_f[:, None, None]
    dla_p = (einops.einsum(packaged_t, u, "l h d, b d -> b l h") / s_f[:, None, None]).mean(0)
    return OVDecomposition(layer, position, later, weighted_t, packaged_t, torch.stack(attn, 1),
                           dla_w, dla_p)


def _answer_readout(model, batch: PromptBatch) -> Float[Tensor, "batch d_model"]:
    """``w_f ⊙ W_U[:, y_b]``: the direction whose dot product / s_f is the answer logit."""
    WU = model.W_U.detach().float()
    y = batch.first_answer_ids.to(WU.device)
    return model.ln_final.weight.detach().float()[None] * WU[:, y].T


def mlp_path_terms(model, batch: PromptBatch | PromptSet, vector: TaskVector
                   ) -> Float[Tensor, "batch later d_model"]:
    """``mlp_out^θ[q] − mlp_out^0[q]`` of each later block: θ's effect through the MLPs."""
    layer, _, _ = single_vector(model, vector)
    names = [f"blocks.{j}.hook_mlp_out" for j in range(layer + 1, int(model.cfg.n_layers))]
    on, off = (run(model, batch, iv, capture=names, capture_at="last", logits=None, batch_size=None,
                   progress=False).captured for iv in (vector, None))
    return torch.stack([(on[n] - off[n]).float() for n in names], 1)


KINDS = ("ov_weighted", "ov_packaged", "mlp")


class _Terms:
    """The summed terms of each batch a :class:`Reinjection` runs on, computed once."""

    def __init__(self, vector: TaskVector):
        self.vector = vector
        self._store: dict = {}

    def get(self, model, batch: PromptBatch) -> dict[str, Tensor]:
        key = (tuple(batch.prompts), batch.seq_len)
        if key not in self._store:
            dec = ov_decomposition(model, batch, self.vector)
            self._store[key] = {"ov_weighted": dec.weighted.sum(2),  # [B, L', d]
                                "ov_packaged": dec.packaged.sum(1),  # [L', d]
                                "mlp": mlp_path_terms(model, batch, self.vector),  # [B, L', d]
                                "dla_packaged": dec.dla_packaged, "later": dec.later_layers}
        return self._store[key]


class Reinjection(Intervention):
    """Instead of θ, add the ``kind`` terms (``"ov_weighted"``, ``"ov_packaged"``,
    ``"mlp"``) of the batch it is bound to at the query's last position: after each later
    layer (``where="layers"``) or their total after the last layer (``"final"``)."""

    def __init__(self, vector: TaskVector, kind: str, where: str = "layers", terms: _Terms | None = None):
        if kind not in KINDS:
            raise TvlensError(f"re-injected terms must be one of {KINDS}, got {kind!r}")
        if where not in ("layers", "final"):
            raise TvlensError(f"where must be 'layers' or 'final', got {where!r}")
        self.vector, self.kind, self.where = vector, kind, where
        self.terms = terms if terms is not None else _Terms(vector)

    @property
    def made_for(self):
        return self.vector.model

    @property
    def template(self):
        return self.vector.template

    def describe(self) -> str:
        return f"Reinjection({self.kind}, {self.where})"

    def hooks(self, model, batch: PromptBatch):
        got = self.terms.get(model, batch)
        terms = got[self.kind]  # [B, L', d] per prompt, or [L', d] shared
        if self.where == "final":
            terms, layers = terms.sum(-2, keepdim=True), [int(model.cfg.n_layers) - 1]
        else:
            layers = got["later"]
        v = replace(self.vector, vectors=terms.unsqueeze(-2).to(self.vector.vectors.dtype),
                    layers=tuple(layers), positions=("last",), mode="add", scale=1.0, history={})
        return v.hooks(model, batch)


@dataclass
class ReinjectionResult:
    """Accuracies (with CIs) of zero-shot, θ and each re-injection, on one prompt set."""

    task: str
    layer: int
    where: str
    template: str
    later_layers: list[int]
    accuracies: dict[str, Accuracy]  # zero_shot, vector, ov_weighted, ov_packaged, mlp
    dla_packaged: Float[Tensor, "later head"]

    @property
    def n(self) -> int:
        return self.accuracies["zero_shot"].n

    def recovery(self, kind: str) -> float:
        """``(acc_kind − acc_zero) / (acc_θ − acc_zero)``; NaN when θ gains nothing (no gain
        to recover)."""
        zero, vec = self.accuracies["zero_shot"].value, self.accuracies["vector"].value
        gain = vec - zero
        return (self.accuracies[kind].value - zero) / gain if gain > 1e-12 else float("nan")

    def to_dict(self) -> dict:
        acc = self.accuracies
        out = {"zero_shot": acc["zero_shot"].value, "vector_accuracy": acc["vector"].value}
        out.update({f"{k}_accuracy": acc[k].value for k in KINDS})
        out.update({f"{k}_recovery": self.recovery(k) for k in KINDS})
        out.update(layer=self.layer, n=self.n, where=self.where, task=self.task,
                   later_layers=self.later_layers, dla_packaged=self.dla_packaged.tolist())
        out.update({f"{k}_ci": ci_list(a) for k, a in acc.items()}, template=self.template)
        return out

    def to_frame(self):
        """Accuracy with CI per condition, and the fraction of θ's gain each recovers."""
        from tvlens.results import accuracy_frame

        df = accuracy_frame(self.accuracies)
        df["recovery"] = [self.recovery(k) if k in KINDS else float("nan") for k in df["condition"]]
        return df

    def figure(self, title: str = "packaged OV term: DLA on the answer"):
        from tvlens.attribution.figures import ov_dla_heatmap

        return ov_dla_heatmap(self.to_dict(), title)


def reinjection_test(model, task: Task, vector: TaskVector, *, n: int = 32, split: str = "test",
                     template=None, where: str = "layers", batch_size: int = 16,
                     seed: int = 0) -> ReinjectionResult:
    """Fractions of θ's accuracy gain recovered by re-injected OV and MLP-path terms.

    Args:
        template: the prompt format (default: the vector's own, else ``"arrow"``).
        where: ``"layers"`` — add each later layer's summed terms after that block, at the
            query's last position; ``"final"`` — add their total after the last block.
        batch_size: rows per forward; the packaged terms are per forward (module docstring).

    ``to_dict()`` has ``zero_shot``, ``vector_accuracy``, ``ov_weighted_accuracy``,
    ``ov_packaged_accuracy``, ``mlp_accuracy`` with their ``*_ci``, the matching
    ``*_recovery`` fractions (NaN when θ gains nothing or loses accuracy: there is no gain
    to recover), ``dla_packaged`` ([L', H] head DLA, mean over prompts) and ``template``.
    """
    if where not in ("layers", "final"):
        raise TvlensError(f"where must be 'layers' or 'final', got {where!r}")
    layer, _, _ = _check(model, vector)
    prompts = PromptSet.build(model, task, split=split, n=n, seed=seed,
                              template=resolve_template(vector, template, what="reinjection_test"))
    terms = _Terms(vector)
    conditions = {"zero_shot": None, "vector": vector,
                  **{k: Reinjection(vector, k, where, terms) for k in KINDS}}
    accs = {k: evaluate(model, task, vector=iv, prompts=prompts, batch_size=batch_size, seed=seed,
                        progress=False).interval for k, iv in conditions.items()}
    # the same chunks evaluate ran: the terms are cached per chunk
    parts = [terms.get(model, part) for part in chunks(prompts.batch, batch_size)]
    dla = sum(p["dla_packaged"] * len(p["mlp"]) for p in parts) / len(prompts)
    return ReinjectionResult(task.name, layer, where, prompts.template_name,
                             list(range(layer + 1, int(model.cfg.n_layers))), accs, dla.cpu())


__all__ = ["KINDS", "OVDecomposition", "Reinjection", "ReinjectionResult", "mlp_path_terms",
           "ov_decomposition", "reinjection_test"]
