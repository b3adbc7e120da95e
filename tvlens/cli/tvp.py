"""``tvlens tvp train|compare``: task-vector emergence and the TVP loss on synthetic ICL tasks.

    tvlens tvp train --preset tiny --tvp-lambda 1 --out runs/tvp [--resume] [--json]
    tvlens tvp train --config cfg.json --out runs/tvp
    tvlens tvp compare --preset tiny --json

A config is a preset, then a JSON file of :class:`tvlens.emergence.TVPConfig` fields,
then flags (``--n-layers 4 --tvp-layer 1 --families offset,affine``), later winning.
"""

from __future__ import annotations

from dataclasses import replace

from tvlens.cli.common import add_json_arg, out_path, print_json, print_table
from tvlens.errors import TvlensError

_KEYS = ("icl_accuracy", "ood_icl_accuracy", "long_context_icl_accuracy", "zero_shot_accuracy")


def register(subparsers) -> None:
    from tvlens.emergence.config import TVPConfig, get_preset
    from tvlens.methods.base import add_config_flags

    tvp = subparsers.add_parser("tvp", help="train small models on synthetic ICL tasks (TVP loss)")
    sub = tvp.add_subparsers(dest="tvp_command", metavar="SUBCOMMAND", required=True)

    t = sub.add_parser("train", help="train one model and measure it",
                       description="Flags override the --preset (and --config); the defaults "
                                   "shown are those of the default preset.")
    t.add_argument("--preset", default="default", help="starting config: tiny or default")
    t.add_argument("--config", default=None, help="JSON file of TVPConfig fields")
    add_config_flags(t, TVPConfig, defaults_from=get_preset("default"))
    t.add_argument("--out", required=True,
                   help="run folder (checkpoint.safetensors, config.json, metrics.json)")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    add_json_arg(t)
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="train with and without TVP and compare")
    c.add_argument("--preset", default="tiny", help="tiny (< 60 s) or default (minutes)")
    c.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    c.add_argument("--out", default=None, help="folder for result.json and the figures (.html)")
    add_json_arg(c)
    c.set_defaults(func=_compare)


def tvp_config_from_args(args):
    """Preset, then ``--config`` file, then flags (:func:`tvlens.methods.base.config_from_args`)."""
    from tvlens.emergence.config import TVPConfig, get_preset
    from tvlens.io import read_json
    from tvlens.methods.base import config_from_args

    cfg = get_preset(args.preset)
    if args.config:
        data = read_json(args.config, what="config file")
        if not isinstance(data, dict):
            raise TvlensError(f"config file {args.config!r} must hold a JSON object of TVPConfig fields")
        cfg = TVPConfig.from_dict({**cfg.to_dict(), **data})
    return config_from_args(TVPConfig, args, base=cfg).validate()


def _train(args) -> int:
    from tvlens.emergence.measure import evaluate_run
    from tvlens.emergence.training import train
    from tvlens.io import write_json

    cfg = tvp_config_from_args(args)
    folder = out_path(args.out, is_dir=True)
    log = None if args.json else (lambda e: print(
        f"step {e['step']}: loss {e['loss']:.3f} icl {e['icl_accuracy']:.3f} "
        f"tv@{cfg.tvp_layer} {e['tv_accuracy']:.3f}", flush=True))
    run = train(cfg, out_dir=folder, resume=args.resume, log=log)
    result = {**evaluate_run(run.model, cfg), "steps": run.step, "train_seconds": run.seconds,
              "out": str(folder), "config": cfg.to_dict()}
    write_json(folder / "metrics.json", {**result, "history": run.history}, indent=1)
    if args.json:
        print_json(result)
    else:
        print_table([{"measure": k, "accuracy": result[k]} for k in _KEYS])
        print_table([{"layer": i, "tv_accuracy": a} for i, a in enumerate(result["tv_accuracy_by_layer"])])
        print(f"trained {run.step} steps in {run.seconds:.1f} s; checkpoint in {folder}")
    return 0


def _compare(args) -> int:
    from tvlens.emergence.config import get_preset
    from tvlens.emergence.training import compare
    from tvlens.io import write_json

    cfg = get_preset(args.preset)
    if args.steps is not None:
        if args.steps < 1:
            raise TvlensError(f"--steps must be >= 1, got {args.steps}")
        cfg = replace(cfg, steps=args.steps)
    folder = out_path(args.out, is_dir=True) if args.out else None
    result = compare(cfg)
    if folder is not None:
        from tvlens.emergence.figures import accuracy_by_layer_figure, training_curves_figure
        from tvlens.plots import export

        write_json(folder / "result.json", result, indent=1)
        export(accuracy_by_layer_figure(result), folder / "tv_accuracy_by_layer.html")
        export(training_curves_figure(result), folder / "training_curves.html")
    if args.json:
        print_json({arm: {k: v for k, v in result[arm].items() if k != "history"}
                    for arm in ("with_tvp", "without_tvp")} | {"config": result["config"]})
        return 0
    rows = [{"arm": arm, **{k: result[arm][k] for k in _KEYS},
             f"tv@{cfg.tvp_layer}": result[arm]["tv_accuracy_by_layer"][cfg.tvp_layer]}
            for arm in ("with_tvp", "without_tvp")]
    print_table(rows)
    print_table([{"layer": i, "with_tvp": a, "without_tvp": b} for i, (a, b) in enumerate(zip(
        result["with_tvp"]["tv_accuracy_by_layer"], result["without_tvp"]["tv_accuracy_by_layer"]))])
    return 0
