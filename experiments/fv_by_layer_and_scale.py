"""A function vector built at one layer, then added at other layers and scaled: where and at
what size it acts (docs/results/history/extracted.md, "Function vectors on Gemma-3").

    python experiments/fv_by_layer_and_scale.py --model gemma-3-270m --task capitalize \\
        --layer 9 --at 3,6,9,12 --scales 1,3,10 --n 24
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import tvlens
from tvlens.prompts import PromptSet
from tvlens.runner import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="capitalize")
    ap.add_argument("--layer", type=int, default=9, help="the layer the FV is built for")
    ap.add_argument("--at", default="3,6,9,12", help="layers to add it at")
    ap.add_argument("--scales", default="1,3,10")
    ap.add_argument("--n", type=int, default=24, help="test items per accuracy")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--n-ie-prompts", type=int, default=8)
    args = ap.parse_args()
    model = tvlens.load_model(args.model, progress=False)
    task = tvlens.load_task(args.task)
    fv = tvlens.function_vector(model, task, layer=args.layer, n_prompts=args.n_prompts,
                                n_ie_prompts=args.n_ie_prompts)
    print("top heads", fv.history["heads"])
    if "post_norm_scales" in fv.history:
        print("post-norm scales", [round(x, 2) for x in fv.history["post_norm_scales"]])
    print(f"FV norm {float(fv.vectors.norm()):.1f}")
    layers = [int(x) for x in args.at.split(",")]
    prompts = PromptSet.build(model, task, n=16, template=fv.template)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    out = run(model, prompts, capture=hooks, capture_at="last", logits=None)
    print("| FV added at layer | residual norm | " + " | ".join(f"×{s}" for s in args.scales.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.scales.split(",")))
    for layer, hook in zip(layers, hooks):
        cells = []
        for s in (float(x) for x in args.scales.split(",")):
            r = tvlens.evaluate(model, task, vector=replace(fv, layers=(layer,), vectors=fv.vectors * s),
                                n=args.n)
            cells.append(f"{r.accuracy:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]")
        print(f"| {layer} | {float(out.captured[hook].norm(dim=-1).mean()):.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
