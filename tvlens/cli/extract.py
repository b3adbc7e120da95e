"""Extraction commands: ``extract`` (one vector, scored) and ``sweep`` (accuracy by layer)."""

from __future__ import annotations

import json
from pathlib import Path

from tvlens.cli.common import (
    add_json_arg,
    add_model_arg,
    add_task_arg,
    int_list,
    load_model_arg,
    load_task_arg,
    out_path,
    print_json,
    print_table,
)
from tvlens.errors import TvlensError

METHODS = ("icl-tv", "vanilla", "fv")


def _common(p) -> None:
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--method", required=True,
                   help="icl-tv (Hendel, replace), vanilla (ICL − zero-shot, add) or fv (Todd, add)")
    p.add_argument("--shots", type=int, default=None, help="demonstrations (default: icl-tv/vanilla 5, fv 10)")
    p.add_argument("--template", default=None, help="arrow, qa or a demo string (default: icl-tv/vanilla arrow, fv qa)")
    p.add_argument("--n-prompts", type=int, default=32, help="prompts averaged into the vector (default 32)")
    p.add_argument("--k", type=int, default=10, help="fv: number of top heads (default 10)")
    p.add_argument("--n-ie-prompts", type=int, default=16, help="fv: shuffled-label prompts (default 16)")
    p.add_argument("--n", type=int, default=None, help="score only the first N items of the split")
    p.add_argument("--exact-match", action="store_true", help="score multi-token answers by greedy exact match")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a task vector (icl-tv, vanilla, fv) and score it")
    _common(p)
    p.add_argument("--layer", default="auto", help="layer index, or 'auto' = best on the dev split (default)")
    p.add_argument("--out", required=True, help="where to save the vector (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_json_arg(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="accuracy by layer of an extraction method, with a figure")
    _common(p)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--out", required=True, help="output folder (sweep.json, sweep.csv, sweep.html, sweep.png)")
    add_json_arg(p)
    p.set_defaults(func=cmd_sweep)


def _method(args) -> str:
    if args.method not in METHODS:
        raise TvlensError(f"unknown method {args.method!r}; use one of {', '.join(METHODS)}")
    return args.method


def _kw(args) -> dict:
    return dict(shots=args.shots, template=args.template, n_prompts=args.n_prompts, k=args.k,
                n_ie_prompts=args.n_ie_prompts, seed=args.seed, batch_size=args.batch_size,
                metric="exact_match" if args.exact_match else "first_token")


def _layer(value: str):
    if value == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise TvlensError(f"--layer must be an integer or 'auto', got {value!r}") from None


def cmd_extract(args) -> int:
    from tvlens.extract import extract

    method = _method(args)
    layer = _layer(args.layer)
    path = out_path(args.out, overwrite=args.overwrite)
    model, task = load_model_arg(args), load_task_arg(args)
    res = extract(model, task, method, layer=layer, n=args.n, n_dev=args.n, **_kw(args))
    res.vector.save(path, overwrite=args.overwrite)
    out = res.to_dict() | {"out": str(path)}
    if args.json:
        print_json(out)
    else:
        print_table([{k: out[k] for k in ("method", "task", "layer", "accuracy", "ci_low",
                                          "ci_high", "zero_shot", "icl", "n")}])
        if method == "fv":
            print(f"heads: {out['heads']}")
        print(f"vector: {path}")
    return 0


def cmd_sweep(args) -> int:
    from tvlens import plots
    from tvlens.extract import layer_sweep

    method = _method(args)
    layers = None
    if args.layers:
        try:
            layers = int_list(args.layers, "layers")
        except ValueError:
            raise TvlensError(f"--layers must be comma-separated integers, got {args.layers!r}") from None
    folder = out_path(args.out, is_dir=True)
    model, task = load_model_arg(args), load_task_arg(args)
    sweep = layer_sweep(model, task, method, layers, split=args.split, n=args.n, **_kw(args))
    data = sweep.to_dict()
    (folder / "sweep.json").write_text(json.dumps(data, indent=2))
    sweep.curve.to_csv(folder / "sweep.csv", index=False)
    fig = sweep.figure()
    figures = []
    for ext in ("html", "png"):
        figures.append(str(plots.export(fig, Path(folder) / f"sweep.{ext}")))
    if args.json:
        print_json(data | {"out": str(folder), "figures": figures})
    else:
        print_table(sweep.curve.to_dict(orient="records"), ["layer", "accuracy", "ci_low", "ci_high", "n"])
        print(f"zero-shot {sweep.zero_shot[0]:.3f}  ICL {sweep.icl[0]:.3f}  best layer {sweep.best_layer}")
        print(f"results: {folder}/sweep.json, sweep.csv; figures: {', '.join(figures)}")
    return 0
