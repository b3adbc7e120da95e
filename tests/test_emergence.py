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


def test_tvp_injects_exactly_the_extracted_state_and_backpropagates_through_it():
    model = build_model(SMALL)
    tasks, _ = SMALL.tasks()
    batch = sample_batch(task_tables(tasks), SMALL.n_pairs, 6, torch.Generator().manual_seed(0))
    out = tvp_losses(model, batch, layer=1, lam=0.7, capture_injected=True)
    # extracted = the residual after layer 1 at the last arrow of an independent forward
    _, cache = model.run_with_cache(batch.ids, names_filter=resid_hook_name(1))
    ref = cache[resid_hook_name(1)][:, 4 * SMALL.n_pairs - 2]
    torch.testing.assert_close(out.extracted, ref, rtol=0, atol=1e-6)
    # the zero-shot residual at the query arrow after the swap is exactly that vector
    torch.testing.assert_close(out.injected, out.extracted, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, out.icl + 0.7 * out.tvp)
    # gradient of L_TVP reaches the ICL forward through the vector
    (g,) = torch.autograd.grad(out.tvp, out.extracted, retain_graph=True)
    assert g.abs().sum() > 0
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
    assert {"icl_accuracy", "ood_icl_accuracy", "tv_accuracy_by_layer", "tvp_layer"} <= set(data)
    assert len(data["tv_accuracy_by_layer"]) == PRESETS["tiny"].n_layers
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert main(["tvp", "train", "--preset", "tiny", "--tvp-lambda", "-1",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "tvp_lambda" in capsys.readouterr().err
