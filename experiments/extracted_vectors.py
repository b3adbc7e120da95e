"""Hendel's main table (zero-shot / ICL task vector / ICL) and FV vs ICL-TV on the embedded model.

For every task: the layer of each method is chosen on the dev split (first ``--n-dev``
items, layers ``--layers``), then zero-shot, vector and ICL first-token accuracy are
measured on the first ``--n-test`` test items with 95% bootstrap CIs.

    python experiments/extracted_vectors.py --tasks capitalize,singular_plural --out /tmp/ext.json

Prints a markdown table; ``--out`` also writes every number as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tvlens import load_model, load_task


DEFAULT_TASKS = ("capitalize,uppercase,first_letter,singular_plural,present_past,antonym,"
                 "country_capital,english_french")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--methods", default="icl-tv,fv", help="comma-separated: icl-tv, vanilla, fv")
    p.add_argument("--templates", default="hendel,fv,arrow", help="comma-separated prompt templates")
    p.add_argument("--layers", default="9,12,15,18,21,24", help="dev-sweep layers")
    p.add_argument("--n-dev", type=int, default=16)
    p.add_argument("--n-test", type=int, default=48)
    p.add_argument("--n-prompts", type=int, default=None,
                   help="prompts averaged (default: each method's own: ICL-TV 32, FV 100)")
    p.add_argument("--fv-shots", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, progress=False)
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    for name in args.tasks.split(","):
        task = load_task(name)
        for method, template in [(m, t) for t in args.templates.split(",")
                                 for m in args.methods.split(",")]:
            t0 = time.time()
            shots = args.fv_shots if method == "fv" else 5
            res = _extract_on(model, task, method, layers, shots, template, args)
            d = res.to_dict() | {"seconds": round(time.time() - t0, 1), "template": template}
            d.pop("dev_sweep", None)
            d["dev_curve"] = res.sweep.curve[["layer", "accuracy"]].round(3).to_dict(orient="list")
            rows.append(d)
            print(f"{name:16s} {method:7s} {template:5s} layer {d['layer']:2d}  zero-shot {d['zero_shot']:.2f}  "
                  f"vector {d['accuracy']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}]  "
                  f"ICL-{shots} {d['icl']:.2f}  ({d['seconds']:.0f} s)", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"model": args.model, "args": vars(args), "rows": rows}, f, indent=1)
    print()
    print(markdown(rows))
    return 0


def _extract_on(model, task, method, layers, shots, template, args):
    """``extract(layer="auto")`` restricted to ``layers`` for the dev sweep."""
    from tvlens.extract import layer_sweep
    from tvlens.extract.sweep import Extraction

    kw = dict(shots=shots, template=template, seed=0)
    if args.n_prompts is not None:
        kw["n_prompts"] = args.n_prompts
    dev = layer_sweep(model, task, method, layers, split="dev", n=args.n_dev, **kw)
    best = dev.best_layer
    test = layer_sweep(model, task, method, [best], split="test", n=args.n_test,
                       vectors={best: dev.vectors[best]}, **kw)
    r = test.curve.iloc[0]
    res = Extraction(dev.vectors[best], method, best, (float(r.accuracy), float(r.ci_low), float(r.ci_high)),
                     test.zero_shot, test.icl, int(r.n), dev)
    return res


def markdown(rows) -> str:
    lines = ["| task | method | template | layer | zero-shot | vector [95% CI] | ICL (K) |",
             "|---|---|---|---|---|---|---|"]
    for d in rows:
        lines.append(f"| {d['task']} | {d['method']} | {d['template']} | {d['layer']} | {d['zero_shot']:.2f} | "
                     f"{d['accuracy']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}] | "
                     f"{d['icl']:.2f} ({d['shots']}) |")
    for method, tmpl in sorted({(d["method"], d["template"]) for d in rows}):
        sel = [d for d in rows if (d["method"], d["template"]) == (method, tmpl)]
        mean = lambda key: sum(d[key] for d in sel) / len(sel)  # noqa: E731
        lines.append(f"| **mean** ({len(sel)} tasks) | {method} | {tmpl} | | {mean('zero_shot'):.2f} | {mean('accuracy'):.2f} | "
                     f"{mean('icl'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
