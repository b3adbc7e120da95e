"""``tvlens attribute ov|key-heads|geometry`` and ``tvlens ablate-heads``.

Prompts are written in the ``--vector``'s own format unless ``--template`` says otherwise
(then a warning names both formats); every ``--json`` (and ``result.json``) names the
``template`` used. The analyses are :mod:`tvlens.attribution`'s; this module only parses
and prints.
"""

from __future__ import annotations

from tvlens.cli.common import (
    add_json_arg, add_model_arg, add_seed_arg, add_task_arg, add_template_arg, int_list,
    load_model_arg, load_task_arg, out_path, print_json, print_table, template_for, write_json,
)
from tvlens.errors import TvlensError

# --method of `attribute geometry --layers`: REGISTRY names (icl / learn: their 0.1 spellings)
GEOMETRY_METHODS = ("icl-tv", "ltv")
_ALIASES = {"icl": "icl-tv", "learn": "ltv"}


def register(sub) -> None:
    p = sub.add_parser("attribute", help="explain a task vector: OV circuits, key heads, geometry")
    asub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)

    ov = asub.add_parser("ov", help="OV decomposition and the re-injection test")
    _common(ov, vector_required=True)
    ov.add_argument("--where", choices=("layers", "final"), default="layers",
                    help="re-inject each later layer's terms after that layer, or the total after the last")
    ov.set_defaults(func=cmd_ov)

    kh = asub.add_parser("key-heads", help="saliency, key heads, ablation controls, ground truth")
    _common(kh, vector_required=False)
    kh.add_argument("--top", type=float, default=10.0, help="percent of heads called key (default 10)")
    kh.add_argument("--random-control", type=int, default=5, help="random head sets (default 5)")
    kh.add_argument("--no-ground-truth", action="store_true", help="skip the exhaustive ablation sweep")
    kh.set_defaults(func=cmd_key_heads)

    ge = asub.add_parser("geometry", help="rotation vs scaling across layers")
    _common(ge, vector_required=False, many=True)
    ge.add_argument("--layers", default=None,
                    help="without --vector: comma-separated layers to make vectors at")
    ge.add_argument("--method", default="icl-tv",
                    help="how to make vectors for --layers: icl-tv (ICL task vectors, default) or ltv")
    ge.add_argument("--copies", type=int, default=1024, help="perturbed copies per layer")
    ge.add_argument("--noise", type=float, default=0.5, help="λ: noise norm relative to ‖θ‖")
    ge.add_argument("--ridge", type=float, default=1e-2, help="ridge regulariser (0 = least squares)")
    ge.set_defaults(func=cmd_geometry)

    ab = sub.add_parser("ablate-heads", help="accuracy with attention heads ablated, vs random heads")
    add_model_arg(ab)
    add_task_arg(ab)
    ab.add_argument("--vector", default=None, help="vector file (default: ablate under ICL prompts)")
    g = ab.add_mutually_exclusive_group(required=True)
    g.add_argument("--heads", default=None, help="LAYER.HEAD,... e.g. 12.3,14.0")
    g.add_argument("--top", default=None, help="the top P%% heads by saliency, e.g. 10%%")
    ab.add_argument("--mode", choices=("zero", "mean"), default="zero")
    ab.add_argument("--random-control", type=int, default=5)
    ab.add_argument("--n", type=int, default=32, help="test prompts (default 32)")
    ab.add_argument("--shots", type=int, default=5, help="ICL demonstrations without a vector")
    add_template_arg(ab)
    add_seed_arg(ab)
    add_json_arg(ab)
    ab.set_defaults(func=cmd_ablate)


def _common(p, *, vector_required: bool, many: bool = False) -> None:
    add_model_arg(p)
    add_task_arg(p)
    p.add_argument("--vector", required=vector_required, default=None, nargs="+" if many else None,
                   help="task vector file(s)" + (" (one per layer)" if many else ""))
    p.add_argument("--n", type=int, default=32, help="test prompts (default 32)")
    add_template_arg(p)
    add_seed_arg(p)
    p.add_argument("--out", default=None, help="folder for figures (.html) and result.json")
    add_json_arg(p)


def _load_vector(path, model):
    from tvlens.vector import TaskVector

    return TaskVector.load(path, model) if path else None


def _write(args, result: dict, figures: dict) -> None:
    if not args.out:
        return
    from tvlens.plots import export

    folder = out_path(args.out, is_dir=True)
    for name, fig in figures.items():
        export(fig, folder / f"{name}.html")
    write_json(folder / "result.json", result)


def cmd_ov(args) -> int:
    from tvlens.attribution import reinjection_test

    model, task = load_model_arg(args), load_task_arg(args)
    res = reinjection_test(model, task, _load_vector(args.vector, model), n=args.n,
                           where=args.where, template=args.template, seed=args.seed)
    out = res.to_dict()
    _write(args, out, {"ov_dla": res.figure()})
    if args.json:
        print_json(out)
    else:
        print_table([{k: out[k] for k in ("template", "zero_shot", "vector_accuracy",
                                          "ov_weighted_recovery", "ov_packaged_recovery",
                                          "mlp_recovery")}])
    return 0


def cmd_key_heads(args) -> int:
    from tvlens.attribution import figures, key_head_analysis

    model, task = load_model_arg(args), load_task_arg(args)
    vec = _load_vector(args.vector, model)
    res = key_head_analysis(model, task, vec, percent=args.top, n=args.n,
                            random_control=args.random_control,
                            ground_truth=not args.no_ground_truth, template=args.template,
                            seed=args.seed)
    out = res.to_dict()
    figs = {"saliency": res.figure(),
            "profile": figures.layer_profile(res.saliency.values,
                                             injected_layer=vec.layers[0] if vec else None),
            "ablation": figures.ablation_bars(res)}
    _write(args, out, figs)
    if args.json:
        print_json({k: v for k, v in out.items() if k not in ("attribution", "ground_truth")})
    else:
        print("key heads:", " ".join(f"{a}.{b}" for a, b in res.key_heads), f"(template {res.template})")
        print_table([{"mode": m, "none": r.baseline_accuracy, "key": r.ablated_accuracy,
                      "random": r.random_mean} for m, r in res.ablation.items()])
        if "spearman" in out:
            print(f"saliency vs ablation: spearman {out['spearman']:.3f}, top overlap {out['top_overlap']:.2f}")
    return 0


def _geometry_method(value: str) -> str:
    method = _ALIASES.get(value, value)
    if method not in GEOMETRY_METHODS:
        raise TvlensError(f"unknown method {value!r} for --layers; use one of {', '.join(GEOMETRY_METHODS)}")
    return method


def cmd_geometry(args) -> int:
    from tvlens.attribution import figures, geometry_sweep

    method = _geometry_method(args.method)
    layers = int_list(args.layers, "layers") if args.layers and not args.vector else None
    if not args.vector and layers is None:
        raise TvlensError("give --vector FILE... (one per layer) or --layers L1,L2,...")
    model, task = load_model_arg(args), load_task_arg(args)
    if args.vector:
        vecs = [_load_vector(p, model) for p in args.vector]
        vectors = {v.layers[0]: v for v in vecs}
        if len(vectors) != len(vecs):
            raise TvlensError("two vector files share a layer; give one vector per layer")
    else:
        vectors = {layer: _make_vector(model, task, layer, method, args.template) for layer in layers}
    res = geometry_sweep(model, task, vectors, n_copies=args.copies, noise=args.noise,
                         ridge=args.ridge, n=args.n, template=args.template, seed=args.seed)
    _write(args, res, {"geometry": figures.geometry_curves(res), "logit_lens": figures.logit_lens_table(res)})
    if args.json:
        print_json(res)
    else:
        print_table([{k: res[k][i] for k in ("layers", "rotation_cos", "scale_ratio", "fit_r2",
                                              "linear_accuracy", "vector_accuracy")}
                     for i in range(len(res["layers"]))])
        print(f"template {res['template']}")
    return 0


def _make_vector(model, task, layer: int, method: str, template: str | None):
    """A vector at ``layer`` by ``method`` (in ``template`` when given, else its default)."""
    kw = {} if template is None else {"template": template}
    if method == "icl-tv":
        from tvlens.extract import icl_task_vector

        return icl_task_vector(model, task, layer, **kw)
    from tvlens.learn import learn_task_vector

    return learn_task_vector(model, task, layers=layer, **kw)


def cmd_ablate(args) -> int:
    from tvlens.attribution import ablate_heads, head_saliency, parse_heads, top_heads
    from tvlens.prompts import PromptSet

    heads = parse_heads(args.heads) if args.heads else None
    if heads is None:
        try:
            percent = float(str(args.top).rstrip("%"))
        except ValueError:
            raise TvlensError(f"--top takes a percentage like 10%, got {args.top!r}") from None
    model, task = load_model_arg(args), load_task_arg(args)
    vec = _load_vector(args.vector, model)
    # one prompt set for the saliency and the ablations: zero-shot with the vector, ICL without
    prompts = PromptSet.build(model, task, split="test", n=args.n, shots=0 if vec else args.shots,
                              template=template_for(args, vec, what="tvlens ablate-heads"),
                              seed=args.seed)
    if heads is None:
        heads = top_heads(head_saliency(model, prompts, vec)[0], percent)
    res = ablate_heads(model, task, heads, args.mode, vec, args.random_control, seed=args.seed,
                       prompts=prompts)
    out = res.to_dict()
    if args.json:
        print_json(out)
    else:
        print_table([{"heads": len(res.heads), "mode": res.mode, "template": res.template,
                      "none": res.baseline_accuracy, "ablated": res.ablated_accuracy,
                      "random": res.random_mean}])
    return 0
