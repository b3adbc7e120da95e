"""Re-injection of a task vector's path terms (:mod:`tvlens.attribution.ov`) instead of the
vector, at every placement, and the two controls (LTV, "Mechanism analyses"; issue 14).

**Placements** (:data:`PLACEMENTS`) for re-injecting a kind of term *instead of* θ, at ``q``:

    "entry"        where each term enters the residual: blocks.{l'}.hook_attn_out (head terms),
                   blocks.{l'}.hook_mlp_out (MLP terms), per later layer
    "final"        all of them summed, after the last block (hook_resid_post of L − 1)
    "own"          all of them summed, in θ's own place (hook_resid_post of l, position p)
    "after_block"  each later layer's sum after its block (hook_resid_post of l'): tvlens's
                   earlier placement; later MLPs respond to it again

**Controls** (:data:`CONTROLS`): ``"minus_ov"`` — θ injected and its weighted OV terms
subtracted where they enter, at every later layer; ``"frozen_attention"`` — θ injected with
every later attention pattern frozen at its zero-shot value.

Every accuracy is scored by :func:`tvlens.evaluation.evaluate` on one prompt set (so each
has its CI) and reported as the fraction of θ's gain it recovers, ``(acc − acc₀) / (acc_θ −
acc₀)``. The terms of the whole prompt set come from one forward with θ and one without
(:func:`~tvlens.attribution.ov.path_terms`); the conditions then run together through the
one runner (:func:`~tvlens.evaluation.condition_correct`): prompt ``i`` under condition
``j`` in row ``i·c + j``, and on a model with a Hugging Face KV cache the prompts' prefix
runs once for every condition that writes only at the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxtyping import Float
from torch import Tensor

from tvlens.attribution.common import ci_list
from tvlens.attribution.ov import KINDS, PACKAGED, PathTerms, _check, _choose, _names, path_terms
from tvlens.errors import TvlensError
from tvlens.evaluation import condition_correct, resolve_template
from tvlens.interventions import Freeze, Intervention, ResidualEdit, resid_hook_name, validate_spec
from tvlens.prompts import PromptBatch, PromptSet
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task
from tvlens.vector import TaskVector

PLACEMENTS = ("entry", "final", "own", "after_block")
CONTROLS = ("minus_ov", "frozen_attention")


class _Bound(Intervention):
    """An intervention holding one value per prompt of ``terms.prompts``: the runner cuts it to
    each chunk with :meth:`for_rows`, and it refuses prompts it was not computed for."""

    def __init__(self, terms: PathTerms, rows=None):
        self.terms, self.rows = terms, rows

    @property
    def made_for(self):
        return self.terms.vector.model

    @property
    def template(self):
        return self.terms.vector.template

    def for_rows(self, rows):
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__, rows=list(rows))
        return out

    def _rows(self, batch: PromptBatch) -> list[int]:
        rows = list(range(len(self.terms.prompts))) if self.rows is None else self.rows
        if [self.terms.prompts[i] for i in rows] != list(batch.prompts):
            raise TvlensError("these path terms were computed for other prompts; build them with "
                              "path_terms(model, prompts, vector) on the prompts you run")
        return rows


class Reinjection(_Bound):
    """Instead of θ, add the ``kind`` terms (:data:`KINDS`) at ``placement``
    (:data:`PLACEMENTS`), multiplied by ``sign``; see the module docstring."""

    def __init__(self, terms: PathTerms, kind: str, placement: str = "entry", *, sign: float = 1.0):
        super().__init__(terms)
        self.kind = _choose(kind, KINDS, "term kind")
        self.placement = _choose(placement, PLACEMENTS, "placement")
        self.sign = float(sign)

    def describe(self) -> str:
        return f"Reinjection({self.kind}, {self.placement}{', subtracted' if self.sign < 0 else ''})"

    @property
    def last_token_only(self) -> bool:
        """Every placement writes at the query, except ``"own"`` with θ at another position."""
        return self.placement != "own" or self.terms.ov.position in ("last", -1)

    def hooks(self, model, batch: PromptBatch):
        vals = self.sign * self.terms.summed(self.kind)[self._rows(batch)]  # [b, L', d]
        layers, position = self.terms.later_layers, "last"
        if self.placement == "entry":
            site = "hook_attn_out" if self.kind.startswith("ov") else "hook_mlp_out"
            names = [f"blocks.{j}.{site}" for j in layers]
        elif self.placement == "after_block":
            names = [resid_hook_name(j) for j in layers]
        else:
            vals = vals.sum(1, keepdim=True)
            layers = [int(model.cfg.n_layers) - 1 if self.placement == "final" else self.terms.layer]
            position = self.terms.ov.position if self.placement == "own" else "last"
            names = [resid_hook_name(layers[0])]
        # the injection engine's write (add, one vector per row), at these hook points
        edit = ResidualEdit(tuple(layers), (position,), vals[:, :, None], mode="add")
        validate_spec(model, edit, len(batch))
        rows, cols = batch.position_entries(position)

        def make(li):
            def fn(act, hook=None):
                if act.shape[0] != len(batch):
                    raise TvlensError(f"{self.describe()} bound to {len(batch)} prompts ran on "
                                      f"{act.shape[0]}; bind it to the batch you run")
                return edit.write(act, li, [(0, rows, cols)])
            return fn

        return [(name, make(li)) for li, name in enumerate(names)]


class FrozenAttention(_Bound):
    """Every later attention pattern set to its zero-shot value (recorded by
    :func:`path_terms`); compose with θ for the ``"frozen_attention"`` control."""

    def describe(self) -> str:
        return "FrozenAttention(zero-shot patterns of later layers)"

    def hooks(self, model, batch: PromptBatch):
        rows, T = self._rows(batch), batch.seq_len
        # a chunk is left-trimmed: its columns are the whole batch's last T
        acts = {n: a[rows][:, :, -T:, -T:] for n, a in self.terms.clean_patterns.items()}
        return Freeze(acts, made_for=self.made_for).hooks(model, batch)


@dataclass
class ReinjectionResult:
    """Accuracies (with CIs) of zero-shot, θ, each re-injection and each control, on one
    prompt set; ``scores``: each condition's per-prompt correctness (for pooling prompt sets);
    ``terms``: :meth:`PathTerms.summary`."""

    task: str
    layer: int
    template: str
    packaged: str
    later_layers: list[int]
    accuracies: dict[str, Accuracy]
    terms: dict
    dla_packaged: Float[Tensor, "later head"]
    scores: dict = field(default_factory=dict, repr=False)  # per prompt: 1.0 correct, 0.0 not

    @property
    def n(self) -> int:
        return self.accuracies["zero_shot"].n

    @property
    def conditions(self) -> list[str]:
        return [k for k in self.accuracies if k not in ("zero_shot", "vector")]

    def recovery(self, name: str) -> float:
        """``(acc − acc_zero) / (acc_θ − acc_zero)``; NaN when θ gains nothing (no gain to
        recover)."""
        zero, vec = self.accuracies["zero_shot"].value, self.accuracies["vector"].value
        gain = vec - zero
        return (self.accuracies[name].value - zero) / gain if gain > 1e-12 else float("nan")

    def to_dict(self) -> dict:
        acc = self.accuracies
        return {"task": self.task, "layer": self.layer, "n": self.n, "template": self.template,
                "packaged": self.packaged, "later_layers": self.later_layers,
                "zero_shot": acc["zero_shot"].value, "zero_shot_ci": ci_list(acc["zero_shot"]),
                "vector_accuracy": acc["vector"].value, "vector_ci": ci_list(acc["vector"]),
                "conditions": {k: {"accuracy": acc[k].value, "ci": ci_list(acc[k]),
                                   "recovery": self.recovery(k)} for k in self.conditions},
                "terms": self.terms, "dla_packaged": self.dla_packaged.tolist()}

    def to_frame(self):
        """Accuracy with CI per condition, and the fraction of θ's gain each recovers."""
        from tvlens.results import accuracy_frame

        df = accuracy_frame(self.accuracies)
        df["recovery"] = [self.recovery(k) if k in self.conditions else float("nan")
                          for k in df["condition"]]
        return df

    def figure(self, title: str = "path terms re-injected: accuracy"):
        from tvlens.attribution.figures import reinjection_bars

        return reinjection_bars(self.to_dict(), title)


def reinjection_conditions(terms: PathTerms, vector: TaskVector, kinds=KINDS,
                           placements=PLACEMENTS, controls=CONTROLS) -> dict:
    """The conditions :func:`reinjection_test` scores, by name: ``zero_shot`` (None),
    ``vector``, ``f"{kind}@{placement}"`` for each pair, and the controls asked for."""
    conditions = {"zero_shot": None, "vector": vector}
    conditions.update({f"{k}@{pl}": Reinjection(terms, k, pl) for k in kinds for pl in placements})
    if "minus_ov" in controls:
        conditions["minus_ov"] = vector + Reinjection(terms, "ov_weighted", "entry", sign=-1.0)
    if "frozen_attention" in controls:
        conditions["frozen_attention"] = vector + FrozenAttention(terms)
    return conditions


def reinjection_test(model, task: Task, vector: TaskVector, *, n: int = 32, split: str = "test",
                     template=None, kinds=KINDS, placements=PLACEMENTS, controls=CONTROLS,
                     packaged: str = "unweighted", batch_size: int = 64,
                     seed: int = 0) -> ReinjectionResult:
    """Accuracy (CI, recovery) of each kind of term re-injected at each placement, and of the
    controls (module docstring).

    Args:
        template: the prompt format (default: the vector's own, else ``"arrow"``).
        kinds, placements, controls: subsets of :data:`KINDS`, :data:`PLACEMENTS`,
            :data:`CONTROLS`; condition ``f"{kind}@{placement}"`` for each pair.
        packaged: the packaged form, one of :data:`PACKAGED`.
        batch_size: rows (prompts × conditions) per forward of the conditions, which go
            along the batch (:func:`~tvlens.evaluation.condition_correct`); those that
            write only at the query (all but ``frozen_attention``, and ``"own"`` with θ
            before the query) share one KV cache of the prompts' prefix. The terms are computed on the
            whole prompt set at once, so nothing depends on it.

    ``to_dict()`` has ``zero_shot``, ``vector_accuracy`` with ``*_ci``, ``conditions``
    (``{name: {accuracy, ci, recovery}}``; recovery NaN when θ gains nothing), ``terms``
    (norms per layer, attention, DLA) and ``template``.
    """
    kinds = _names(kinds, KINDS, "term kind")
    placements = _names(placements, PLACEMENTS, "placement")
    controls = _names(controls, CONTROLS, "control")
    _choose(packaged, PACKAGED, "packaged form")
    layer, _, _ = _check(model, vector)
    prompts = PromptSet.build(model, task, split=split, n=n, seed=seed,
                              template=resolve_template(vector, template, what="reinjection_test"))
    terms = path_terms(model, prompts, vector, packaged=packaged)
    conditions = reinjection_conditions(terms, vector, kinds, placements, controls)
    scores = condition_correct(model, prompts, conditions, batch_size=batch_size)
    accs = {k: accuracy(v, seed=seed) for k, v in scores.items()}
    return ReinjectionResult(task.name, layer, prompts.template_name, packaged, terms.later_layers,
                             accs, terms.summary(), terms.ov.dla_packaged.cpu(), scores)


__all__ = ["CONTROLS", "PLACEMENTS", "FrozenAttention", "Reinjection", "ReinjectionResult",
           "reinjection_conditions", "reinjection_test"]
