"""The findings ``tvlens reproduce`` regenerates, in report order (:data:`FINDINGS`).

What a finding is — its claim, paper values, profiles and ``measure(ctx)`` — is in
:mod:`tvlens.reproduce.finding`. Here: the extracted, learned, adaptive and TVP findings;
the LTV mechanism ones (key heads, OV re-injection, rotation vs scaling) are in
:mod:`tvlens.reproduce.mechanisms`.
"""

from __future__ import annotations

import numpy as np

from tvlens.errors import TvlensError
from tvlens.reproduce import figures
from tvlens.reproduce.finding import (PROFILES, Context, Finding, PaperValue, base_layer,  # noqa: F401
                                      item_scores, resolve_layers, value)
from tvlens.reproduce.mechanisms import KEY_HEADS, OV_REINJECTION, ROTATION
from tvlens.reproduce.verdicts import Claim
from tvlens.stats import accuracy, proportion
from tvlens.tasks.builtin import builtin_task_names


# --- hendel-table -------------------------------------------------------------------------

def _hendel_table(ctx: Context) -> dict:
    """Per task: the ICL task vector's layer is chosen on dev (``layer_sweep``), then
    zero-shot, task vector and 5-shot ICL are scored on the same test items, per format.
    The claim's values pool the tasks' test items (a task whose test split has fewer than
    ``n_test`` items weighs less than in a mean over tasks), with the bootstrap interval
    over items."""
    from tvlens import evaluate, layer_sweep, load_task

    s, model = ctx.settings, ctx.model
    rows, values = [], {}
    for template in s["formats"]:
        pooled: dict[str, list] = {"zero_shot": [], "task_vector": [], "icl": []}
        for name in s["tasks"]:
            task = load_task(name)
            sweep = layer_sweep(model, task, "icl-tv", resolve_layers(model, s["layers"]),
                                split="dev", n=s["n_dev"],
                                template=template, seed=ctx.seed)
            layer = sweep.best_layer
            kw = dict(n=s["n_test"], seed=ctx.seed, template=template)
            res = {"zero_shot": evaluate(model, task, **kw),
                   "task_vector": evaluate(model, task, vector=sweep.vectors[layer], **kw),
                   "icl": evaluate(model, task, shots=5, **kw)}
            for k, r in res.items():
                pooled[k].append(item_scores(r))
            rows.append({"format": template, "task": name, "layer": layer,
                         **{k: r.accuracy for k, r in res.items()}, "n": res["icl"].n})
        prefix = "" if template == s["formats"][0] else f"{template}:"
        scores = {k: np.concatenate(v) for k, v in pooled.items()}
        for k, v in scores.items():
            values[prefix + k] = value(accuracy(v, seed=ctx.seed))
        if not prefix:  # the midpoint of zero-shot and ICL, item by item
            values["zero_shot_icl_midpoint"] = value(
                accuracy((scores["zero_shot"] + scores["icl"]) / 2, seed=ctx.seed))
    return {"values": values, "tables": {"per_task": rows}}


HENDEL = Finding(
    id="hendel-table",
    title="ICL task vectors (Hendel et al. 2023)",
    paper=("Hendel et al. 2023: the residual at the last token of K-shot prompts, patched into a "
           "zero-shot query at a middle layer, recovers most of ICL's accuracy (Hendel's prompt "
           "format, `example: x-> y`)."),
    paper_values={
        "zero_shot": PaperValue(0.13, "Hendel et al. 2023, main results: mean over 18 tasks and "
                                      "7 models (2.8B–30B); as summarised in tvlens's METHODS.md"),
        "task_vector": PaperValue(0.74, "the same table"),
        "icl": PaperValue(0.84, "the same table"),
    },
    claims=(Claim("the task vector beats zero-shot", "task_vector", "zero_shot"),
            Claim("the task vector recovers more than half of ICL's gain over zero-shot",
                  "task_vector", "zero_shot_icl_midpoint")),
    profiles={
        "quick": {"tasks": ["capitalize", "present_past", "antonym"], "formats": ["hendel", "arrow"],
                  "layers": [0.5, 0.6, 0.7, 0.8], "n_dev": 16, "n_test": 32},
        "full": {"tasks": list(builtin_task_names()),
                 "formats": ["hendel", "fv", "arrow"], "layers": "middle_half",
                 "n_dev": 32, "n_test": 64},
    },
    measure=_hendel_table,
    figure=figures.hendel_figure,
)


# --- ltv-vs-extracted --------------------------------------------------------------------

def _ltv_vs_extracted(ctx: Context) -> dict:
    """Per task and layer: an LTV (``learn_task_vector``, its config's defaults but for the
    profile's ``ltv`` settings), the vanilla and ICL task vectors (``vanilla_task_vector``,
    ``icl_task_vector``) and the function vector (``function_vector``, Todd's defaults but for
    the profile's ``fv`` settings; a sum of head outputs, so one vector moved between layers), each scored on the same test
    items in its own format. The claims compare them at the base layer, pooling tasks."""
    from dataclasses import replace

    from tvlens import evaluate, function_vector, icl_task_vector, load_task, vanilla_task_vector

    s, model = ctx.settings, ctx.model
    base = base_layer(model)
    layers = sorted(set(resolve_layers(model, s["layers"])) | {base})
    rows, pooled = [], {}
    for name in s["tasks"]:
        task = load_task(name)
        fv = function_vector(model, task, layer=base, seed=ctx.seed, **s["fv"])
        for layer in layers:
            ltv = ctx.ltv(task, layer, **s["ltv"])
            vectors = {"ltv": ltv, "vanilla": vanilla_task_vector(model, task, [layer], seed=ctx.seed),
                       "icl_tv": icl_task_vector(model, task, [layer], seed=ctx.seed),
                       "fv": replace(fv, layers=(layer,))}
            for method, vec in vectors.items():
                r = evaluate(model, task, vector=vec, n=s["n_test"], seed=ctx.seed)
                rows.append({"task": name, "layer": layer, "method": method, "accuracy": r.accuracy,
                             "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n,
                             "ltv_stopped": ltv.history.get("stopped") if method == "ltv" else ""})
                if layer == base:
                    pooled.setdefault(method, []).append(item_scores(r))
        kw = dict(n=s["n_test"], seed=ctx.seed, template=ltv.template)
        for ref, shots in (("zero_shot", 0), ("icl", 5)):
            r = evaluate(model, task, shots=shots, **kw)
            pooled.setdefault(ref, []).append(item_scores(r))
            rows.append({"task": name, "layer": None, "method": ref, "accuracy": r.accuracy,
                         "ci_low": r.ci_low, "ci_high": r.ci_high, "n": r.n, "ltv_stopped": ""})
    values = {k: value(accuracy(np.concatenate(v), seed=ctx.seed)) for k, v in pooled.items()}
    return {"values": values, "tables": {"by_layer": rows}, "extra": {"base_layer": base}}


LTV_VS_EXTRACTED = Finding(
    id="ltv-vs-extracted",
    title="Learned vs extracted task vectors (Yang, Cho, et al. 2025)",
    paper=("Yang, Cho, Ding, Inoue 2025 (LTV): a task vector trained by gradient descent at one "
           "layer and the last position beats the vanilla task vector and the function vector "
           "(Table 1, base configuration) and does so at every layer (Figure 2)."),
    paper_values={
        "ltv": PaperValue(0.835, "LTV paper, Table 1, base configuration (Llama-3.1-8B, layer "
                                 "16, last position), mean accuracy"),
        "vanilla": PaperValue(0.378, "the same table"),
        "fv": PaperValue(0.373, "the same table"),
    },
    claims=(Claim("the LTV beats the vanilla task vector (base layer)", "ltv", "vanilla"),
            Claim("the LTV beats the function vector (base layer)", "ltv", "fv")),
    profiles={
        "quick": {"tasks": ["capitalize"], "layers": [], "n_test": 24, "ltv": {"steps": 60},
                  "fv": {"n_prompts": 32, "n_ie_prompts": 8}},
        "full": {"tasks": ["antonym", "capitalize", "present_past", "country_capital"],
                 "layers": [0.1, 0.3, 0.5, 0.7, 0.9], "n_test": 64, "ltv": {}, "fv": {}},
    },
    measure=_ltv_vs_extracted,
    figure=figures.ltv_figure,
)


# --- ltv-composition ----------------------------------------------------------------------

def _composition(ctx: Context) -> dict:
    """``tvlens.learn.experiments.composition``: LTVs for tasks A and B at the base layer, and
    their sum on the composed task x ↦ B(A(x)); exact match (greedy, every token) beside
    first-token accuracy, each single vector as a control, and each vector on its own task
    (``first_own``, ``second_own``) as the positive control."""
    from tvlens.learn.experiments import composition

    s, model = ctx.settings, ctx.model
    df = composition(model, s["first"], s["second"], base_layer(model), n=s["n"], seed=ctx.seed,
                     progress=False, **s["ltv"])
    a, b = s["first"], s["second"]
    names = {"zero-shot": "zero_shot", f"θ_{a}": "first_alone", f"θ_{b}": "second_alone",
             f"θ_{a} + θ_{b}": "sum", f"θ_{a} on {a}": "first_own", f"θ_{b} on {b}": "second_own"}
    values = {}
    for row in df.to_dict(orient="records"):
        key = names.get(row["name"], "icl" if row["name"].startswith("ICL") else row["name"])
        values[f"{key}_exact"] = {"value": row["exact_match"], "ci_low": row["em_low"],
                                  "ci_high": row["em_high"], "n": row["n"]}
        values[f"{key}_first_token"] = {"value": row["accuracy"], "ci_low": row["ci_low"],
                                        "ci_high": row["ci_high"], "n": row["n"]}
    table = [{k: row[k] for k in ("name", "task", "accuracy", "exact_match", "em_low", "em_high",
                                   "shared_first_token")} for row in df.to_dict(orient="records")]
    return {"values": values, "tables": {"conditions": table}}


COMPOSITION = Finding(
    id="ltv-composition",
    title="Learned vectors compose by addition (Yang, Cho, et al. 2025)",
    paper=("LTV paper: vectors trained for two tasks can be added to perform the composed task."),
    paper_values={"sum_exact": PaperValue(None, "qualitative claim; no number is cited")},
    claims=(Claim("θ_A + θ_B beats θ_A alone on the composed task (exact match)", "sum_exact",
                  "first_alone_exact"),
            Claim("θ_A + θ_B beats θ_B alone on the composed task (exact match)", "sum_exact",
                  "second_alone_exact")),
    profiles={
        "quick": {"first": "present_past", "second": "capitalize", "n": 24, "ltv": {"steps": 60}},
        "full": {"first": "present_past", "second": "capitalize", "n": 64, "ltv": {}},
    },
    measure=_composition,
    figure=figures.composition_figure,
)


# --- atv ----------------------------------------------------------------------------------

def _atv(ctx: Context) -> dict:
    """A generator (a copy of the profile's generator model) trained per recipe on the ATV
    training suite (``tvlens.tasks.builtin.ATV_TRAIN_SUITE``), then ATV vs zero-shot vs ICL
    on those tasks' test items and on the unseen suite (new tasks whose label words occur in
    training, inputs disjoint: ``check_unseen`` refuses overlap), next to the majority-label
    control. Values pool each group's items; every method is scored in the generator's
    target format."""
    from tvlens import evaluate, load_task
    from tvlens.adaptive import make_generator, train_generator
    from tvlens.adaptive.config import recipe_config
    from tvlens.adaptive.training import check_unseen
    from tvlens.tasks.builtin import ATV_TRAIN_SUITE, ATV_UNSEEN_SUITE

    s, target = ctx.settings, ctx.model
    train = [load_task(t) for t in ATV_TRAIN_SUITE]
    unseen = [load_task(t) for t in ATV_UNSEEN_SUITE]
    check_unseen(train, unseen)
    pooled: dict[str, list] = {}
    rows = []
    for recipe in s["recipes"]:
        cfg = recipe_config(recipe, seed=ctx.seed, **s["overrides"].get(recipe, {}))
        gen = make_generator(target, s["generator"], config=cfg)
        history = train_generator(target, gen, train, config=cfg, max_steps=s["max_steps"],
                                  progress=False)
        for group, tasks in (("in_domain", train), ("unseen", unseen)):
            for task in tasks:
                kw = dict(n=s["n"], template=gen.template, seed=ctx.seed, progress=False)
                runs = {f"atv_{recipe}": evaluate(target, task, vector=gen, **kw)}
                if recipe == s["recipes"][0]:
                    runs.update(zero_shot=evaluate(target, task, **kw),
                                icl=evaluate(target, task, shots=5, **kw))
                for method, r in runs.items():
                    pooled.setdefault(f"{method}_{group}", []).append(item_scores(r))
                    rows.append({"task": task.name, "group": group, "method": method,
                                 "accuracy": r.accuracy, "ci_low": r.ci_low, "ci_high": r.ci_high,
                                 "n": r.n, "train_steps": history.get("steps")})
                if recipe == s["recipes"][0]:  # the control: always the commonest train label
                    majority = _majority_scores(task, runs["zero_shot"])
                    pooled.setdefault(f"majority_{group}", []).append(majority)
                    rows.append({"task": task.name, "group": group, "method": "majority",
                                 "accuracy": float(majority.mean()), "ci_low": float("nan"),
                                 "ci_high": float("nan"), "n": len(majority), "train_steps": None})
    values = {k: value(accuracy(np.concatenate(v), seed=ctx.seed)) for k, v in pooled.items()}
    return {"values": values, "tables": {"per_task": rows}}


def _majority_scores(task, result) -> np.ndarray:
    """Per item of ``result`` (an EvalResult on ``task``): does the train split's most
    frequent answer equal the item's answer? — what a label-emitting generator scores."""
    from collections import Counter

    label = Counter(y for _, y in task.train).most_common(1)[0][0]
    return (result.records["target"].astype(str).str.strip() == label.strip()).to_numpy(dtype=float)


ATV = Finding(
    id="atv",
    title="Adaptive task vectors (Kang et al. 2025)",
    paper=("Kang et al. 2025: a small generator maps each query to per-layer vectors; trained on "
           "20 tasks it reaches 62.1% in-domain and 63.4% on 5 unseen tasks whose answer formats "
           "occur in training (Llama-3-8B), above zero-shot."),
    paper_values={
        "atv_fast_in_domain": PaperValue(0.621, "ATV paper, main table: in-domain average "
                                                "(Llama-3-8B; its own recipe, not tvlens's fast one)"),
        "atv_fast_unseen": PaperValue(0.634, "ATV paper, main table: unseen-task average (Llama-3-8B)"),
    },
    claims=(Claim("ATV beats zero-shot in-domain", "atv_fast_in_domain", "zero_shot_in_domain"),
            Claim("ATV beats zero-shot on unseen tasks", "atv_fast_unseen", "zero_shot_unseen"),
            Claim("ATV on unseen tasks beats always answering the commonest training label "
                  "(a generator that only emits a seen label word)", "atv_fast_unseen",
                  "majority_unseen")),
    profiles={
        "quick": {"generator": "smollm2-135m", "recipes": ["fast"], "overrides": {},
                  "max_steps": 24, "n": 20},
        "full": {"generator": "smollm2-135m", "recipes": ["fast", "reference"],
                 "overrides": {"reference": {"epochs": 1, "n_per_task": 30}},
                 "max_steps": None, "n": 60},
    },
    measure=_atv,
    figure=figures.atv_figure,
)


# --- tvp ----------------------------------------------------------------------------------

def _tvp(ctx: Context) -> dict:
    """Trains the same seeded small transformer with and without the TVP loss
    (``tvlens.emergence.compare``) and reads the accuracies it logs; their intervals are
    exact (Clopper–Pearson) over the ``n_eval`` prompts each is measured on. ``steps``
    (optional) overrides the preset's step budget (the learning rate is constant after
    warm-up, so a longer budget continues the same run); the ``curve`` table is each arm's
    ICL and layer-ℓ task-vector accuracy over training."""
    from dataclasses import replace

    from tvlens.emergence import compare, get_preset

    budget = {"steps": ctx.settings["steps"]} if "steps" in ctx.settings else {}
    cfg = replace(get_preset(ctx.settings["preset"]), seed=ctx.seed, **budget)
    result = compare(cfg)
    n, layer = cfg.n_eval, cfg.tvp_layer
    values, rows, curve = {}, [], []
    for arm in ("with_tvp", "without_tvp"):
        m = result[arm]
        values[f"tv_at_layer_{arm}"] = value(proportion(m["tv_accuracy_by_layer"][layer], n))
        values[f"ood_icl_{arm}"] = value(proportion(m["ood_icl_accuracy"], n))
        values[f"long_context_icl_{arm}"] = value(proportion(m["long_context_icl_accuracy"], n))
        values[f"icl_{arm}"] = value(proportion(m["icl_accuracy"], n))
        rows += [{"arm": arm, "layer": i, "tv_accuracy": a} for i, a in enumerate(m["tv_accuracy_by_layer"])]
        curve += [{"arm": arm, "step": h["step"], "icl_accuracy": h["icl_accuracy"],
                   "tv_accuracy_at_layer": h["tv_accuracy"]} for h in m["history"]]
    return {"values": values, "tables": {"tv_accuracy_by_layer": rows, "curve": curve},
            "extra": {"tvp_layer": layer, "chance": result["with_tvp"]["chance"]}}


TVP = Finding(
    id="tvp",
    title="Task-vector prompting loss (Yang, Lin, et al. 2025)",
    paper=("Yang, Lin, Lee, Papailiopoulos, Nowak 2025: adding the TVP loss during training makes "
           "strong, localised task vectors at the prescribed layer and improves ICL on "
           "out-of-distribution prompts."),
    paper_values={
        "tv_at_layer_with_tvp": PaperValue(None, "qualitative claim (abstract; figures on "
                                                 "synthetic tasks); no number is cited"),
        "ood_icl_with_tvp": PaperValue(None, "qualitative claim (abstract)"),
    },
    claims=(Claim("TVP raises task-vector accuracy at the prescribed layer",
                  "tv_at_layer_with_tvp", "tv_at_layer_without_tvp"),
            Claim("TVP raises ICL accuracy on held-out tasks (OOD)", "ood_icl_with_tvp",
                  "ood_icl_without_tvp")),
    # full: 3× the default preset's 800 steps; at 800 one seed in three has not learned ICL
    # (0.55) and another's layer-ℓ vector is still rising (0.36 at 800, 0.99 at 1600;
    # docs/results/history/tvp.md), so the comparison would be of unfinished runs
    profiles={"quick": {"preset": "tiny"}, "full": {"preset": "default", "steps": 2400}},
    measure=_tvp,
    figure=figures.tvp_figure,
    synthetic=True,
)


FINDINGS: dict[str, Finding] = {f.id: f for f in (HENDEL, LTV_VS_EXTRACTED, COMPOSITION, OV_REINJECTION,
                                                  KEY_HEADS, ROTATION, ATV, TVP)}


def get_findings(only: str | list[str] | None = None) -> list[Finding]:
    """The findings to run, in report order (``only``: ids, comma-separated or a list)."""
    if only is None:
        return list(FINDINGS.values())
    ids = [x.strip() for x in (only.split(",") if isinstance(only, str) else only) if x.strip()]
    unknown = [x for x in ids if x not in FINDINGS]
    if unknown:
        raise TvlensError(f"unknown finding(s) {', '.join(unknown)}; use one of {', '.join(FINDINGS)}")
    return [FINDINGS[x] for x in ids]
