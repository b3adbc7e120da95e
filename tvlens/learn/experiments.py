"""The LTV paper's experiments on any model: Table-1 configurations, composition, sweeps.

- :data:`CONFIGURATIONS` / :func:`configuration` — the layer and position sets of the
  LTV paper's Table 1, scaled to the model's depth (base layer ≈ n_layers / 3; the
  paper used layer 16 of 32 on Llama-3.1-8B but its sweep peaks earlier on small models);
- :func:`composed_task` / :func:`composition` — learn θ_A and θ_B for two tasks, add
  them, and evaluate θ_A + θ_B on the composed task x ↦ B(A(x)) by first-token accuracy
  and exact match, with θ_A and θ_B alone as controls;
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
from tvlens.methods import LTVConfig
from tvlens.prompts import PromptSet, Template, get_template, make_examples, template_name
from tvlens.stats import accuracy
from tvlens.tasks import Task, load_task

# the LTV paper's fixed early position (Table 1: 𝓟 = {4}); 0 would be the BOS token
EARLY_POSITION = 4

# name -> (layers(n_layers, base), positions, shots)
CONFIGURATIONS: dict[str, tuple[Callable[[int, int], list[int]], tuple, int]] = {
    "base": (lambda n, l: [l], ("last",), 0),
    "early position": (lambda n, l: [l], (EARLY_POSITION,), 0),
    "positions -5..-1": (lambda n, l: [l], (-5, -4, -3, -2, -1), 0),
    "layers 0,4,8,...": (lambda n, l: list(range(0, n, 4)), ("last",), 0),
    "layers + positions": (lambda n, l: list(range(0, n, 4)), (-5, -4, -3, -2, -1), 0),
    "+ICL (5-shot)": (lambda n, l: [l], ("last",), 5),
}


def configuration(model, name: str, base_layer: int | None = None, *, task: str | Task | None = None,
                  template: str | Template | None = None) -> dict[str, Any]:
    """Layers, positions and shots of Table-1 configuration ``name`` for ``model``.

    The early absolute position is the paper's index 4 (:data:`EARLY_POSITION`: the
    fifth real token; index 0 is the BOS token on tokenizers that add one). With
    ``task`` given, every zero-shot prompt of the task (all splits, in ``template``,
    default the LTV default) is checked to have more tokens than each absolute position
    of the configuration, and a configuration whose position falls outside some prompt
    is refused naming the shortest prompt (``qa`` prompts have ≥ 7 tokens on SmolLM2;
    ``arrow`` ones can have 3).
    """
    if name not in CONFIGURATIONS:
        raise TvlensError(f"unknown configuration {name!r}; use one of {list(CONFIGURATIONS)}")
    n = int(model.cfg.n_layers)
    base = n // 3 if base_layer is None else base_layer
    layers_fn, positions, shots = CONFIGURATIONS[name]
    absolute = [p for p in positions if isinstance(p, int) and p >= 0]
    if task is not None and absolute:
        t = load_task(task) if isinstance(task, str) else task
        tmpl = get_template(template if template is not None else LTVConfig().template)
        batch = PromptSet.build(model, t, queries=list(t.pairs), template=tmpl).batch
        lengths = batch.lengths
        row = int(lengths.argmin())
        if int(lengths[row]) <= max(absolute):
            raise TvlensError(
                f"configuration {name!r} trains at position {max(absolute)}, but the {t.name!r} "
                f"prompt {batch.prompts[row]!r} has only {int(lengths[row])} tokens in the "
                f"{template_name(tmpl)!r} format; use a format with longer prompts (e.g. "
                "template='qa') or another configuration")
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


def _own_answer(task: Task, x: str) -> str | None:
    """``task`` applied to ``x`` itself (its string function, else its table; None if absent)."""
    if task.name in _STRING_MAPS:
        return _STRING_MAPS[task.name](x)
    return dict(task.pairs).get(x)


def shared_first_token(model, composed: PromptSet, task: Task) -> tuple[float, int]:
    """Fraction of ``composed`` items whose first answer token is that of ``task``'s own
    answer on the same input: the first-token score a vector doing only ``task`` can
    reach on the composed task. Returns ``(fraction, items compared)`` (items whose
    input ``task`` does not cover are left out)."""
    pairs = [(ex.x, _own_answer(task, ex.x)) for ex in composed.batch.examples]
    keep = [i for i, (_, y) in enumerate(pairs) if y]
    if not keep:
        return float("nan"), 0
    own = PromptSet.from_examples(model, make_examples([pairs[i] for i in keep]), composed.template)
    same = own.batch.first_answer_ids.cpu() == composed.batch.first_answer_ids.cpu()[keep]
    return float(same.float().mean()), len(keep)


def composition(model, first: str | Task, second: str | Task, layer: int, *, n: int | None = None,
                template: str | Template | None = None, seed: int = 0, icl_shots: int = 5,
                **train_kwargs) -> pd.DataFrame:
    """Zero-shot, θ_A, θ_B, θ_A + θ_B and ICL on the composed task x ↦ B(A(x)).

    θ_A and θ_B are learned on their own tasks at ``layer`` (position last, ``template``:
    default the LTV default); their sum (``TaskVector.__add__``) is evaluated zero-shot
    on :func:`composed_task` (test split, first ``n``). First-token accuracy cannot tell
    B(A(x)) from A(x) or B(x) when they share a first token (" Walked" / " Walk"), so
    every row also has **exact match**: greedy decoding of the whole answer
    (:func:`tvlens.forward.greedy_answers`, as many tokens as the answer), correct only
    if every token is. θ_A and θ_B alone are the controls: a composition that works has
    θ_A + θ_B's exact match above both. Two more rows, ``θ_A on A`` and ``θ_B on B``
    (each vector zero-shot on its own task's test split, first ``n``), are the positive
    controls: they show whether each vector does its own task, so that a sum that fails
    is told apart from vectors that never worked.

    Returns one row per condition: ``name, accuracy, ci_low, ci_high, n`` (first token),
    ``exact_match, em_low, em_high`` (greedy, every token; the same bootstrap interval,
    :func:`tvlens.stats.accuracy`), ``shared_first_token`` / ``n_shared`` (the single-
    vector rows: the fraction of composed items whose first token equals that of the
    vector's own task applied to x — what that vector can score at the first token
    without composing; :func:`shared_first_token`), ``task`` (the task the row is
    scored on), ``layer``.
    """
    ta = load_task(first) if isinstance(first, str) else first
    tb = load_task(second) if isinstance(second, str) else second
    tc = composed_task(ta, tb)
    tmpl = template if template is not None else LTVConfig().template
    va = learn_task_vector(model, ta, [layer], template=tmpl, seed=seed, **train_kwargs)
    vb = learn_task_vector(model, tb, [layer], template=tmpl, seed=seed, **train_kwargs)
    ps = PromptSet.build(model, tc, split="test", n=n, template=tmpl, seed=seed)

    def row(name, vector=None, shots=0, control: Task | None = None, task: Task = tc):
        if task is not tc:
            kw = dict(split="test", n=n, template=tmpl)
        else:
            kw = dict(prompts=ps) if shots == 0 else dict(shots=shots, n=n, template=tmpl)
        res = evaluate(model, task, vector=vector, exact_match=True, seed=seed, progress=False, **kw)
        em = accuracy(res.records["exact_match"].to_numpy(dtype=float), seed=seed)
        shared, n_shared = (shared_first_token(model, ps, control) if control is not None
                            else (float("nan"), 0))
        return _row(name, res, exact_match=em.value, em_low=em.ci_low, em_high=em.ci_high,
                    shared_first_token=shared, n_shared=n_shared, task=task.name)

    rows = [row("zero-shot"),
            row(f"θ_{ta.name}", va, control=ta),
            row(f"θ_{tb.name}", vb, control=tb),
            row(f"θ_{ta.name} + θ_{tb.name}", va + vb),
            row(f"ICL {icl_shots}-shot", shots=icl_shots),
            row(f"θ_{ta.name} on {ta.name}", va, task=ta),
            row(f"θ_{tb.name} on {tb.name}", vb, task=tb)]
    return pd.DataFrame(rows).assign(layer=layer)


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
