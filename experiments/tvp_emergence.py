"""Task-vector emergence with and without the TVP loss (METHODS.md, "Task-vector prompting loss").

Trains the same seeded small transformer twice on synthetic ICL tasks — once with
L = L_ICL + λ·L_TVP, once with L_ICL alone — and measures ICL accuracy (in distribution,
held-out task parameters, longer contexts) and task-vector accuracy at every layer.
Writes ``result.json`` and the two figures (``.html``) to ``--out``.

    python experiments/tvp_emergence.py --preset default --out runs/tvp_default
    python experiments/tvp_emergence.py --preset tiny --out /tmp/tvp_tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from tvlens.emergence import compare, get_preset  # noqa: E402
from tvlens.emergence.figures import accuracy_by_layer_figure, training_curves_figure  # noqa: E402
from tvlens.io import write_json  # noqa: E402
from tvlens.plots import export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="default", choices=["tiny", "default"])
    p.add_argument("--out", default="runs/tvp_emergence")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = get_preset(args.preset)
    start = time.perf_counter()

    def log(arm, e):
        print(f"[{time.perf_counter() - start:6.0f}s] {arm:11s} step {e['step']:5d} "
              f"loss {e['loss']:.3f} icl {e['icl_accuracy']:.3f} tv@{cfg.tvp_layer} {e['tv_accuracy']:.3f}",
              flush=True)

    result = compare(cfg, log=log)
    result["wall_seconds"] = time.perf_counter() - start
    write_json(out / "result.json", result, indent=1)
    export(accuracy_by_layer_figure(result), out / "tv_accuracy_by_layer.html")
    export(training_curves_figure(result), out / "training_curves.html")
    print(f"\npreset {args.preset}: {result['wall_seconds']:.0f} s wall")
    keys = ["icl_accuracy", "ood_icl_accuracy", "long_context_icl_accuracy", "zero_shot_accuracy"]
    for arm in ("with_tvp", "without_tvp"):
        r = result[arm]
        print(arm, " ".join(f"{k}={r[k]:.3f}" if r[k] is not None else f"{k}=NA" for k in keys),
              "tv_by_layer=" + ",".join(f"{a:.3f}" for a in r["tv_accuracy_by_layer"]),
              "ood_tv_by_layer=" + (",".join(f"{a:.3f}" for a in r["ood_tv_accuracy_by_layer"])
                                    if r["ood_tv_accuracy_by_layer"] else "NA"),
              f"train_s={r['train_seconds']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
