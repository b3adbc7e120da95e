"""Step time of LTV training with prefix caching vs the full forward, SmolLM2-135M.

    python benchmarks/bench_prefix_cache.py --layers 3,15,25 --reps 5

For each layer l: one forward+backward step of the LTV loss (batch 16, zero-shot
antonym prompts) with the full forward and with blocks 0..l skipped (cached residual),
interleaved, median of --reps. Reports the ratio cached/full next to the target
(L − l)/L + 0.1 (ratios within one run; absolute times depend on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

torch.set_num_threads(1)

import tvlens  # noqa: E402
from tvlens.learn.prefix import capture_prefix  # noqa: E402
from tvlens.learn.trainer import ltv_loss, select_rows  # noqa: E402
from tvlens.forward import with_answers  # noqa: E402
from tvlens.prompts import PromptSet  # noqa: E402
from tvlens.runner import pad_id  # noqa: E402


def step(model, tf, layer, theta, prefix):
    th = theta.clone().requires_grad_(True)
    t = time.perf_counter()
    ltv_loss(model, tf, [layer], ["last"], th, prefix=prefix).backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="3,15,25")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shots", type=int, default=0,
                    help="demonstrations per prompt (0: the zero-shot LTV setting; 5: LTV + ICL)")
    args = ap.parse_args()
    model = tvlens.load_model(progress=False)
    for p in model.parameters():
        p.requires_grad_(False)
    task = tvlens.load_task("antonym")
    prompts = PromptSet.build(model, task, split="train", n=args.batch, shots=args.shots)
    tf = with_answers(prompts.batch, pad_id(model))
    tf = select_rows(tf, list(range(args.batch)))
    L = int(model.cfg.n_layers)
    print(f"batch {list(tf.input_ids.shape)} ({args.shots}-shot prompts + answers)")
    print("| layer | full step (s) | cached step (s) | ratio | target (L-l)/L+0.1 |")
    print("|---|---|---|---|---|")
    for layer in [int(x) for x in args.layers.split(",")]:
        cache, as_tuple = capture_prefix(model, tf, layer)
        theta = torch.zeros(1, 1, model.cfg.d_model)
        step(model, tf, layer, theta, None)  # warm-up
        full, cached = [], []
        for _ in range(args.reps):
            full.append(step(model, tf, layer, theta, None))
            cached.append(step(model, tf, layer, theta, (layer, cache, as_tuple)))
        f, c = statistics.median(full), statistics.median(cached)
        print(f"| {layer} | {f:.3f} | {c:.3f} | {c / f:.2f} | {(L - layer) / L + 0.1:.2f} |", flush=True)


if __name__ == "__main__":
    main()
