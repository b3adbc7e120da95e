"""``tvlens learn``: train a learned task vector, save it, report its accuracy.

The training settings (``--shots``, ``--steps``, ``--lr``, ``--batch-size``, ``--template``,
``--seed``, ...) are the fields of :class:`~tvlens.methods.LTVConfig`; a flag left out keeps
its default.
"""

from __future__ import annotations

from tvlens.cli.common import (add_json_arg, add_model_arg, add_task_arg, int_list, load_model_arg,
                               load_task_arg, method_config, out_path, print_json, print_table)


def _positions(text: str) -> list:
    out = []
    for x in text.split(","):
        x = x.strip()
        if not x:
            continue
        try:
            out.append(int(x))
        except ValueError:
            out.append(x)
    return out


def register(subparsers) -> None:
    from tvlens.methods import LTVConfig, add_config_flags

    p = subparsers.add_parser("learn", help="train a learned task vector (LTV)",
                              description="Train θ added at --layers × --positions with the model "
                                          "frozen; save it and report test accuracy.")
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--layers", required=True, help="layer(s), e.g. 10 or 0,4,8")
    p.add_argument("--positions", default="last", help="positions, e.g. last or -5,-4,-3,-2,-1 or 0")
    add_config_flags(p, LTVConfig)
    p.add_argument("--icl-shots", type=int, default=5, help="shots of the ICL reference (default 5)")
    p.add_argument("--n", type=int, default=None, help="test items scored (default: all)")
    p.add_argument("--checkpoint-dir", default=None, help="folder for the training checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--out", required=True, help="the vector file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tvlens.evaluation import evaluate
    from tvlens.learn import learn_task_vector
    from tvlens.methods import LTVConfig

    layers = int_list(args.layers, "layers")
    positions = _positions(args.positions)
    cfg = method_config(LTVConfig, args)
    path = out_path(args.out, overwrite=args.overwrite)
    model = load_model_arg(args)
    task = load_task_arg(args)
    tv = learn_task_vector(model, task, layers, positions, **cfg.to_dict(),
                           checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.json)
    tv.save(path, overwrite=args.overwrite)
    kw = dict(n=args.n, seed=cfg.seed, template=cfg.template, progress=False)
    res = evaluate(model, task, vector=tv, shots=cfg.shots, **kw)
    zs = evaluate(model, task, **kw)
    icl = evaluate(model, task, shots=args.icl_shots, **kw)
    out = {"model": res.model, "task": task.name, "layers": layers, "positions": positions,
           "shots": cfg.shots, "template": res.template, "accuracy": res.accuracy,
           "ci_low": res.ci_low, "ci_high": res.ci_high, "n": res.n, "zero_shot": zs.accuracy,
           "icl": icl.accuracy, "icl_shots": args.icl_shots, "steps": tv.history["steps_run"],
           "best_step": tv.history["best_step"], "stopped": tv.history["stopped"],
           "train_seconds": tv.history["train_seconds"],
           "final_loss": tv.history["loss"][-1] if tv.history["loss"] else None,
           "prefix_cache": tv.history["prefix_cache"], "config": cfg.to_dict(), "out": str(path)}
    if args.json:
        print_json(out)
    else:
        print_table([{k: out[k] for k in ("task", "layers", "positions", "shots", "template",
                                          "accuracy", "ci_low", "ci_high", "zero_shot", "icl",
                                          "steps", "best_step", "stopped", "train_seconds")}])
        if out["stopped"] == "budget":
            print(f"training ended on the step budget (--steps {cfg.steps}) while dev was still "
                  "improving: the vector may not have converged; raise --steps")
        print(f"saved {path}")
    return 0
