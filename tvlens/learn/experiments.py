"""The LTV paper's experiments on any model: Table-1 configurations, composition, sweeps.

- :data:`CONFIGURATIONS` / :func:`configuration` — the layer and position sets of the
  LTV paper's Table 1, scaled to the model's depth (base layer ≈ n_layers / 3; the
  paper used layer 16 of 32 on Llama-3.1-8B but its sweep peaks earlier on small models);
- :func:`composed_task` / :func:`composition` — learn θ_A and θ_B for two tasks, add
  them, and evaluate θ_A + θ_B on the composed task x ↦ B(A(x));
- :func:`compare_methods_by_layer` — accuracy by layer of LTV *against* the extracted
  vectors (ICL task vector, and the vanilla vector and function vector when
  :mod:`tvlens.extract` has them), with zero-shot and ICL as references: the shape of the
  LTV paper's Figure 2. (:func:`tvlens.extract.layer_sweep` sweeps *one* extraction
  method and returns a ``LayerSweep``; this one trains an LTV per layer and returns one
  curve per method.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from tvlens.errors import TvlensError
from tvlens.evaluation import EvalResult, evaluate
from tvlens.learn.trainer import learn_task_vector
from tvlens.tasks import Task, load_task

# name -> (layers(n_layers, base), positions, shots)
CONFIGURATIONS: dict[str, tuple[Callable[[int, int], list[int]], tuple, int]] = {
    "base": (lambda n, l: [l], ("last",), 0),
    "early position": (lambda n, l: [l], (0,), 0),
    "positions -5..-1": (lambda n, l: [l], (-5, -4, -3, -2, -1), 0),
    "layers 0,4,8,...": (lambda n, l: list(range(0, n, 4)), ("last",), 0),
    "layers + positions": (lambda n, l: list(range(0, n, 4)), (-5, -4, -3, -2, -1), 0),
    "+ICL (5-shot)": (lambda n, l: [l], ("last",), 5),
}


def configuration(model, name: str, base_layer: int | None = None) -> dict[str, Any]:
    """Layers, positions and shots of Table-1 configuration ``name`` for ``model``.

    The early absolute position is 0 (the query's first token): zero-shot prompts of
    the arrow template are 2-3 tokens long on SmolLM2, so the paper's index 4 would fall
    outside them.
    """
    if name not in CONFIGURATIONS:
        raise TvlensError(f"unknown configuration {name!r}; use one of {list(CONFIGURATIONS)}")
    n = int(model.cfg.n_layers)
    base = n // 3 if base_layer is None else base_layer
    layers_fn, positions, shots = CONFIGURATIONS[name]
    return {"layers": layers_fn(n, base), "positions": list(positions), "shots": shots}


_STRING_MAPS: dict[str, Callable[[str], str]] = {
    "capitalize": str.capitalize, "uppercase": str.upper, "first_letter": lambda w: w[:1],
}


def composed_task(first: str | Task, second: str | Task) -> Task:
    """The task x ↦ second(first(x)), from two tasks.

    ``second`` is applied as a string function when it is an algorithmic built-in
    (capitalize, uppercase, first_letter), else as a lookup in its pairs (items whose
    intermediate answer it does not cover are dropped).
    """
    a = load_task(first) if isinstance(first, str) else first
    b = load_task(second) if isinstance(second, str) else second
    if b.name in _STRING_MAPS:
        fn = _STRING_MAPS[b.name]
        pairs = [(x, fn(y)) for x, y in a.pairs]
    else:
        table = dict(b.pairs)
        pairs = [(x, table[y]) for x, y in a.pairs if y in table]
    if len(pairs) < 10:
        raise TvlensError(f"only {len(pairs)} items of {a.name!r} have an answer {b.name!r} "
                          "can map; compose tasks whose outputs the second task covers")
    return Task(f"{a.name}+{b.name}", tuple(pairs), f"{a.name} then {b.name}", "composed")


def _row(name: str, res: EvalResult, **extra) -> dict[str, Any]:
    return {"name": name, "accuracy": res.accuracy, "ci_low": res.ci_low, "ci_high": res.ci_high,
            "n": res.n, **extra}


def composition(model, first: str, second: str, layer: int, *, n: int | None = None,
                template: str = "arrow", **train_kwargs) -> pd.DataFrame:
    """Accuracy on the composed task of zero-shot, θ_A, θ_B, θ_A + θ_B, and 5-shot ICL.

    θ_A and θ_B are learned on their own tasks at ``layer`` (position last); their sum
    (``TaskVector.__add__``) is evaluated zero-shot on :func:`composed_task`.
    """
    ta, tb = load_task(first), load_task(second)
    tc = composed_task(ta, tb)
    va = learn_task_vector(model, ta, [layer], template=template, **train_kwargs)
    vb = learn_task_vector(model, tb, [layer], template=template, **train_kwargs)
    kw = dict(n=n, progress=False, template=template)
    rows = [_row("zero-shot", evaluate(model, tc, **kw)),
            _row(f"θ_{first}", evaluate(model, tc, vector=va, **kw)),
            _row(f"θ_{second}", evaluate(model, tc, vector=vb, **kw)),
            _row(f"θ_{first} + θ_{second}", evaluate(model, tc, vector=va + vb, **kw)),
            _row("ICL 5-shot", evaluate(model, tc, shots=5, **kw))]
    return pd.DataFrame(rows).assign(task=tc.name, layer=layer)


def extractors(include_fv: bool = True, template: str = "arrow") -> dict[str, Callable]:
    """The extracted-vector methods to compare with: name → fn(model, task, layer).

    The function vector does not depend on the layer it is added at (a sum of head
    outputs), so it is computed once per task and moved between layers.
    """
    import dataclasses

    import tvlens.extract as ex

    found: dict[str, Callable] = {
        "ICL-TV": lambda m, t, layer: ex.icl_task_vector(m, t, [layer], template=template),
        "vanilla": lambda m, t, layer: ex.vanilla_task_vector(m, t, [layer], template=template)}
    if include_fv:
        memo: dict[str, Any] = {}

        def fv(m, t, layer):
            if t.name not in memo:
                memo[t.name] = ex.function_vector(m, t, layer=layer, template=template)
            return dataclasses.replace(memo[t.name], layers=(layer,))

        found["FV"] = fv
    return found


def compare_methods_by_layer(model, task: str | Task, layers: Sequence[int], *, n: int | None = None,
                             shots: int = 5, progress: bool = False, include_fv: bool = True,
                             template: str = "arrow", **train_kwargs
                             ) -> tuple[dict[str, pd.DataFrame], dict[str, tuple[float, float, float]]]:
    """Accuracy by layer of LTV and the extracted vectors; zero-shot and ICL references.

    Returns ``(curves, references)``: ``curves`` maps a method (LTV, ICL-TV, vanilla, FV)
    to a DataFrame ``(name, accuracy, ci_low, ci_high, n, layer)`` for
    :func:`tvlens.plots.accuracy_by_layer`, ``references`` maps "zero-shot" and
    "ICL k-shot" to ``(acc, lo, hi)``. Every accuracy comes from :func:`evaluate`.
    """
    task = load_task(task) if isinstance(task, str) else task
    methods = extractors(include_fv, template)
    kw = dict(n=n, progress=False, template=template)
    rows: dict[str, list[dict]] = {"LTV": [], **{k: [] for k in methods}}
    for layer in layers:
        tv = learn_task_vector(model, task, [layer], progress=progress, template=template,
                               **train_kwargs)
        rows["LTV"].append(_row("LTV", evaluate(model, task, vector=tv, **kw),
                                layer=layer, train_seconds=tv.history["train_seconds"]))
        for name, fn in methods.items():
            res = evaluate(model, task, vector=fn(model, task, layer), **kw)
            rows[name].append(_row(name, res, layer=layer))
    zs = evaluate(model, task, **kw)
    icl = evaluate(model, task, shots=shots, **kw)
    refs = {"zero-shot": (zs.accuracy, zs.ci_low, zs.ci_high),
            f"ICL {shots}-shot": (icl.accuracy, icl.ci_low, icl.ci_high)}
    return {k: pd.DataFrame(v) for k, v in rows.items()}, refs
