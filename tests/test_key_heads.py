"""Key heads that can read θ: ranking after the injection layer, the layer histogram,
layer-matched random controls, the plain-ICL control, the last-layer refusal (issue 14.4)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import tvlens
from tvlens import TaskVector, TvlensError
from tvlens.attribution import (
    ablate_heads, figures, head_saliency, injection_layer, key_head_analysis, layer_histogram,
    random_head_sets, readable_heads, select_key_heads,
)
from tvlens.heads import all_heads
from tvlens.interventions import HeadPatch
from tvlens.prompts import PromptSet
from tvlens.tasks import Task
from attribution_helpers import random_vector


def _gray(model, task, alpha, layer=0):
    """Every answer is " gray"; the vector is ``alpha`` × the unit unembedding of " gray" at
    ``layer``. On the 3-layer ``tiny`` fixture, in the ``qa`` format, 2-shot ICL gets 2/8 of
    the first 8 test queries and zero-ablating heads 1.0-1.3 gets 8/8 (found by a search over
    the task's words): a setting where plain ICL *and* its ablation move, so the identities
    below compare accuracies that are not all 0 or all 1."""
    gray = Task("gray", tuple((x, "gray") for x, _ in task.pairs))
    (gid,) = model.tokenizer.encode(" gray", add_special_tokens=False)
    u = model.W_U[:, gid].detach()
    return gray, TaskVector.single(model, alpha * u / u.norm(), layer)


def _histogram_of(heads, n_layers):
    c = Counter(layer for layer, _ in heads)
    return [c.get(layer, 0) for layer in range(n_layers)]


def test_select_key_heads_ranks_only_the_given_heads():
    """Synthetic scores that peak in the early layers: the top 25% of the heads after
    layer 1 are the largest *later* scores, never an earlier head, and k = round(n · p)."""
    L, H = 5, 4
    scores = torch.arange(L * H, 0, -1, dtype=torch.float32).reshape(L, H)  # layer 0 highest
    scores[3, 2] = 100.0  # the single largest score sits after the injection
    after = [(layer, h) for layer in range(2, L) for h in range(H)]  # 12 heads
    keys = select_key_heads(scores, 25, after)
    assert len(keys) == 3  # round(12 · 0.25)
    assert keys == [(3, 2), (2, 0), (2, 1)]  # largest first, ties layer-major
    assert select_key_heads(scores, 25)[:2] == [(3, 2), (0, 0)]  # all heads: layer 0 wins
    assert select_key_heads(scores, 1, after) == [(3, 2)]  # at least one head
    assert layer_histogram(keys, L) == [0, 0, 2, 1, 0]


@pytest.mark.parametrize("layer", [0, 1])
def test_default_ranking_never_returns_a_head_at_or_before_the_injection_layer(tiny, task, layer):
    vec = random_vector(tiny, layer)
    L, H = int(tiny.cfg.n_layers), int(tiny.cfg.n_heads)
    assert injection_layer(vec) == layer
    assert readable_heads(tiny, vec) == [(l2, h) for l2 in range(layer + 1, L) for h in range(H)]
    res = key_head_analysis(tiny, task, vec, percent=50, n=6, random_control=2, modes=("zero",),
                            ground_truth=False, icl=False)
    n_after = (L - 1 - layer) * H
    assert res.k == round(n_after * 0.5) and len(res.candidates) == n_after
    assert all(h[0] > layer for h in res.key_heads)
    assert res.key_heads_before_injection == []
    sal = res.saliency.values  # every head is still scored; the ranking is what is restricted
    assert torch.isfinite(sal).all() and sal.shape == (L, H)
    others = [sal[hd] for hd in res.candidates if hd not in res.key_heads]
    assert min(sal[hd] for hd in res.key_heads) >= max(others)
    # rank='all': the old ranking, with the heads that cannot read θ flagged
    full = key_head_analysis(tiny, task, vec, percent=50, n=6, random_control=0, modes=("zero",),
                             ground_truth=False, icl=False, rank="all")
    assert full.key_heads == select_key_heads(sal, 50)  # same saliency, every head ranked
    early = [hd for hd in full.key_heads if hd[0] <= layer]
    assert early, "on this model the unrestricted ranking picks early heads (else the check is vacuous)"
    assert full.key_heads_before_injection == early
    assert full.to_dict()["key_heads_before_injection"] == [list(h) for h in early]


def test_random_sets_match_the_key_heads_per_layer_counts():
    model = tvlens.tiny_model(d_vocab=50, n_layers=5, d_model=32, n_heads=4)
    heads = [(1, 0), (1, 2), (3, 1), (3, 3), (4, 1)]  # at most half of each layer
    draws = random_head_sets(model, heads, 20, seed=3)
    for pick in draws:
        assert _histogram_of(pick, 5) == _histogram_of(heads, 5)  # same layers, same counts
        assert not set(pick) & set(heads) and len(set(pick)) == len(heads)  # others, no repeats
    assert len({tuple(sorted(p)) for p in draws}) > 1  # the draws differ
    assert draws == random_head_sets(model, heads, 20, seed=3)  # seeded
    # layer 2 is all key heads: the draw keeps the counts and reuses them (overlap reported)
    full = [(2, h) for h in range(4)] + [(3, 0)]
    for pick in random_head_sets(model, full, 5, seed=0):
        assert _histogram_of(pick, 5) == _histogram_of(full, 5)
        assert set(pick) & set(full) == {(2, h) for h in range(4)}
    # random_from='all': uniform over the heads not given (the pre-issue-14 control)
    import random

    rng, pool = random.Random(0), [hd for hd in all_heads(model) if hd not in set(heads)]
    assert random_head_sets(model, heads, 3, seed=0, random_from="all") == [
        rng.sample(pool, len(heads)) for _ in range(3)]


def test_ablation_result_uses_layer_matched_draws_scored_by_evaluate(tiny, task):
    gray, vec = _gray(tiny, task, 2.0)
    keys = [(1, 0), (1, 3), (2, 2)]
    res = ablate_heads(tiny, gray, keys, "zero", vec, 3, n=8, template="qa", seed=0)
    d = res.to_dict()
    assert d["random_from"] == "layers" and len(d["random_heads"]) == 3
    for pick in res.random_heads:
        assert _histogram_of(pick, 3) == [0, 2, 1]
    assert res.random_heads == random_head_sets(tiny, keys, 3, seed=0)
    for pick, acc in zip(res.random_heads, res.random_accuracies):
        ev = tvlens.evaluate(tiny, gray, vector=vec + HeadPatch.zero(tiny, pick), n=8, template="qa")
        assert acc == pytest.approx(ev.accuracy, abs=1e-12)


def test_histogram_sums_to_k_and_shows_in_dict_frame_and_figure(tiny, task):
    vec = random_vector(tiny, 0)
    res = key_head_analysis(tiny, task, vec, percent=50, n=6, random_control=1, modes=("zero",),
                            ground_truth=True, icl=False)
    d = res.to_dict()
    assert sum(d["layer_histogram"]) == d["k"] == len(d["key_heads"]) == 4  # round(8 · 0.5)
    assert d["layer_histogram"] == _histogram_of(res.key_heads, 3)
    assert d["layer_histogram"][0] == 0 and d["injection_layer"] == 0 and d["rank"] == "after"
    layers = res.to_frame("layers")
    assert layers["key_heads"].tolist() == d["layer_histogram"]
    assert layers["readable"].tolist() == [False, True, True]
    assert layers["saliency"].tolist() == pytest.approx(res.saliency.values.sum(1).tolist(), rel=1e-6)
    heads = res.to_frame()
    assert heads["key"].sum() == d["k"] and (heads["readable"] == (heads["layer"] > 0)).all()
    # the ground truth covers the ranked heads only (NaN before the injection layer)
    gt = torch.tensor(d["ground_truth"])
    assert gt[0].isnan().all() and torch.isfinite(gt[1:]).all()
    fig = figures.layer_profile(res.saliency.values, injected_layer=0, histogram=res.layer_histogram)
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and list(bars[0].y) == d["layer_histogram"]
    json.dumps(d)  # plain JSON


def test_plain_icl_ablation_is_ablate_heads_on_k_shot_prompts_without_the_vector(tiny, task):
    """Identity: the ICL half of the analysis is ablate_heads on the same queries as
    ``shots``-shot prompts in the vector's format, no vector; and those are what evaluate
    scores with ``shots`` (no vector) and with the key heads ablated."""
    gray, vec = _gray(tiny, task, 2.0)
    res = key_head_analysis(tiny, gray, vec, percent=50, n=8, random_control=3, shots=2,
                            template="qa", ground_truth=False)
    assert res.icl_shots == 2 and set(res.icl) == {"zero", "mean"}
    for mode in ("zero", "mean"):
        ref = ablate_heads(tiny, gray, res.key_heads, mode, None, 3, n=8, shots=2, template="qa", seed=0)
        assert res.icl[mode].to_dict() == ref.to_dict()  # bit-for-bit: the same calls
        assert res.icl[mode].random_heads == res.ablation[mode].random_heads  # paired controls
    icl = tvlens.evaluate(tiny, gray, shots=2, n=8, template="qa")
    assert res.icl["zero"].baseline_accuracy == pytest.approx(icl.accuracy)
    assert 0 < icl.accuracy < 1  # a setting where the identity is not 0 == 0
    cut = tvlens.evaluate(tiny, gray, shots=2, n=8, template="qa",
                          vector=HeadPatch.zero(tiny, res.key_heads))
    assert res.icl["zero"].ablated_accuracy == pytest.approx(cut.accuracy)
    # mean ablation in ICL uses the ICL prompts' own means (not the vector's)
    ps = PromptSet.build(tiny, gray, n=8, shots=2, template="qa")
    from tvlens.attribution import head_means

    mean = tvlens.evaluate(tiny, gray, prompts=ps, vector=HeadPatch.mean(
        tiny, res.key_heads, head_means(tiny, ps)))
    assert res.icl["mean"].ablated_accuracy == pytest.approx(mean.accuracy)
    d = res.to_dict()
    assert d["icl_ablate_key_accuracy"] == res.icl["zero"].ablated_accuracy
    assert d["icl_baseline_ci"] == [icl.ci_low, icl.ci_high]
    frame = res.to_frame("ablation")
    assert set(frame["setting"]) == {"vector", "icl"} and len(frame) == 2 * 2 * 3
    bars = figures.ablation_bars(res)
    assert len(bars.data) == 4  # 2 modes × (vector, ICL)
    # no vector: the prompts are ICL already, no separate ICL control
    plain = key_head_analysis(tiny, gray, None, percent=25, n=4, random_control=0, modes=("zero",),
                              shots=2, ground_truth=False)
    assert plain.icl is None and plain.injection_layer is None and len(plain.candidates) == 12


def test_bad_key_heads_for_a_vector_at_the_last_layer(tiny, task):
    last = random_vector(tiny, int(tiny.cfg.n_layers) - 1)
    with pytest.raises(TvlensError, match="last layer: no later head can read it.*rank='all'"):
        key_head_analysis(tiny, task, last, n=4, random_control=0, ground_truth=False)
    with pytest.raises(TvlensError, match="last layer"):
        readable_heads(tiny, last)
    with pytest.raises(TvlensError, match="rank must be"):
        readable_heads(tiny, last, "later")
    with pytest.raises(TvlensError, match="random_from must be"):
        random_head_sets(tiny, [(1, 0)], 1, random_from="layer")
    with pytest.raises(TvlensError, match="cannot tell which layer"):
        injection_layer(HeadPatch.zero(tiny, [(0, 0)]))
    with pytest.raises(TvlensError, match="to_frame takes"):
        key_head_analysis(tiny, task, random_vector(tiny, 0), n=4, random_control=0, modes=("zero",),
                          ground_truth=False, icl=False).to_frame("layer")
    # rank='all' is allowed, and says that every key head comes before the vector
    res = key_head_analysis(tiny, task, last, n=4, random_control=0, modes=("zero",),
                            ground_truth=False, icl=False, rank="all")
    assert res.key_heads_before_injection == res.key_heads


def test_cli_key_heads_and_ablate_heads_rank_after_the_vector(tiny, task, tmp_path, monkeypatch, capsys):
    import tvlens.models
    from tvlens.cli import main

    monkeypatch.setattr(tvlens.models, "load_model", lambda *a, **k: tiny)
    task_file = tmp_path / "tiny.json"
    task_file.write_text(json.dumps({"pairs": [list(p) for p in task.pairs]}))
    vec = str(random_vector(tiny, 1).save(tmp_path / "v.safetensors"))
    assert main(["attribute", "key-heads", "--task", str(task_file), "--vector", vec, "--n", "4",
                 "--random-control", "1", "--shots", "2", "--top", "50", "--no-ground-truth",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(h[0] == 2 for h in out["key_heads"]) and out["layer_histogram"] == [0, 0, 2]
    assert out["icl_shots"] == 2 and "icl_ablate_key_ci" in out and out["random_from"] == "layers"
    assert main(["ablate-heads", "--task", str(task_file), "--vector", vec, "--top", "50%", "--n", "4",
                 "--random-control", "2", "--json"]) == 0
    ab = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [h[0] for h in ab["heads"]] == [2, 2]
    assert all(sorted(layer for layer, _ in pick) == [2, 2] for pick in ab["random_heads"])
    batch = PromptSet.build(tiny, task, n=4).batch
    sal = head_saliency(tiny, batch, TaskVector.load(vec, tiny))[0]
    assert [list(h) for h in select_key_heads(sal, 50, readable_heads(tiny, random_vector(tiny, 1)))] == ab["heads"]
    last = str(random_vector(tiny, 2).save(tmp_path / "last.safetensors"))
    assert main(["ablate-heads", "--task", str(task_file), "--vector", last, "--top", "10%",
                 "--n", "2"]) != 0
    assert "last layer: no later head can read it" in capsys.readouterr().err


@pytest.mark.slow
def test_smol_key_heads_sit_after_the_injection_layer(smol):
    """On SmolLM2 (30 layers × 9 heads) an ICL task vector at layer 15: the 10% key heads of
    the 14 · 9 = 126 later heads (13) all sit in layers 16-29, and the ICL control runs."""
    task = tvlens.load_task("capitalize")
    vec = tvlens.icl_task_vector(smol, task, 15, n_prompts=4)
    res = key_head_analysis(smol, task, vec, n=4, random_control=1, modes=("zero",),
                            ground_truth=False, shots=2)
    assert res.k == 13 and len(res.candidates) == 126
    assert all(h[0] > 15 for h in res.key_heads) and sum(res.layer_histogram) == 13
    for pick in res.ablation["zero"].random_heads:
        assert _histogram_of(pick, 30) == res.layer_histogram
    assert res.icl["zero"].n == 4
    with pytest.raises(TvlensError, match="last layer"):
        readable_heads(smol, tvlens.TaskVector.single(smol, vec.vectors[0, 0], 29))
