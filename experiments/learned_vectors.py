"""Learned task vectors on the embedded model: Table-1 grid, layer sweep, composition.

    python experiments/learned_vectors.py grid  --tasks antonym --steps 40 --n 48
    python experiments/learned_vectors.py sweep --tasks antonym --layers 3,9,15,21,27
    python experiments/learned_vectors.py compose --steps 40

Each part prints a Markdown table (copied into docs/results/history/learned.md) and writes JSON
(and the sweep figure) under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

torch.set_num_threads(1)

import tvlens  # noqa: E402
from tvlens.learn import learn_task_vector  # noqa: E402
from tvlens.learn.experiments import (CONFIGURATIONS, compare_methods_by_layer,  # noqa: E402
                                      composition, configuration)


def markdown(df: pd.DataFrame, index: bool = False) -> str:
    """A Markdown table (no tabulate dependency)."""
    if index:
        df = df.reset_index()
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def grid(model, tasks, args) -> pd.DataFrame:
    rows = []
    for name in tasks:
        task = tvlens.load_task(name)
        kw = dict(n=args.n, progress=False, template=args.template)
        zs = tvlens.evaluate(model, task, **kw)
        icl = tvlens.evaluate(model, task, shots=5, **kw)
        for cfg_name in CONFIGURATIONS:
            cfg = configuration(model, cfg_name, args.base_layer)
            tv = learn_task_vector(model, task, cfg["layers"], cfg["positions"], shots=cfg["shots"],
                                   steps=args.steps, progress=False, template=args.template)
            res = tvlens.evaluate(model, task, vector=tv, shots=cfg["shots"], **kw)
            rows.append({"task": name, "configuration": cfg_name, "layers": cfg["layers"],
                         "positions": cfg["positions"], "shots": cfg["shots"],
                         "ltv": res.accuracy, "ci_low": res.ci_low, "ci_high": res.ci_high,
                         "zero_shot": zs.accuracy, "icl_5shot": icl.accuracy,
                         "steps_run": tv.history["steps_run"],
                         "train_seconds": round(tv.history["train_seconds"], 1),
                         "prefix_cache": tv.history["prefix_cache"]})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["grid", "sweep", "compose"])
    ap.add_argument("--tasks", default="antonym")
    ap.add_argument("--layers", default="3,9,15,21,27")
    ap.add_argument("--base-layer", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--no-fv", action="store_true")
    ap.add_argument("--template", default="qa", help="qa (default) or arrow")
    ap.add_argument("--compose", default="present_past,capitalize",
                    help="two tasks A,B: vectors for A and B are added and scored on B(A(x))")
    ap.add_argument("--out", default="/tmp/ltv_results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = tvlens.load_model(progress=False)
    tasks = args.tasks.split(",")
    t0 = time.perf_counter()
    if args.part == "grid":
        df = grid(model, tasks, args)
        df.to_json(out / "grid.json", orient="records")
        print(markdown(df.drop(columns=["layers"])))
    elif args.part == "sweep":
        from tvlens.plots import accuracy_by_layer, export

        layers = [int(x) for x in args.layers.split(",")]
        for name in tasks:
            curves, refs = compare_methods_by_layer(model, name, layers, n=args.n, steps=args.steps,
                                                    include_fv=not args.no_fv, template=args.template)
            df = pd.concat(curves.values())
            df.to_json(out / f"sweep_{name}.json", orient="records")
            print(f"## {name}; references: "
                  + json.dumps({k: [round(x, 3) for x in v] for k, v in refs.items()}))
            print(markdown(df.pivot(index="layer", columns="name", values="accuracy"), index=True))
            fig = accuracy_by_layer(curves, refs, title=f"{name}: accuracy by layer (SmolLM2-135M)")
            export(fig, out / f"sweep_{name}.html")
    else:
        first, second = args.compose.split(",")
        df = composition(model, first, second, args.base_layer or 10, n=args.n, steps=args.steps,
                         progress=False, template=args.template)
        df.to_json(out / "compose.json", orient="records")
        print(markdown(df))
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
