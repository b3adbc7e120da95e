"""Core commands: ``demo``, ``models``, ``tasks``, ``evaluate``."""

from __future__ import annotations

from tvlens.cli.common import (
    add_json_arg,
    add_model_arg,
    add_seed_arg,
    add_task_arg,
    add_template_arg,
    load_model_arg,
    load_task_arg,
    print_json,
    print_table,
)


def register(sub) -> None:
    p = sub.add_parser("demo", help="zero-shot vs ICL vs task vectors on the embedded model")
    add_model_arg(p)
    p.add_argument("--task", default="capitalize", help="built-in task or file (default: capitalize)")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--n", type=int, default=48, help="test items (default 48)")
    p.add_argument("--template", default="qa", help="qa (default), arrow, or a demo string")
    p.add_argument("--out", default="tvlens-output", help="output folder (default: ./tvlens-output)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", help="list the models tvlens knows by name")
    add_json_arg(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("tasks", help="list the built-in tasks")
    add_json_arg(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("prompt", help="print the exact prompt a method would see")
    add_task_arg(p)
    p.add_argument("--template", default=None,
                   help="hendel, fv, qa, arrow, or a demo string with {x} and {y} "
                        "(default: the --method's own format)")
    p.add_argument("--method", default=None,
                   help="show the prompts of this method (icl-tv, vanilla, fv, ltv, atv): its "
                        "format and shots, unless --template / --shots say otherwise")
    p.add_argument("--shots", type=int, default=None, help="demonstrations (default: the "
                   "method's, else 5)")
    p.add_argument("--n", type=int, default=1, help="how many prompts (default 1)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test", "all"])
    add_seed_arg(p)
    p.add_argument("--shuffled", action="store_true", help="shuffle the demonstrations' labels (FV)")
    add_model_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("evaluate", help="first-token accuracy of a model on a task")
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--shots", type=int, default=0, help="ICL demonstrations (default 0)")
    p.add_argument("--vector", default=None, help="a saved task vector (.safetensors) to inject")
    p.add_argument("--split", default="test", choices=["train", "dev", "test", "all"])
    p.add_argument("--n", type=int, default=None, help="evaluate the first N items of the split")
    add_template_arg(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    add_seed_arg(p)
    p.add_argument("--exact-match", action="store_true", help="also greedy-decode full answers")
    add_json_arg(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_prompt(args) -> int:
    """The prompt strings; with ``--json`` also their tokens under the model's tokenizer."""
    from tvlens.prompts import get_template, show_prompts, tokenize

    from tvlens.errors import TvlensError
    from tvlens.methods import DEFAULT_TEMPLATES, get_config

    if args.template is None and args.method is None:
        raise TvlensError("give --template NAME or --method NAME (its own format), e.g. "
                          "--method icl-tv")
    cfg = get_config(args.method)() if args.method else None
    if args.template is None:
        if args.method not in DEFAULT_TEMPLATES:
            raise TvlensError(f"method {args.method!r} writes no text prompts; use one of "
                              f"{', '.join(DEFAULT_TEMPLATES)}")
        args.template = DEFAULT_TEMPLATES[args.method]
    if args.shots is None:
        args.shots = getattr(cfg, "shots", 5)
    task = load_task_arg(args)
    examples = show_prompts(task, args.template, shots=args.shots, n=args.n, split=args.split,
                            seed=args.seed, shuffle_labels=args.shuffled)
    template = get_template(args.template)
    prompts = [template.prompt(ex.demos, ex.x) for ex in examples]
    if not args.json:
        for i, (p, ex) in enumerate(zip(prompts, examples)):
            if i:
                print()
            print(f"--- prompt {i + 1} (answer {template.format_answer(ex.y)!r})")
            print(p)
        return 0
    model = load_model_arg(args)
    batch = tokenize(model, examples, template)
    rows = []
    for i, (p, ex) in enumerate(zip(prompts, examples)):
        ids = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        rows.append({"prompt": p, "answer": template.format_answer(ex.y), "input_ids": ids,
                     "tokens": model.tokenizer.convert_ids_to_tokens(ids),
                     "answer_ids": list(batch.answer_ids[i])})
    print_json({"task": task.name, "method": args.method, "template": args.template,
                "template_demo": template.demo,
                "shots": args.shots, "seed": args.seed, "shuffled": args.shuffled,
                "split": args.split, "model": model.cfg.model_name, "prompts": rows})
    return 0


def cmd_demo(args) -> int:
    from tvlens.demo import run_demo

    model = load_model_arg(args)
    print(f"model: {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model})")
    res = run_demo(model, task_name=args.task, shots=args.shots, n_test=args.n,
                   template=args.template, out_dir=args.out)
    print()
    print_table(res.rows, ["method", "layer", "accuracy", "ci_low", "ci_high", "n"])
    print()
    for path in res.figures:
        print(f"figure: {path}")
    print(f"results: {args.out}/demo_results.json ({res.seconds:.0f} s)")
    return 0


def cmd_models(args) -> int:
    from tvlens.models import list_models

    rows = list_models()
    if args.json:
        print_json({"models": rows})
    else:
        print_table(rows, ["name", "installed", "cached", "default", "package", "description"])
        print("\nAlso: any local Hugging Face folder or hub name; tvlens.tiny_model(...) in Python.")
    return 0


def cmd_tasks(args) -> int:
    from tvlens.tasks import builtin_task, builtin_task_names

    rows = []
    for name in builtin_task_names():
        t = builtin_task(name)
        rows.append({"name": name, "category": t.category, "pairs": len(t),
                     "example": f"{t.pairs[0][0]} -> {t.pairs[0][1]}", "description": t.description})
    if args.json:
        print_json({"tasks": rows})
    else:
        print_table(rows, ["name", "category", "pairs", "example", "description"])
    return 0


def cmd_evaluate(args) -> int:
    from tvlens.evaluation import evaluate
    from tvlens.vector import TaskVector

    task = load_task_arg(args)
    model = load_model_arg(args)
    vector = TaskVector.load(args.vector, model) if args.vector else None
    # evaluate resolves it: --template, else the vector's own (a warning when they differ)
    r = evaluate(model, task, shots=args.shots, vector=vector, split=args.split, n=args.n,
                 template=args.template, batch_size=args.batch_size, seed=args.seed,
                 exact_match=args.exact_match, progress=not args.json)
    if args.json:
        print_json(r.to_dict())
    else:
        print(f"{r.model} on {r.task} ({r.shots}-shot{', vector ' + args.vector if args.vector else ''}, "
              f"{r.split} split, template {r.template}): accuracy {r}")
        if r.exact_match is not None:
            print(f"exact match: {r.exact_match:.3f}")
    return 0
