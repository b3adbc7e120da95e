"""Indirect effects: batched across heads vs the per-head loop, as time ratios in one run.

Same prompts, same mean head outputs, same heads for all three:

- ``loop``: one full forward over the prompts per head (Todd's scheme, L·H forwards);
- ``batched``: prompts repeated once per head of a chunk, one hook per layer;
- ``batched+kv``: as batched, but the shared prefix runs once and only the last token is
  recomputed per copy (exact: patching the last position cannot change earlier ones).

    python benchmarks/bench_indirect_effects.py --prompts 4 --layers 0,10,20,29

Prints seconds, speed-ups over the loop, and the largest |difference| from the loop.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tvlens import load_model, load_task
from tvlens.extract import indirect_effects, indirect_effects_loop, mean_head_outputs, shuffled_prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="capitalize")
    p.add_argument("--prompts", type=int, default=4, help="shuffled-label prompts")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--layers", default="0,10,20,29", help="heads of these layers ('all' = every head)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per batched forward")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, progress=False)
    task = load_task(args.task)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layers = range(L) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    heads = [(layer, h) for layer in layers for h in range(H)]
    mz = mean_head_outputs(model, task, shots=args.shots, n_prompts=8, template="qa")
    batch = shuffled_prompts(model, task, shots=args.shots, n_prompts=args.prompts, template="qa")
    runs = {
        "loop": lambda: indirect_effects_loop(model, task, mz, batch=batch, heads=heads),
        "batched": lambda: indirect_effects(model, task, mz, batch=batch, heads=heads,
                                            batch_size=args.batch_size, prefix_cache=False),
        "batched+kv": lambda: indirect_effects(model, task, mz, batch=batch, heads=heads,
                                               batch_size=args.batch_size, prefix_cache=True),
    }
    runs["batched+kv"]()  # warm-up (allocations, first-call overheads)
    seconds, tables = {}, {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        tables[name] = fn()
        seconds[name] = time.perf_counter() - t0
    diff = {n: float((tables[n] - tables["loop"]).nan_to_num().abs().max()) for n in tables}
    result = {
        "model": args.model, "task": args.task, "heads": len(heads), "prompts": len(batch),
        "prompt_tokens": int(batch.seq_len), "threads": args.threads,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "speedup_vs_loop": {k: round(seconds["loop"] / v, 1) for k, v in seconds.items()},
        "max_abs_diff_vs_loop": diff,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(heads)} heads × {len(batch)} prompts of ≤{batch.seq_len} tokens, "
              f"{args.model}, {args.threads} thread(s)")
        for name in runs:
            print(f"  {name:11s} {seconds[name]:8.2f} s   ×{seconds['loop'] / seconds[name]:6.1f}   "
                  f"max|Δ| vs loop {diff[name]:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
