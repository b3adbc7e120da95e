"""Saliency (one forward + one backward) vs the exhaustive per-head ablation sweep.

    python benchmarks/bench_key_heads.py --task antonym --n 16
    python benchmarks/bench_key_heads.py --n 8 --one-by-one 27   # + batched vs one head per forward

Same prompts, same vector, same model, one run: reports both wall times, their ratio
(target ≥ 50×), Spearman ρ and the top-10% overlap between the two head rankings. With
``--one-by-one K`` it also times the ground truth of the first K heads batched
(``--batch-size`` rows per forward) against one head per forward (``batch_size = n``), and
the largest difference between the two (they compute the same numbers).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tvlens
from tvlens.attribution import ablation_effects, agreement, head_saliency
from tvlens.evaluation import resolve_template
from tvlens.heads import all_heads
from tvlens.prompts import PromptSet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="antonym")
    ap.add_argument("--layer", type=int, default=14)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=512, help="rows (prompts × heads) per forward")
    ap.add_argument("--one-by-one", type=int, default=0, metavar="K",
                    help="also time K heads batched vs one head per forward")
    ap.add_argument("--no-exhaustive", action="store_true", help="skip the full sweep")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = tvlens.load_model(progress=False)
    task = tvlens.load_task(args.task)
    vec = tvlens.icl_task_vector(model, task, args.layer)
    prompts = PromptSet.build(model, task, n=args.n, template=resolve_template(vec, None))
    head_saliency(model, prompts.select([0]), vec)  # warm-up
    t0 = time.perf_counter()
    sal, _ = head_saliency(model, prompts, vec)
    t_sal = time.perf_counter() - t0
    out = {"task": args.task, "n": len(prompts), "heads": sal.numel(), "saliency_s": round(t_sal, 3)}
    if not args.no_exhaustive:
        t0 = time.perf_counter()
        gt = ablation_effects(model, prompts, vec, mode="zero", batch_size=args.batch_size)
        t_gt = time.perf_counter() - t0
        agr = agreement(sal, gt, 10.0)
        out.update(exhaustive_s=round(t_gt, 3), speedup=round(t_gt / t_sal, 1),
                   spearman=round(agr["spearman"], 3), top10_overlap=round(agr["top_overlap"], 3))
    if args.one_by_one:
        heads = all_heads(model)[: args.one_by_one]
        times, res = {}, {}
        for name, bs in (("batched", args.batch_size), ("one_by_one", len(prompts))):
            t0 = time.perf_counter()
            res[name] = ablation_effects(model, prompts, vec, mode="zero", batch_size=bs, heads=heads)
            times[name] = time.perf_counter() - t0
        idx = tuple(torch.tensor(heads).T)
        out.update(k_heads=len(heads), batched_s=round(times["batched"], 3),
                   one_by_one_s=round(times["one_by_one"], 3),
                   batched_speedup=round(times["one_by_one"] / times["batched"], 2),
                   max_abs_diff=float((res["batched"][idx] - res["one_by_one"][idx]).abs().max()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
