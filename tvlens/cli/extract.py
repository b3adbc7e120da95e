"""Extraction commands: ``extract`` (one vector, scored) and ``sweep`` (accuracy by layer).

The method settings (``--shots``, ``--n-prompts``, ``--template``, ``--seed``; FV's ``--k``
and ``--n-ie-prompts``) are the fields of the method's config
(:class:`~tvlens.methods.ICLTVConfig`, :class:`~tvlens.methods.VanillaConfig`,
:class:`~tvlens.methods.FVConfig`); a flag left out keeps that method's default.
"""

from __future__ import annotations

from pathlib import Path

from tvlens.cli.common import (
    add_json_arg,
    add_method_flags,
    add_model_arg,
    add_task_arg,
    int_list,
    load_model_arg,
    load_task_arg,
    method_config,
    out_path,
    print_json,
    print_table,
    write_json,
)
from tvlens.errors import TvlensError

METHODS = ("icl-tv", "vanilla", "fv")


def _configs():
    from tvlens.methods import get_config

    return [get_config(m) for m in METHODS]


def _common(p) -> None:
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--method", required=True,
                   help="icl-tv (Hendel, replace), vanilla (ICL − zero-shot, add) or fv (Todd, add)")
    add_method_flags(p, _configs())
    p.add_argument("--n", type=int, default=None, help="score only the first N items of the split")
    p.add_argument("--exact-match", action="store_true", help="score multi-token answers by greedy exact match")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")


def register(sub) -> None:
    p = sub.add_parser("extract", help="extract a task vector (icl-tv, vanilla, fv) and score it")
    _common(p)
    p.add_argument("--layer", default="auto", help="layer index, or 'auto' = best on the dev split (default)")
    p.add_argument("--out", required=True, help="the vector file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_json_arg(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="accuracy by layer of an extraction method, with a figure")
    _common(p)
    p.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--out", required=True,
                   help="output folder (sweep.json, sweep.csv, sweep.html, sweep.png)")
    add_json_arg(p)
    p.set_defaults(func=cmd_sweep)


def _config(args):
    """The method's config from the flags (an unknown method or a foreign flag: an error)."""
    if args.method not in METHODS:
        raise TvlensError(f"unknown method {args.method!r}; use one of {', '.join(METHODS)}")
    from tvlens.methods import get_config

    return method_config(get_config(args.method), args, _configs())


def _kw(args, cfg) -> dict:
    return dict(cfg.to_dict(), batch_size=args.batch_size,
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

    cfg = _config(args)
    layer = _layer(args.layer)
    path = out_path(args.out, overwrite=args.overwrite)
    model, task = load_model_arg(args), load_task_arg(args)
    res = extract(model, task, args.method, layer=layer, n=args.n, n_dev=args.n, **_kw(args, cfg))
    res.vector.save(path, overwrite=args.overwrite)
    out = res.to_dict() | {"out": str(path)}
    if args.json:
        print_json(out)
    else:
        print_table([{k: out[k] for k in ("method", "task", "layer", "template", "accuracy",
                                          "ci_low", "ci_high", "zero_shot", "icl", "n")}])
        if args.method == "fv":
            print(f"heads: {out['heads']}")
        print(f"vector: {path}")
    return 0


def cmd_sweep(args) -> int:
    from tvlens import plots
    from tvlens.extract import layer_sweep
    from tvlens.io import write_text

    cfg = _config(args)
    layers = int_list(args.layers, "layers") if args.layers else None
    folder = out_path(args.out, is_dir=True)
    model, task = load_model_arg(args), load_task_arg(args)
    sweep = layer_sweep(model, task, args.method, layers, split=args.split, n=args.n,
                        **_kw(args, cfg))
    data = sweep.to_dict()
    write_json(folder / "sweep.json", data, indent=2)
    write_text(folder / "sweep.csv", sweep.curve.to_csv(index=False))
    fig = sweep.figure()
    figures = [str(plots.export(fig, Path(folder) / f"sweep.{ext}")) for ext in ("html", "png")]
    if args.json:
        print_json(data | {"out": str(folder), "figures": figures})
    else:
        print_table(sweep.curve.to_dict(orient="records"), ["layer", "accuracy", "ci_low", "ci_high", "n"])
        print(f"zero-shot {sweep.zero_shot[0]:.3f}  ICL {sweep.icl[0]:.3f}  best layer "
              f"{sweep.best_layer}  (template {sweep.template})")
        print(f"results: {folder}/sweep.json, sweep.csv; figures: {', '.join(figures)}")
    return 0
