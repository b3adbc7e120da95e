"""Core benchmark (issue 2): injection overhead, model load time, demo peak memory.

    python benchmarks/bench_core.py [--reps 30] [--skip-cold] [--skip-demo]

Prints, in one run on the embedded model:
- injected forward / plain forward time (median of interleaved repetitions; target <= 1.03);
- cold load (GGUF dequantization into a fresh temporary cache) and warm load seconds of
  ``load_model`` (each in a fresh process, import time reported apart; target warm <= 3 s);
- peak resident memory of `tvlens demo` in a child process (target <= 4 GB).
Ratios are taken within this run, so machine noise cancels out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import tvlens
from tvlens.prompts import make_examples, tokenize
from tvlens.runner import forward


def injection_overhead(model, reps: int) -> dict:
    task = tvlens.load_task("antonym")
    examples = make_examples(task.test[:16], task.train, shots=5, seed=0)
    batch = tokenize(model, examples, "qa")
    tv = tvlens.TaskVector.single(model, torch.randn(model.cfg.d_model), 15)
    hooks = tv.hooks(model, batch)
    plain, injected = [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up
            forward(model, batch)
            forward(model, batch, hooks)
        for _ in range(reps):
            t = time.perf_counter()
            forward(model, batch)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            forward(model, batch, hooks)
            injected.append(time.perf_counter() - t)
    p, i = statistics.median(plain), statistics.median(injected)
    return {"batch": list(batch.input_ids.shape), "plain_ms": 1e3 * p, "injected_ms": 1e3 * i,
            "ratio": i / p}


def load_seconds(cache: str | None) -> tuple[float, float]:
    """(seconds to import tvlens, TransformerLens and transformers; seconds of ``load_model``),
    in a fresh process. The imports are paid once per process whatever is loaded."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if cache:
        env["TVLENS_CACHE"] = cache
    code = ("import time; t = time.perf_counter(); import tvlens; "
            "import transformer_lens.model_bridge.sources._bridge_builder, transformers; "
            "i = time.perf_counter() - t; "
            "t = time.perf_counter(); tvlens.load_model(device='cpu', progress=False); "
            "print(i, time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    imp, load = out.stdout.strip().splitlines()[-1].split()
    return float(imp), float(load)


def demo_peak_memory_gb() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tvlens", "demo", "--out", out], check=True,
                       capture_output=True, text=True)
        seconds = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # largest child so far
    return peak_kb / 1024**2, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    results: dict = {"torch_threads": torch.get_num_threads()}
    model = tvlens.load_model(device="cpu", progress=False)
    results["injection"] = injection_overhead(model, args.reps)
    del model
    results["import_s"], results["warm_load_s"] = load_seconds(None)
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as cache:
            results["cold_load_s"] = load_seconds(cache)[1]
        results["warm_load_s_after_cold"] = load_seconds(None)[1]
    if not args.skip_demo:
        results["demo_peak_rss_gb"], results["demo_seconds"] = demo_peak_memory_gb()
    print(json.dumps(results, indent=1))
    inj = results["injection"]
    print(f"injected/plain forward: {inj['ratio']:.3f} (target <= 1.03)  "
          f"[{inj['plain_ms']:.1f} ms vs {inj['injected_ms']:.1f} ms, batch {inj['batch']}]")
    print(f"warm load: {results['warm_load_s']:.2f} s (target <= 3; plus {results['import_s']:.1f} s "
          "to import tvlens, TransformerLens and transformers once per process)"
          + (f"; cold load: {results['cold_load_s']:.1f} s" if "cold_load_s" in results else ""))
    if "demo_peak_rss_gb" in results:
        print(f"demo peak memory: {results['demo_peak_rss_gb']:.2f} GB (target <= 4), "
              f"{results['demo_seconds']:.0f} s")


if __name__ == "__main__":
    main()
