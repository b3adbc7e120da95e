"""Indirect effects: tvlens's fast path vs Todd et al.'s released code, in seconds per prompt.

Todd et al.'s ``compute_indirect_effect`` (github.com/ericwtodd/function_vectors,
``src/compute_indirect_effect.py``) runs one full forward per head and prompt (L·H forwards
per prompt, unbatched, hooks from ``baukit``). When a checkout of it is present — a folder
holding ``function_vectors/`` and ``baukit/`` (github.com/davidbau/baukit), given by
``--todd`` or the ``TODD_FV_PATH`` environment variable — it runs on the *same* token ids
and the *same* weights as tvlens (a second Hugging Face copy of the model loaded from the
folder the bridge was built from), and its time per prompt is compared with tvlens's
default :func:`~tvlens.extract.indirect_effects` (batched across heads, prefix KV cache).
Without it, the baseline is tvlens's own per-head loop
:func:`~tvlens.extract.indirect_effects_loop` (Todd's scheme, batched across prompts).

    TODD_FV_PATH=/tmp/todd python benchmarks/bench_fv_vs_todd.py --prompts 2
    python benchmarks/bench_fv_vs_todd.py --prompts 2            # vs tvlens's loop

Prints seconds per prompt, the ratio baseline / fast, whether it meets the >= 5x target,
and the largest |AIE difference| between the two.

Todd's code is called, never edited, through small adapters (:func:`load_todd`,
:class:`Feed`, :class:`Recorder`): his functions draw demonstrations and queries with
``np.random`` from a dataset; :class:`Feed` hands him tvlens's prompts in order instead,
his label shuffle is replayed from the same ``np.random`` seed so that it lands on
tvlens's shuffled labels, and :class:`Recorder` checks that every forward he runs reads
exactly tvlens's token ids. Shims, all outside his code: ``bitsandbytes`` and
``sklearn`` stubs (imported at the top of his modules, used only for 4-bit Llama-70B and
dataset splitting), ``baukit`` loaded from ``nethook.py`` alone when its package
``__init__`` cannot import (it needs torchvision), and a ``name_or_path`` containing
``"llama"`` (his ``replace_activation_w_avg`` picks the output projection by model name
and has no branch for other names).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from tvlens import load_model, load_task
from tvlens.errors import TvlensError
from tvlens.extract import indirect_effects, indirect_effects_loop
from tvlens.interventions import z_hook_name
from tvlens.kv_cache import hf_model
from tvlens.prompts import PromptSet, sample_queries
from tvlens.runner import run

TARGET = 5.0  # the speed-up asked of the fast path over the per-head loop


# ----- Todd's code, imported unmodified ---------------------------------------------------
def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        sys.modules[name] = mod


def load_todd(path: str | Path) -> types.SimpleNamespace:
    """Import Todd's ``compute_indirect_effect`` and ``utils.*`` from ``path`` (see above)."""
    root = Path(path)
    src, bau = root / "function_vectors" / "src", root / "baukit"
    if not (src / "compute_indirect_effect.py").is_file() or not (bau / "nethook.py").is_file():
        raise TvlensError(f"{str(root)!r} does not hold function_vectors/src and baukit/; check out "
                          "github.com/ericwtodd/function_vectors and github.com/davidbau/baukit there")

    def _no_split(*a, **k):
        raise TvlensError("sklearn is stubbed here: Todd's dataset splitting is not used")

    _stub("bitsandbytes")  # only for 4-bit Llama-70B
    _stub("sklearn")
    _stub("sklearn.model_selection", train_test_split=_no_split)
    if "baukit" not in sys.modules:
        sys.path.insert(0, str(root))
        try:
            importlib.import_module("baukit")
        except ImportError:  # its __init__ imports widgets needing torchvision: nethook alone
            sys.modules.pop("baukit", None)
            pkg = types.ModuleType("baukit")
            pkg.__path__ = [str(bau)]
            sys.modules["baukit"] = pkg
            spec = importlib.util.spec_from_file_location("baukit.nethook", bau / "nethook.py")
            nethook = importlib.util.module_from_spec(spec)
            sys.modules["baukit.nethook"] = nethook
            spec.loader.exec_module(nethook)
            pkg.Trace, pkg.TraceDict, pkg.get_module = nethook.Trace, nethook.TraceDict, nethook.get_module
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    cie = importlib.import_module("compute_indirect_effect")
    ext = importlib.import_module("utils.extract_utils")
    return types.SimpleNamespace(
        compute_indirect_effect=cie.compute_indirect_effect,
        get_mean_head_activations=ext.get_mean_head_activations,
        get_answer_id=ext.get_answer_id, get_token_meta_labels=ext.get_token_meta_labels,
        get_dummy_token_labels=ext.get_dummy_token_labels,
        compute_duplicated_labels=ext.compute_duplicated_labels, update_idx_map=ext.update_idx_map,
        word_pairs_to_prompt_data=ext.word_pairs_to_prompt_data,
        function_vector_intervention=ext.function_vector_intervention,
    )


def todd_model(bridge):
    """``(hf_model, tokenizer, model_config)`` for Todd's code: a second float32 copy of the
    Hugging Face model under ``bridge``, loaded from the same folder (same weights), eager
    attention as in tvlens's loader; the bridge's own tokenizer (TransformerLens makes it
    prepend BOS, which a fresh ``AutoTokenizer`` of SmolLM2 does not), so both read the same
    ids; ``model_config`` as his Llama branch of ``load_gpt_model_and_tokenizer`` builds it."""
    from transformers import AutoModelForCausalLM

    inner = hf_model(bridge)
    if inner is None or not hasattr(inner, "model") or not hasattr(inner.model, "layers"):
        raise TvlensError("Todd's adapter needs a bridge over a Llama-style Hugging Face model "
                          "(model.layers.{l}.self_attn.o_proj); load one with tvlens.load_model")
    source = inner.config._name_or_path
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                              attn_implementation="eager").eval()
    tok = bridge.tokenizer
    c = hf.config
    cfg = {
        "n_heads": c.num_attention_heads, "n_layers": c.num_hidden_layers, "resid_dim": c.hidden_size,
        # his replace_activation_w_avg dispatches on the name; SmolLM2 is a LlamaForCausalLM
        "name_or_path": f"{source} (llama)",
        "attn_hook_names": [f"model.layers.{l}.self_attn.o_proj" for l in range(c.num_hidden_layers)],
        "layer_hook_names": [f"model.layers.{l}" for l in range(c.num_hidden_layers)],
        # "the tokenizer adds BOS itself" (his Llama setting): then he adds no BOS text
        "prepend_bos": tok("a")["input_ids"][0] == tok.bos_token_id,
    }
    if c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads) != c.hidden_size:
        raise TvlensError("Todd's code splits o_proj's input into resid_dim // n_heads per head; "
                          "this model's heads do not tile d_model")
    return hf, tok, cfg


class Recorder:
    """A tokenizer that records the ids of every model input (``return_tensors="pt"``)."""

    def __init__(self, tokenizer):
        self._tok, self.inputs = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        out = self._tok(text, *args, **kwargs)
        if kwargs.get("return_tensors") == "pt":
            self.inputs.append(out["input_ids"].tolist())
        return out

    def __getattr__(self, name):
        return getattr(self._tok, name)


class _Split:
    def __init__(self, rows, width):
        self.rows, self.width, self.i = rows, width, 0

    def __len__(self):
        return self.width

    def __getitem__(self, _ignored):  # the n-th call gets the n-th prompt's pairs
        row = self.rows[self.i]
        self.i += 1
        return row


class Feed(dict):
    """Todd's ``dataset`` that hands out given prompts in order: ``dataset['train'][idx]``
    gives the next prompt's demonstrations, ``dataset['valid'][idx]`` its query (his
    ``np.random.choice`` indices are drawn but ignored)."""

    def __init__(self, demos, queries, shots):
        super().__init__(
            train=_Split([{"input": [a for a, _ in d], "output": [b for _, b in d]} for d in demos], shots),
            valid=_Split([{"input": [x], "output": [y]} for x, y in queries], 1))


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    """Todd's code draws from numpy's global RNG: seed it for his call, then put back the
    state it had (so the benchmark leaves no trace on the global RNG)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _todd_rng_replay(n_trials: int, shots: int, seed: int) -> list[np.ndarray]:
    """The label permutations ``compute_indirect_effect`` draws after ``np.random.seed(seed)``:
    per trial ``choice(len(train), shots)``, ``choice(filter_set, 1)``, then
    ``word_pairs_to_prompt_data``'s ``np.random.permutation(labels)``."""
    perms = []
    with _global_numpy_seed(seed):
        for _ in range(n_trials):
            np.random.choice(shots, shots, replace=False)
            np.random.choice(np.arange(1), 1, replace=False)
            perms.append(np.random.permutation(np.arange(shots)))
    return perms


def _rows(batch) -> list[list[int]]:
    """The unpadded token ids of every row of a left-padded batch."""
    return [r[m.bool()].tolist() for r, m in zip(batch.input_ids, batch.attention_mask)]


def _check_inputs(recorded, expected) -> None:
    """Todd tokenizes each prompt once for the model (then runs it 1 + L·H times)."""
    got = [r[0] for r in recorded]
    for i, (g, w) in enumerate(itertools.zip_longest(got, expected)):
        if g != w:
            raise TvlensError(f"Todd's model input {i} is not tvlens's prompt {i} ({len(got)} inputs "
                              f"recorded, {len(expected)} prompts): the adapter fed other prompts")


def todd_mean_head_activations(todd, hf, tok, cfg, prompts, *, shots: int, seed: int = 0):
    """His ``get_mean_head_activations`` on ``prompts`` (a clean :class:`PromptSet`):
    ``[L, H, n_slots, d_head]``, slot ``-1`` the last token."""
    ex = prompts.examples
    rec = Recorder(tok)
    with torch.no_grad(), _global_numpy_seed(seed):
        mean = todd.get_mean_head_activations(Feed([e.demos for e in ex], [(e.x, e.y) for e in ex], shots),
                                              hf, cfg, rec, n_icl_examples=shots, N_TRIALS=len(ex))
    _check_inputs(rec.inputs, _rows(prompts.batch))
    return mean


def todd_indirect_effects(todd, hf, tok, cfg, prompts, mean, *, shots: int, seed: int = 0):
    """His ``compute_indirect_effect`` on ``prompts`` (a shuffled-label :class:`PromptSet`):
    ``[M, L, H]`` indirect effects per prompt, AIE = mean over dim 0.

    His shuffle permutes the labels he is given by ``π`` (replayed from ``seed``); he is
    given ``labels[π⁻¹]`` so that he writes tvlens's shuffled labels. Checks that every
    prompt he tokenizes is tvlens's (ids equal) and that his last token
    maps to the last slot of his mean activations.
    """
    ex = prompts.examples
    perms = _todd_rng_replay(len(ex), shots, seed)
    demos = []
    for e, perm in zip(ex, perms):
        fed = [None] * shots
        for k, p in enumerate(perm):  # permutation(fed) == fed[perm] == tvlens's labels
            fed[int(p)] = e.demos[k][1]
        demos.append([(a, b) for (a, _), b in zip(e.demos, fed)])
    rec = Recorder(tok)
    with torch.no_grad(), _global_numpy_seed(seed):
        ie = todd.compute_indirect_effect(Feed(demos, [(e.x, e.y) for e in ex], shots), mean, hf, cfg,
                                          rec, n_shots=shots, n_trials=len(ex))
    _check_inputs(rec.inputs, _rows(prompts.batch))
    dummy = todd.get_dummy_token_labels(shots, tokenizer=tok, model_config=cfg)
    for e in ex:
        data = todd.word_pairs_to_prompt_data({"input": [a for a, _ in e.demos], "output": [b for _, b in e.demos]},
                                              query_target_pair={"input": [e.x], "output": [e.y]})
        labels, _ = todd.get_token_meta_labels(data, tok, query=data["query_target"]["input"],
                                               prepend_bos=cfg["prepend_bos"])
        idx_map = todd.update_idx_map(*todd.compute_duplicated_labels(labels, dummy))
        if idx_map[len(labels) - 1] != len(dummy) - 1:
            raise TvlensError("Todd's last token does not map to the last slot of his mean activations")
    return ie


def tvlens_mean_z(model, prompts, batch_size: int = 8) -> torch.Tensor:
    """``z̄[l, h]`` over ``prompts`` at the last token (what ``mean_head_outputs`` computes,
    on given prompts): ``[L, H, d_head]``."""
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    out = run(model, prompts, capture=names, capture_at="last", logits=None, batch_size=batch_size,
              progress=False)
    return torch.stack([out.captured[n] for n in names], dim=1).float().mean(0)


def oracle_prompts(model, task, *, n_clean: int, n_shuffled: int, shots: int, seed: int):
    """The conformance prompts: clean and shuffled-label ``shots``-shot prompts, template
    ``"fv"``, train queries sampled with ``seed`` (tests/test_fv_todd.py rebuilds them)."""
    clean = PromptSet.build(model, task, queries=sample_queries(task, n_clean, seed=seed, shots=shots),
                            shots=shots, template="fv", seed=seed)
    shuffled = PromptSet.build(model, task, queries=sample_queries(task, n_shuffled, seed=seed, shots=shots),
                               shots=shots, template="fv", seed=seed, shuffled=True)
    return clean, shuffled


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="antonym")
    p.add_argument("--prompts", type=int, default=2, help="shuffled-label prompts timed")
    p.add_argument("--mean-prompts", type=int, default=10, help="clean prompts for the mean head outputs")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=64, help="rows per batched forward")
    p.add_argument("--todd", default=os.environ.get("TODD_FV_PATH"),
                   help="folder with function_vectors/ and baukit/ (default: $TODD_FV_PATH)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", progress=False)
    task = load_task(args.task)
    clean, shuffled = oracle_prompts(model, task, n_clean=args.mean_prompts, n_shuffled=args.prompts,
                                     shots=args.shots, seed=args.seed)
    mz = tvlens_mean_z(model, clean)
    fast = lambda: indirect_effects(model, task, mz, batch=shuffled, batch_size=args.batch_size)  # noqa: E731
    fast()  # warm-up (allocations, the cache probe)
    aie_fast, s_fast = timed(fast)
    if args.todd:
        todd = load_todd(args.todd)
        hf, tok, cfg = todd_model(model)
        mean = todd_mean_head_activations(todd, hf, tok, cfg, clean, shots=args.shots, seed=args.seed)
        ie, s_base = timed(lambda: todd_indirect_effects(todd, hf, tok, cfg, shuffled, mean,
                                                         shots=args.shots, seed=args.seed))
        aie_base, baseline = ie.mean(0), "todd compute_indirect_effect"
    else:
        aie_base, s_base = timed(lambda: indirect_effects_loop(model, task, mz, batch=shuffled))
        baseline = "tvlens indirect_effects_loop"
    n = len(shuffled)
    ratio = s_base / s_fast
    result = {
        "model": args.model, "task": args.task, "prompts": n, "heads": int(aie_fast.numel()),
        "prompt_tokens": int(shuffled.batch.seq_len), "threads": args.threads, "baseline": baseline,
        "s_per_prompt": {"fast": round(s_fast / n, 3), "baseline": round(s_base / n, 3)},
        "speedup": round(ratio, 1), "target": TARGET, "meets_target": bool(ratio >= TARGET),
        "max_abs_diff_aie": float((aie_fast - aie_base).abs().max()),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['heads']} heads × {n} prompts of ≤{result['prompt_tokens']} tokens, {args.model}, "
              f"{args.threads} thread(s)")
        print(f"  tvlens fast (default prefix cache) {s_fast / n:8.2f} s/prompt")
        print(f"  {baseline:33s} {s_base / n:8.2f} s/prompt")
        print(f"  speed-up ×{ratio:.1f} (target ×{TARGET:g}: {'met' if ratio >= TARGET else 'NOT met'}); "
              f"max|ΔAIE| {result['max_abs_diff_aie']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
