"""Synthetic ICL tasks, the TVP loss, training/resume and the emergence comparison."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from tvlens.emergence import (
    PRESETS, SyntheticTask, TVPConfig, Vocab, build_model, compare, consistent_tasks, decode,
    encode, family_parameters, sample_batch, task_split, task_tables, train,
    tv_accuracy_by_layer, tvp_losses,
)
from tvlens.errors import TvlensError
from tvlens.injection import resid_hook_name

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = TVPConfig(n_values=7, families=("offset",), n_heldout=2, n_pairs=3, ood_pairs=5,
                  n_layers=2, d_model=16, n_heads=2, tvp_layer=0, steps=8, batch_size=8,
                  lr=3e-3, warmup=2, n_eval=16)


@pytest.mark.parametrize("family", ["offset", "affine", "permutation"])
def test_sequences_decode_to_their_pairs_and_task(family):
    train_tasks, held = task_split([family], 9, n_heldout=2, n_permutations=5, seed=3)
    assert not set(train_tasks) & set(held)
    if family != "permutation":
        assert len(train_tasks) + len(held) == len(family_parameters(family, 9))
    tables = task_tables(train_tasks)
    batch = sample_batch(tables, 12, 20, torch.Generator().manual_seed(0))
    assert batch.ids.shape == (20, 48)
    for row in range(20):
        task = train_tasks[int(batch.task_index[row])]
        pairs, query = decode(batch.ids[row].tolist(), 9)
        assert query is None
        assert pairs == list(zip(batch.xs[row].tolist(), batch.ys[row].tolist()))
        assert all(task.apply(x) == y for x, y in pairs)
        assert encode(pairs, 9) == batch.ids[row].tolist()
        # the task parameter is recovered: the true task is among the consistent ones,
        # and unique once the pairs cover enough inputs
        found = consistent_tasks(pairs, train_tasks + held)
        assert task in found
        if family == "offset" or len({x for x, _ in pairs}) == 9:
            assert found == [task]
        # the prompt (cut before y_K) decodes to K-1 pairs and the query x_K
        p_pairs, q = decode(batch.prompt_ids()[row].tolist(), 9)
        assert p_pairs == pairs[:-1] and q == pairs[-1][0]
        # the zero-shot query is another input of the same task
        z_pairs, xq = decode(batch.query_ids[row].tolist(), 9)
        assert z_pairs == [] and xq != pairs[-1][0]
        assert task.apply(xq) == int(batch.query_answers[row])


def test_families_are_the_maps_they_claim():
    assert SyntheticTask("offset", (3,), 7).table() == [(x + 3) % 7 for x in range(7)]
    for a, b in family_parameters("affine", 8):
        assert math.gcd(a, 8) == 1
        assert sorted(SyntheticTask("affine", (a, b), 8).table()) == list(range(8))  # bijective
    tr, ho = task_split(["permutation"], 6, n_heldout=2, n_permutations=4, seed=1)
    assert all(sorted(t.param) == list(range(6)) for t in tr + ho)
    assert (tr, ho) == task_split(["permutation"], 6, n_heldout=2, n_permutations=4, seed=1)
    assert tr != task_split(["permutation"], 6, n_heldout=2, n_permutations=4, seed=2)[0]


def test_malformed_sequences_are_refused():
    v = Vocab(5)
    with pytest.raises(TvlensError, match="BOS"):
        decode([0, v.arrow, 1], 5)
    with pytest.raises(TvlensError, match="','"):
        decode([v.bos, 0, v.arrow, 1, 2, v.arrow, 3], 5)


def test_bad_config_is_refused():
    with pytest.raises(TvlensError, match="tvp_lambda"):
        replace(SMALL, tvp_lambda=-0.5).validate()
    with pytest.raises(TvlensError, match="outside the model"):
        replace(SMALL, tvp_layer=2).validate()
    with pytest.raises(TvlensError, match="too few"):
        replace(SMALL, n_values=3, n_heldout=2).validate()
    with pytest.raises(TvlensError, match="too small"):
        replace(SMALL, n_values=2).validate()
    with pytest.raises(TvlensError, match="n_ctx"):
        replace(SMALL, ood_pairs=10, n_ctx=24).validate()
    with pytest.raises(TvlensError, match="unknown task family"):
        replace(SMALL, families=("sine",)).validate()
    model = build_model(SMALL)
    with pytest.raises(TvlensError, match="n_ctx"):
        tv_accuracy_by_layer(model, SMALL.tasks()[0], 50)


def _reference_tvp_losses(model, batch, layer):
    """L_ICL and L_TVP written out by hand: log-softmax gathers, and a hook of our own that
    overwrites the query's arrow with the ICL residual (kept in the graph)."""
    name = resid_hook_name(layer)
    keep = {}

    def grab(act, hook=None):
        keep["v"] = act[:, 4 * batch.ys.shape[1] - 2]  # the last "->" of the ICL sequence
        return act

    logp = model.run_with_hooks(batch.ids, fwd_hooks=[(name, grab)]).log_softmax(-1)
    B, K = batch.ys.shape
    cols = torch.arange(K) * 4 + 2  # the arrow before each y_i predicts it
    icl = -logp[torch.arange(B)[:, None], cols[None], batch.ys].mean()

    def swap(act, hook=None):
        act = act.clone()
        act[:, -1] = keep["v"]
        return act

    q = model.run_with_hooks(batch.query_ids, fwd_hooks=[(name, swap)]).log_softmax(-1)
    tvp = -q[torch.arange(B), -1, batch.query_answers].mean()
    return icl, tvp, keep["v"]


def test_tvp_loss_and_gradients_match_a_reference_written_out():
    model = build_model(SMALL)
    tasks, _ = SMALL.tasks()
    batch = sample_batch(task_tables(tasks), SMALL.n_pairs, 6, torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    out = tvp_losses(model, batch, layer=1, lam=0.7, capture_injected=True)
    icl, tvp, v = _reference_tvp_losses(model, batch, 1)
    # the extracted state is the ICL residual; the zero-shot residual after the swap is a
    # copy of it (bits), the losses are computed (float32, O(1), 1e-6 is ~8 eps)
    torch.testing.assert_close(out.extracted, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.injected, out.extracted, rtol=0, atol=0)
    torch.testing.assert_close(out.icl, icl, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.tvp, tvp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, icl + 0.7 * tvp, rtol=1e-6, atol=1e-6)
    assert tvp > 0.1 and abs(float(out.tvp - out.icl)) > 1e-3  # two different losses

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])

    def close(a, b):
        # float32 backward through the same graph shape: relative to the largest entry
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max(), rtol=1e-4)

    g_icl = grads(icl)
    # λ = 0 is the plain ICL baseline: its gradient is the ICL loss's gradient
    close(grads(tvp_losses(model, batch, layer=1, lam=0.0).loss), g_icl)
    # λ = 0.7: the TVP term adds its gradient, including the path through v into the ICL pass
    g = grads(out.loss)
    close(g, grads(icl + 0.7 * tvp))
    assert (g - g_icl).abs().max() > 1e-3 * g_icl.abs().max()
    emb = dict(model.named_parameters())
    name = next(n for n in emb if "embed" in n)
    (ge,) = torch.autograd.grad(out.tvp, emb[name])
    icl_only = set(batch.ids[:, :-1].flatten().tolist()) - set(batch.query_ids.flatten().tolist())
    assert any(ge[t].abs().sum() > 0 for t in icl_only)  # tokens only the ICL pass reads


def test_resume_from_checkpoint_gives_the_same_run(tmp_path):
    cfg = replace(SMALL, tvp_lambda=1.0, steps=10, checkpoint_every=5, eval_every=5)
    straight = train(cfg, out_dir=tmp_path / "a")
    train(replace(cfg, steps=5), out_dir=tmp_path / "b")
    resumed = train(cfg, out_dir=tmp_path / "b", resume=True)
    assert resumed.step == straight.step == 10
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert json.dumps(resumed.history) == json.dumps(straight.history)
    with pytest.raises(TvlensError, match="another config"):
        train(replace(cfg, lr=1e-2), out_dir=tmp_path / "b", resume=True)


def test_tvp_localises_the_task_vector_at_the_prescribed_layer():
    cfg = replace(PRESETS["tiny"], steps=300, eval_every=0, n_eval=256)
    result = compare(cfg)
    layer = cfg.tvp_layer
    with_tvp = result["with_tvp"]["tv_accuracy_by_layer"][layer]
    without = result["without_tvp"]["tv_accuracy_by_layer"][layer]
    assert with_tvp > without + 0.15, (with_tvp, without)
    assert with_tvp > 1.5 / cfg.n_values  # well above chance


def test_cli_train_writes_a_checkpoint_and_json(tmp_path, capsys):
    from tvlens.cli import main

    code = main(["tvp", "train", "--preset", "tiny", "--steps", "3", "--n-eval", "8",
                 "--eval-every", "0", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert data["steps"] == 3 and data["tvp_layer"] == PRESETS["tiny"].tvp_layer
    assert len(data["tv_accuracy_by_layer"]) == PRESETS["tiny"].n_layers
    # the reported measures, recomputed from the saved checkpoint
    from tvlens.emergence.measure import evaluate_run
    from tvlens.emergence.training import load_model

    model, cfg = load_model(tmp_path / "run")
    assert cfg.n_eval == 8 and cfg.steps == 3
    again = evaluate_run(model, cfg)
    for key in ("icl_accuracy", "ood_icl_accuracy", "long_context_icl_accuracy",
                "zero_shot_accuracy"):
        assert isinstance(data[key], float) and 0 <= data[key] <= 1, key
        assert data[key] == pytest.approx(again[key]), key
    assert data["tv_accuracy_by_layer"] == pytest.approx(again["tv_accuracy_by_layer"])
    assert data["chance"] == pytest.approx(1 / cfg.n_values)
    assert main(["tvp", "train", "--preset", "tiny", "--tvp-lambda", "-1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "tvp_lambda" in capsys.readouterr().err
