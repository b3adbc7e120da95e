"""Adaptive task vectors: expansion size, training memory, and ATV vs ICL inference cost.

    python benchmarks/bench_adaptive.py [--generator smollm2-135m] [--n 32] [--steps 3]

Reports, in one run on the embedded SmolLM2 target (30 layers, d_model 576):
- the expansion's parameter count, full (d_gen·L·d + L·d) and at rank 64;
- peak resident memory (``resource.getrusage`` maxrss) after loading vs after ``--steps``
  training steps (batch 8): the increase is what training adds (gradients, Adam state,
  activations);
- time per query of first-token evaluation with the generated vector (zero-shot prompt +
  one generator forward) vs 5-shot ICL, as a ratio measured in the same process.

With ``--recipe fast|reference`` it instead trains one generator with that recipe
(:func:`tvlens.adaptive.recipe_config`; ``--epochs`` / ``--n-per-task`` / ``--max-steps``
shorten it) on ``--tasks`` and reports training time, seconds per step, peak resident
memory (maxrss: run one recipe per process), and accuracy in-domain (the training tasks'
test items) and on ``--unseen`` tasks, with zero-shot and 5-shot ICL beside it, each with
its CI — for ``reference`` pooled over each task's natural templates
(:mod:`tvlens.adaptive.templated`)::

    python benchmarks/bench_adaptive.py --recipe fast --n-per-task 32
    python benchmarks/bench_adaptive.py --recipe reference --epochs 1 --n-per-task 30
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default=None, help="fast or reference: train and score that recipe")
    ap.add_argument("--tasks", default="antonym,uppercase,present_past,country_capital")
    ap.add_argument("--unseen", default="next_letter,first_item")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-per-task", type=int, default=None)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=30, help="test items per task")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.recipe is not None:
        return recipe_run(args)

    import tvlens
    from tvlens.adaptive import expansion_parameter_count, make_generator, train_generator

    target = tvlens.load_model(device="cpu", progress=False)
    gen = make_generator(target, args.generator, init="default")
    L, d, d_gen = len(gen.layers), int(target.cfg.d_model), gen.encoder.d_gen
    out = {"generator": args.generator, "d_gen": d_gen, "layers": L, "d_model": d,
           "expansion_parameters_full": gen.expansion_parameters(),
           "expansion_parameters_rank64": expansion_parameter_count(d_gen, L, d, 64),
           "generator_parameters": sum(p.numel() for p in gen.encoder.parameters())}
    rss_loaded = maxrss_mib()
    tasks = [tvlens.load_task(t) for t in ("antonym", "uppercase")]
    t0 = time.perf_counter()
    train_generator(target, gen, tasks, epochs=10, max_steps=args.steps, batch_size=8, progress=False)
    out["train_seconds_per_step"] = (time.perf_counter() - t0) / args.steps
    out["maxrss_after_load_mib"] = rss_loaded
    out["maxrss_after_training_mib"] = maxrss_mib()
    out["training_rss_increase_mib"] = out["maxrss_after_training_mib"] - rss_loaded

    task = tasks[0]
    kw = dict(n=args.n, template=gen.template, batch_size=8, progress=False)
    tvlens.evaluate(target, task, vector=gen, n=8, progress=False)  # warm-up (gen's template)
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, vector=gen, **kw)
    atv = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, shots=5, **kw)
    icl = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, **kw)
    zero = (time.perf_counter() - t0) / args.n
    out.update(atv_seconds_per_query=atv, icl5_seconds_per_query=icl,
               zero_shot_seconds_per_query=zero, atv_over_icl=atv / icl, atv_over_zero_shot=atv / zero)
    print(json.dumps(out, indent=1))


def recipe_run(args) -> None:
    import tvlens
    from tvlens.adaptive import check_unseen, make_generator, recipe_config, train_generator
    from tvlens.adaptive.templated import eval_templates, evaluate_templates, per_template
    from tvlens.io import write_json

    over = {k: v for k, v in (("epochs", args.epochs), ("n_per_task", args.n_per_task)) if v is not None}
    cfg = recipe_config(args.recipe, **over)
    target = tvlens.load_model(device="cpu", progress=False)
    tasks = [tvlens.load_task(t) for t in args.tasks.split(",")]
    unseen = [tvlens.load_task(t) for t in args.unseen.split(",") if t]
    check_unseen(tasks, unseen)
    gen = make_generator(target, args.generator, config=cfg)
    rss_loaded = maxrss_mib()
    t0 = time.perf_counter()
    hist = train_generator(target, gen, tasks, config=cfg, max_steps=args.max_steps, progress=False)
    seconds = time.perf_counter() - t0
    out = {"recipe": args.recipe, "config": cfg.to_dict(), "generator": args.generator,
           "tasks": [t.name for t in tasks], "unseen": [t.name for t in unseen],
           "steps": hist["steps"], "train_seconds": seconds,
           "seconds_per_step": seconds / max(hist["steps"], 1),
           "loss_first10": sum(hist["loss"][:10]) / len(hist["loss"][:10]),
           "loss_last10": sum(hist["loss"][-10:]) / len(hist["loss"][-10:]),
           "maxrss_after_load_mib": rss_loaded, "maxrss_after_training_mib": maxrss_mib(),
           "templates": hist["templates"], "rows": []}
    kw = dict(n=args.n_eval, batch_size=8, progress=False)
    for group, ts in (("in-domain", tasks), ("unseen", unseen)):
        for task in ts:
            tmpls = eval_templates(gen, task)
            for method, extra in (("atv", {"vector": gen}), ("zero-shot", {}), ("icl-5", {"shots": 5})):
                pooled, runs = evaluate_templates(target, task, tmpls, **extra, **kw)
                out["rows"].append({"task": task.name, "group": group, "method": method,
                                    "accuracy": pooled.accuracy, "ci": [pooled.ci_low, pooled.ci_high],
                                    "n": pooled.n, "per_template": [r["accuracy"] for r in per_template(runs)]})
    for group in ("in-domain", "unseen"):
        for method in ("atv", "zero-shot", "icl-5"):
            accs = [r["accuracy"] for r in out["rows"] if r["group"] == group and r["method"] == method]
            out[f"mean_{group}_{method}"] = sum(accs) / len(accs) if accs else None
    print(json.dumps(out, indent=1))
    if args.out:
        write_json(args.out, out)


if __name__ == "__main__":
    main()
