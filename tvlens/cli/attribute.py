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

    ov = asub.add_parser("ov", help="path terms (OV, direct / total MLP) re-injected at every placement")
    _common(ov, vector_required=True)
    ov.add_argument("--placements", default=None,
                    help="comma-separated: entry (where each term enters), final (summed after the "
                         "last block), own (θ's place), after_block (default: all)")
    ov.add_argument("--kinds", default=None,
                    help="comma-separated: ov_weighted, ov_packaged, mlp_direct, mlp_total (default: all)")
    ov.add_argument("--packaged", default="unweighted",
                    help="packaged OV form: unweighted (default) or mean_attention")
    ov.add_argument("--no-controls", action="store_true",
                    help="skip the controls (θ minus its OV terms; θ with zero-shot attention patterns)")
    ov.set_defaults(func=cmd_ov)

    kh = asub.add_parser("key-heads", help="saliency, key heads, ablation controls, ground truth")
    _common(kh, vector_required=False)
    kh.add_argument("--top", type=float, default=10.0,
                    help="percent of the ranked heads (see --rank) called key (default 10)")
    kh.add_argument("--random-control", type=int, default=5, help="random head sets (default 5)")
    kh.add_argument("--no-ground-truth", action="store_true", help="skip the exhaustive ablation sweep")
    _rank_args(kh)
    kh.add_argument("--shots", type=int, default=5,
                    help="ICL demonstrations: the prompts without --vector, the plain-ICL control with it")
    kh.add_argument("--no-icl", action="store_true",
                    help="with --vector: skip the same ablations on plain ICL prompts")
    kh.set_defaults(func=cmd_key_heads)

    ge = asub.add_parser("geometry", help="rotation vs scaling across layers")
    _common(ge, vector_required=False, many=True)
    ge.add_argument("--layers", default=None,
                    help="without --vector: comma-separated layers to make vectors at")
    ge.add_argument("--method", default="icl-tv",
                    help="how to make vectors for --layers: icl-tv (ICL task vectors, default) or ltv")
    ge.add_argument("--copies", type=int, default=1024,
                    help="perturbed copies per layer, each injected into every fit prompt")
    ge.add_argument("--fit-prompts", type=int, default=8, help="train prompts of the fit (default 8)")
    ge.add_argument("--design", choices=("per_prompt", "mean", "mixed"), default="per_prompt",
                    help="headline fit: one map per prompt (default), the prompt-averaged change, "
                         "or copies spread over prompts (the old design, a control)")
    ge.add_argument("--noise", type=float, default=0.5, help="λ: noise norm relative to ‖θ‖")
    ge.add_argument("--ridge", type=float, default=1e-2, help="ridge regulariser (0 = least squares)")
    ge.set_defaults(func=cmd_geometry)

    ab = sub.add_parser("ablate-heads", help="accuracy with attention heads ablated, vs random heads")
    add_model_arg(ab)
    add_task_arg(ab)
    ab.add_argument("--vector", default=None, help="vector file (default: ablate under ICL prompts)")
    g = ab.add_mutually_exclusive_group(required=True)
    g.add_argument("--heads", default=None, help="LAYER.HEAD,... e.g. 12.3,14.0")
    g.add_argument("--top", default=None, help="the top P%% of the ranked heads by saliency, e.g. 10%%")
    ab.add_argument("--mode", choices=("zero", "mean"), default="zero")
    ab.add_argument("--random-control", type=int, default=5)
    _rank_args(ab)
    ab.add_argument("--n", type=int, default=32, help="test prompts (default 32)")
    ab.add_argument("--shots", type=int, default=5, help="ICL demonstrations without a vector")
    add_template_arg(ab)
    add_seed_arg(ab)
    add_json_arg(ab)
    ab.set_defaults(func=cmd_ablate)


def _rank_args(p) -> None:
    """--rank and --random-from of `attribute key-heads` and `ablate-heads`."""
    p.add_argument("--rank", choices=("after", "all"), default="after",
                   help="rank only heads after the vector's layer (default; they can read it) or all")
    p.add_argument("--random-from", choices=("layers", "all"), default="layers",
                   help="random control sets from the same layers as the heads (default) or anywhere")


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
    from tvlens.attribution import CONTROLS, KINDS, PLACEMENTS, reinjection_test
    from tvlens.attribution.figures import ov_dla_heatmap

    def names(text, default):
        return default if text is None else tuple(t.strip() for t in text.split(",") if t.strip())

    model, task = load_model_arg(args), load_task_arg(args)
    res = reinjection_test(model, task, _load_vector(args.vector, model), n=args.n,
                           kinds=names(args.kinds, KINDS), placements=names(args.placements, PLACEMENTS),
                           controls=() if args.no_controls else CONTROLS, packaged=args.packaged,
                           template=args.template, seed=args.seed)
    out = res.to_dict()
    _write(args, out, {"ov_reinjection": res.figure(), "ov_dla": ov_dla_heatmap(out)})
    if args.json:
        print_json(out)
    else:
        print(f"template {out['template']}, layer {out['layer']}, n {out['n']}, "
              f"packaged {out['packaged']}")
        rows = [{"condition": k, "accuracy": out[a], "ci": "[{:.2f}, {:.2f}]".format(*out[f"{k}_ci"]),
                 "recovery": ""} for k, a in (("zero_shot", "zero_shot"), ("vector", "vector_accuracy"))]
        rows += [{"condition": k, "accuracy": c["accuracy"], "ci": "[{:.2f}, {:.2f}]".format(*c["ci"]),
                  "recovery": c["recovery"]} for k, c in out["conditions"].items()]
        print_table(rows)
    return 0


def cmd_key_heads(args) -> int:
    from tvlens.attribution import figures, key_head_analysis

    model, task = load_model_arg(args), load_task_arg(args)
    vec = _load_vector(args.vector, model)
    res = key_head_analysis(model, task, vec, percent=args.top, n=args.n,
                            random_control=args.random_control,
                            ground_truth=not args.no_ground_truth, template=args.template,
                            seed=args.seed, shots=args.shots, rank=args.rank,
                            icl=not args.no_icl, random_from=args.random_from)
    out = res.to_dict()
    figs = {"saliency": res.figure(),
            "profile": figures.layer_profile(res.saliency.values, injected_layer=res.injection_layer,
                                             histogram=res.layer_histogram),
            "ablation": figures.ablation_bars(res)}
    _write(args, out, figs)
    if args.json:
        print_json({k: v for k, v in out.items() if k not in ("attribution", "ground_truth")})
    else:
        print("key heads:", " ".join(f"{a}.{b}" for a, b in res.key_heads),
              f"(k {res.k} of {len(res.candidates)} ranked, rank {res.rank}, template {res.template})")
        print("per layer:", " ".join(f"{l}:{c}" for l, c in enumerate(res.layer_histogram) if c))
        if res.key_heads_before_injection:
            print("cannot read θ (layer <= injection):",
                  " ".join(f"{a}.{b}" for a, b in res.key_heads_before_injection))
        rows = [{"setting": s, "mode": m, "none": r.baseline, "key": r.ablated, "random": r.random}
                for s, part in (("vector", res.ablation), (f"{res.icl_shots}-shot ICL", res.icl or {}))
                for m, r in part.items()]
        print_table([{k: (str(v) if hasattr(v, "ci_low") else v) for k, v in row.items()} for row in rows])
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
                         ridge=args.ridge, design=args.design, n_fit_prompts=args.fit_prompts,
                         n=args.n, template=args.template, seed=args.seed)
    _write(args, res, {"geometry": figures.geometry_curves(res), "logit_lens": figures.logit_lens_table(res)})
    if args.json:
        print_json(res)
    else:
        def cell(key, i):
            ci = res.get(f"{key}_ci", [None] * (i + 1))[i]
            v = res[key][i]
            return f"{v:.3f}" if not ci or ci[0] != ci[0] else f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

        print_table([{"layer": res["layers"][i],
                      **{k: cell(k, i) for k in ("rotation_cos", "scale_ratio", "fit_r2")},
                      "mixed_r2": round(res["designs"][i]["mixed"]["fit_r2"], 3),
                      "linear_accuracy": res["linear_accuracy"][i],
                      "vector_accuracy": res["vector_accuracy"][i]}
                     for i in range(len(res["layers"]))])
        print(f"design {res['design']} ({args.fit_prompts} prompts; intervals over prompts), "
              f"template {res['template']}")
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
    from tvlens.attribution import ablate_heads, head_saliency, parse_heads, readable_heads, select_key_heads
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
    if heads is None:  # the top P% of the heads that can read the vector (--rank all: of all)
        candidates = readable_heads(model, vec, args.rank)
        heads = select_key_heads(head_saliency(model, prompts, vec)[0], percent, candidates)
    res = ablate_heads(model, task, heads, args.mode, vec, args.random_control, seed=args.seed,
                       prompts=prompts, random_from=args.random_from)
    out = res.to_dict()
    if args.json:
        print_json(out)
    else:
        print_table([{"heads": len(res.heads), "mode": res.mode, "template": res.template,
                      "none": str(res.baseline), "ablated": str(res.ablated),
                      "random": str(res.random) if res.random is not None else "-",
                      "random from": res.random_from}])
    return 0
