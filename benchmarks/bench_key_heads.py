"""Saliency (one forward + one backward) vs the exhaustive per-head ablation sweep.

    python benchmarks/bench_key_heads.py --task antonym --n 16

Same prompts, same vector, same model, one run: reports both wall times, their ratio
(target ≥ 50×), Spearman ρ and the top-10% overlap between the two head rankings.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tvlens
from tvlens.attribution import ablation_effects, agreement, head_saliency
from tvlens.attribution._common import query_batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="antonym")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--heads-per-forward", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tvlens.load_model(progress=False)
    task = tvlens.load_task(args.task)
    vec = tvlens.icl_task_vector(model, task, args.layer)
    batch = query_batch(model, task, n=args.n)
    head_saliency(model, batch.select([0]), vec)  # warm-up
    t0 = time.perf_counter()
    sal, _ = head_saliency(model, batch, vec)
    t_sal = time.perf_counter() - t0
    t0 = time.perf_counter()
    gt = ablation_effects(model, batch, vec, mode="zero", heads_per_forward=args.heads_per_forward)
    t_gt = time.perf_counter() - t0
    agr = agreement(sal, gt, 10.0)
    print(json.dumps({"task": args.task, "n": len(batch), "heads": sal.numel(),
                      "saliency_s": round(t_sal, 3), "exhaustive_s": round(t_gt, 3),
                      "speedup": round(t_gt / t_sal, 1), "spearman": round(agr["spearman"], 3),
                      "top10_overlap": round(agr["top_overlap"], 3)}))


if __name__ == "__main__":
    main()
