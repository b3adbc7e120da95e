"""Adaptive task vectors: expansion size, training memory, and ATV vs ICL inference cost.

    python benchmarks/bench_adaptive.py [--generator smollm2-135m] [--n 32] [--steps 3]

Reports, in one run on the embedded SmolLM2 target (30 layers, d_model 576):
- the expansion's parameter count, full (d_gen·L·d + L·d) and at rank 64;
- peak resident memory (``resource.getrusage`` maxrss) after loading vs after ``--steps``
  training steps (batch 8): the increase is what training adds (gradients, Adam state,
  activations);
- time per query of first-token evaluation with the generated vector (zero-shot prompt +
  one generator forward) vs 5-shot ICL, as a ratio measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch


def maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / (1024 if sys.platform == "darwin" else 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import tvlens
    from tvlens.adaptive import expansion_parameter_count, make_generator, train_generator

    target = tvlens.load_model(device="cpu", progress=False)
    gen = make_generator(target, args.generator, init="default")
    L, d, d_gen = len(gen.layers), int(target.cfg.d_model), gen.encoder.d_gen
    out = {"generator": args.generator, "d_gen": d_gen, "layers": L, "d_model": d,
           "expansion_parameters_full": gen.expansion_parameters(),
           "expansion_parameters_rank64": expansion_parameter_count(d_gen, L, d, 64),
           "generator_parameters": sum(p.numel() for p in gen.encoder.parameters())}
    rss_loaded = maxrss_mib()
    tasks = [tvlens.load_task(t) for t in ("antonym", "uppercase")]
    t0 = time.perf_counter()
    train_generator(target, gen, tasks, epochs=10, max_steps=args.steps, batch_size=8, progress=False)
    out["train_seconds_per_step"] = (time.perf_counter() - t0) / args.steps
    out["maxrss_after_load_mib"] = rss_loaded
    out["maxrss_after_training_mib"] = maxrss_mib()
    out["training_rss_increase_mib"] = out["maxrss_after_training_mib"] - rss_loaded

    task = tasks[0]
    kw = dict(n=args.n, template=gen.template, batch_size=8, progress=False)
    tvlens.evaluate(target, task, vector=gen, n=8, progress=False)  # warm-up (gen's template)
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, vector=gen, **kw)
    atv = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, shots=5, **kw)
    icl = (time.perf_counter() - t0) / args.n
    t0 = time.perf_counter()
    tvlens.evaluate(target, task, **kw)
    zero = (time.perf_counter() - t0) / args.n
    out.update(atv_seconds_per_query=atv, icl5_seconds_per_query=icl,
               zero_shot_seconds_per_query=zero, atv_over_icl=atv / icl, atv_over_zero_shot=atv / zero)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
