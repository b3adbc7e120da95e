"""``tvlens learn``: train a learned task vector, save it, report its accuracy."""

from __future__ import annotations

from tvlens.cli.common import (add_json_arg, add_model_arg, add_task_arg, int_list, load_model_arg,
                               load_task_arg, out_path, print_json, print_table)
from tvlens.errors import TvlensError


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
    p = subparsers.add_parser("learn", help="train a learned task vector (LTV)",
                              description="Train θ added at --layers × --positions with the model "
                                          "frozen; save it and report test accuracy.")
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--layers", required=True, help="layer(s), e.g. 10 or 0,4,8")
    p.add_argument("--positions", default="last", help="positions, e.g. last or -5,-4,-3,-2,-1 or 0")
    p.add_argument("--shots", type=int, default=0, help="train on top of K-shot prompts (default 0)")
    p.add_argument("--steps", type=int, default=60, help="maximum optimiser steps (default 60)")
    p.add_argument("--lr", type=float, default=0.05,
                   help="AdamW lr in units of the residual RMS (default 0.05)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default="arrow",
                   help="arrow (default, Hendel), qa (Todd; works better on SmolLM2) or a demo string")
    p.add_argument("--icl-shots", type=int, default=5, help="shots of the ICL reference (default 5)")
    p.add_argument("--n", type=int, default=None, help="test items scored (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    p.add_argument("--out", required=True, help="where to save the vector (.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from tvlens.evaluation import evaluate
    from tvlens.learn import learn_task_vector

    layers = int_list(args.layers, "layers")
    positions = _positions(args.positions)
    path = out_path(args.out, overwrite=args.overwrite)
    model = load_model_arg(args)
    task = load_task_arg(args)
    tv = learn_task_vector(model, task, layers, positions, shots=args.shots, steps=args.steps,
                           lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                           template=args.template,
                           checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                           progress=not args.json)
    tv.save(path, overwrite=args.overwrite)
    kw = dict(n=args.n, seed=args.seed, template=args.template, progress=False)
    res = evaluate(model, task, vector=tv, shots=args.shots, **kw)
    zs = evaluate(model, task, **kw)
    icl = evaluate(model, task, shots=args.icl_shots, **kw)
    out = {"model": res.model, "task": task.name, "layers": layers, "positions": positions,
           "shots": args.shots, "accuracy": res.accuracy, "ci_low": res.ci_low,
           "ci_high": res.ci_high, "n": res.n, "zero_shot": zs.accuracy, "icl": icl.accuracy,
           "icl_shots": args.icl_shots, "steps": tv.history["steps_run"],
           "best_step": tv.history["best_step"], "train_seconds": tv.history["train_seconds"],
           "final_loss": tv.history["loss"][-1] if tv.history["loss"] else None,
           "prefix_cache": tv.history["prefix_cache"], "out": str(path)}
    if args.json:
        print_json(out)
    else:
        print_table([{k: out[k] for k in ("task", "layers", "positions", "shots", "accuracy",
                                          "ci_low", "ci_high", "zero_shot", "icl", "steps",
                                          "train_seconds")}])
        print(f"saved {path}")
    return 0
