"""Layer sweeps and one-call extraction for the three extracted methods.

A sweep evaluates a method's vector injected at each layer ``l`` (first-token accuracy
with a 95% bootstrap CI, the numbers :func:`tvlens.evaluation.evaluate` gives) next to two
references on the same items: zero-shot (no vector) and K-shot ICL. The layers' vectors
and zero-shot are scored together (:func:`tvlens.evaluation.condition_accuracies`: on a
model with a KV cache, the prompts' prefix runs once for every layer whose vector sits at
the last token); ``metric="exact_match"`` decodes, one evaluate per layer. ``layer="auto"`` picks the layer
with the best accuracy on the **dev** split (ties → the earliest layer); the reported
numbers then come from the **test** split, so the choice never sees test items.

Vectors are computed once for all layers: ICL-TV and vanilla read every layer's
residual in the same forwards; the FV (built from heads, whatever the layer) is only
moved from layer to layer.

The defaults (K, template and every other setting) are the method configs'
(:mod:`tvlens.methods.configs`, the one table of per-method conventions); a setting given
as a keyword (``n_prompts=``, FV's ``k=``, ``icl_filter=``, ...) overrides it for the
methods whose config has that field. :data:`METHOD_DEFAULTS` is derived from them:

=========  =========  =====  ========  =====================================
method     mode       K      template  vector
=========  =========  =====  ========  =====================================
icl-tv     replace    5      hendel    mean ICL residual (Hendel)
vanilla    add        5      hendel    mean ICL − mean zero-shot residual
fv         add        10     fv        Σ top-k heads z̄ @ W_O (Todd)
=========  =========  =====  ========  =====================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import pandas as pd

from tvlens.errors import TvlensError
from tvlens.evaluation import EvalResult, condition_accuracies, evaluate
from tvlens.extract.fv import function_vector
from tvlens.extract.icl_tv import icl_task_vector, vanilla_task_vector
from tvlens.interventions import check_layer
from tvlens.methods import FVConfig, ICLTVConfig, VanillaConfig
from tvlens.models.loading import fingerprint
from tvlens.prompts import PromptSet, answer_token_ids
from tvlens.results import LayerCurve
from tvlens.stats import Accuracy, accuracy
from tvlens.tasks.task import Task
from tvlens.templates import get_template, template_name
from tvlens.vector import TaskVector

CONFIGS = {cfg.method: cfg for cfg in (ICLTVConfig, VanillaConfig, FVConfig)}
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    method: {"shots": cfg().shots, "template": cfg().template} for method, cfg in CONFIGS.items()
}
_SETTINGS = {f.name for cfg in CONFIGS.values() for f in fields(cfg)} - {"shots", "template", "seed"}


def method_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The keywords of ``settings`` that ``method``'s config has (``k`` is FV's only); a
    keyword no extracted method knows is an error naming the known ones."""
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise TvlensError(f"unknown setting(s) {', '.join(unknown)}; the extracted methods take "
                          f"{', '.join(sorted(_SETTINGS))} (plus shots, template, seed)")
    own = {f.name for f in fields(CONFIGS[method])}
    return {k: v for k, v in settings.items() if k in own}


def check_method(method: str) -> str:
    if method not in METHOD_DEFAULTS:
        raise TvlensError(f"unknown method {method!r}; use one of {', '.join(METHOD_DEFAULTS)}")
    return method


def _defaults(method: str, shots, template):
    """``(shots, template)`` with the method's defaults filled in (template kept as given)."""
    check_method(method)
    shots = METHOD_DEFAULTS[method]["shots"] if shots is None else shots
    template = template or METHOD_DEFAULTS[method]["template"]
    get_template(template)  # an unknown name fails here, listing the names
    return shots, template


def vectors_by_layer(model, task: Task, method: str, layers: Sequence[int], *,
                     shots: int | None = None, template=None, seed: int = 0,
                     **settings) -> dict[int, TaskVector]:
    """One single-layer :class:`TaskVector` per layer of ``layers`` for ``method``
    (``settings``: the method's other config fields, see the module docstring)."""
    shots, template = _defaults(method, shots, template)
    own = method_settings(method, settings)
    layers = [check_layer(model, layer) for layer in layers]
    if not layers:
        raise TvlensError("no layers to sweep; give at least one layer")
    if method == "fv":
        fv = function_vector(model, task, layer=layers[0], shots=shots, template=template,
                             seed=seed, **own)
        return {layer: replace(fv, layers=(layer,)) for layer in layers}
    make = icl_task_vector if method == "icl-tv" else vanilla_task_vector
    tv = make(model, task, layers, shots=shots, template=template, seed=seed, **own)
    return {layer: tv.select(layers=[layer]) for layer in layers}


def check_first_token_scorable(model, task: Task, template, split: str = "test") -> None:
    """Refuse a task whose answers are all multi-token when first-token accuracy is asked."""
    tmpl = get_template(template)
    items = task.split(split)[:64] or task.pairs[:64]
    lengths = [len(answer_token_ids(model.tokenizer, tmpl.format_query(x), tmpl.format_answer(y)))
               for x, y in items]
    if lengths and min(lengths) > 1:
        raise TvlensError(
            f"every answer of task {task.name!r} is several tokens long, so first-token accuracy "
            "says little; use metric='exact_match' (CLI: --exact-match)"
        )


def _row(r: EvalResult, metric: str) -> Accuracy:
    if metric == "exact_match":
        return accuracy(r.records["exact_match"].to_numpy(dtype=float))
    return r.interval


@dataclass(kw_only=True)
class LayerSweep(LayerCurve):
    """Accuracy by layer of one method's vector, with the zero-shot and ICL references.

    A :class:`~tvlens.results.LayerCurve` (``name`` is the method; ``rows``; references
    ``"zero-shot"`` and ``"ICL (K-shot)"``) that also keeps where it was measured and the
    vectors. ``curve`` is ``to_frame()``: layer, accuracy, ci_low, ci_high, n.
    """

    task: str
    model: str
    split: str
    shots: int
    template: str
    metric: str = "first_token"
    vectors: dict[int, TaskVector] = field(default_factory=dict, repr=False)

    @property
    def method(self) -> str:
        return self.name

    @property
    def curve(self) -> pd.DataFrame:
        return self.to_frame()

    @property
    def zero_shot(self) -> tuple[float, float, float]:
        return self.references["zero-shot"].as_tuple()

    @property
    def icl(self) -> tuple[float, float, float]:
        return self.references[f"ICL ({self.shots}-shot)"].as_tuple()

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "task": self.task, "model": self.model, "split": self.split,
            "shots": self.shots, "template": self.template, "metric": self.metric,
            "best_layer": self.best_layer, "zero_shot": list(self.zero_shot),
            "icl": list(self.icl), "curve": self.to_frame().to_dict(orient="records"),
        }

    def figure(self, title: str | None = None):
        """Plotly figure via ``tvlens.plots.accuracy_by_layer``."""
        return super().figure(title or f"{self.method} on {self.task} ({self.model}, {self.split})")


def layer_sweep(model, task: Task, method: str, layers: Sequence[int] | None = None, *,
                split: str = "dev", n: int | None = None, shots: int | None = None,
                template=None, batch_size: int = 16, seed: int = 0, metric: str = "first_token",
                vectors: dict[int, TaskVector] | None = None, **settings) -> LayerSweep:
    """Evaluate ``method``'s vector at each of ``layers`` (default: all) on ``split``.

    Returns a :class:`LayerSweep` with the zero-shot and ICL references on the same items.
    ``vectors`` reuses vectors from an earlier sweep (one per layer); ``settings`` are the
    method's other config fields (module docstring).
    """
    check_method(method)
    method_settings(method, settings)
    if metric not in ("first_token", "exact_match"):
        raise TvlensError(f"unknown metric {metric!r}; use 'first_token' or 'exact_match'")
    shots, template = _defaults(method, shots, template)
    layers = list(range(int(model.cfg.n_layers))) if layers is None else list(layers)
    if metric == "first_token":
        check_first_token_scorable(model, task, template, split)
    if vectors is None:
        vectors = vectors_by_layer(model, task, method, layers, shots=shots, template=template,
                                   seed=seed, **settings)
    em = metric == "exact_match"
    kw = dict(split=split, n=n, template=template, batch_size=batch_size, seed=seed,
              exact_match=em, progress=False)
    if em:  # greedy decoding: one evaluate per layer
        accs = {layer: _row(evaluate(model, task, vector=vectors[layer], **kw), metric) for layer in layers}
        accs["zero-shot"] = _row(evaluate(model, task, shots=0, **kw), metric)
    else:  # the layers' vectors and zero-shot along the batch, on one prompt set
        prompts = PromptSet.build(model, task, split=split, n=n, seed=seed, template=template)
        conditions = {"zero-shot": None, **{layer: vectors[layer] for layer in layers}}
        accs = condition_accuracies(model, prompts, conditions, batch_size=batch_size, seed=seed)
    rows = [{"layer": layer, "accuracy": accs[layer].value, "ci_low": accs[layer].ci_low,
             "ci_high": accs[layer].ci_high, "n": accs[layer].n} for layer in layers]
    references = {"zero-shot": accs["zero-shot"],
                  f"ICL ({shots}-shot)": _row(evaluate(model, task, shots=shots, **kw), metric)}
    return LayerSweep(name=method, rows=rows, references=references, task=task.name,
                      model=fingerprint(model).name, split=split, shots=shots,
                      template=template_name(template), metric=metric, vectors=vectors)


@dataclass
class Extraction:
    """A vector at its layer with test accuracy and the zero-shot / ICL references."""

    vector: TaskVector
    method: str
    layer: int
    test: tuple[float, float, float]
    zero_shot: tuple[float, float, float]
    icl: tuple[float, float, float]
    n: int
    sweep: LayerSweep | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "task": self.vector.task, "model": self.vector.model.name,
               "layer": self.layer, "accuracy": self.test[0], "ci_low": self.test[1],
               "ci_high": self.test[2], "zero_shot": self.zero_shot[0], "icl": self.icl[0],
               "n": self.n, "shots": self.vector.hyperparameters.get("shots"),
               "template": self.vector.template}
        if self.method == "fv":
            out["heads"] = self.vector.history["heads"]
        if self.sweep is not None:
            out["dev_sweep"] = self.sweep.curve[["layer", "accuracy"]].to_dict(orient="records")
        return out


def extract(model, task: Task, method: str, *, layer: int | str = "auto", shots: int | None = None,
            template=None, n: int | None = None, n_dev: int | None = None, batch_size: int = 16,
            seed: int = 0, metric: str = "first_token", **settings) -> Extraction:
    """Make ``method``'s vector at ``layer`` (``"auto"``: best on dev) and score it on test
    (``settings``: the method's other config fields, e.g. ``n_prompts=``, FV's ``k=``)."""
    shots, template = _defaults(method, shots, template)
    method_settings(method, settings)
    common = dict(shots=shots, template=template, seed=seed, **settings)
    sweep = None
    if layer == "auto":
        sweep = layer_sweep(model, task, method, split="dev", n=n_dev, batch_size=batch_size,
                            metric=metric, **common)
        layer = sweep.best_layer
        vec = sweep.vectors[layer]
    elif isinstance(layer, int) and not isinstance(layer, bool):
        check_layer(model, layer)
        vec = vectors_by_layer(model, task, method, [layer], **common)[layer]
    else:
        raise TvlensError(f"layer must be an integer or 'auto', got {layer!r}")
    one = layer_sweep(model, task, method, [layer], split="test", n=n, batch_size=batch_size,
                      metric=metric, vectors={layer: vec}, **common)
    row = one.curve.iloc[0]
    return Extraction(vec, method, layer, (float(row.accuracy), float(row.ci_low), float(row.ci_high)),
                      one.zero_shot, one.icl, int(row.n), sweep)
