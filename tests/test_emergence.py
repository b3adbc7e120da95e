"""Synthetic ICL tasks, the TVP loss, training/resume and the emergence comparison."""

from __future__ import annotations

import ast
import json
import math
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tvlens.emergence import (
    CHECKPOINT, PRESETS, SyntheticTask, TVPConfig, Vocab, build_model, compare, consistent_tasks,
    decode, encode, family_parameters, load_model, read_checkpoint, sample_batch, task_split,
    task_tables, token_prompt_batch, train, tv_accuracy_by_layer, tvp_losses,
)
from tvlens.errors import TvlensError
from tvlens.interventions import resid_hook_name

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


def _same_runs(a, b):
    assert a.step == b.step
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    assert json.dumps(a.history) == json.dumps(b.history)


def test_resume_from_checkpoint_gives_the_same_run(tmp_path):
    cfg = replace(SMALL, tvp_lambda=1.0, steps=10, checkpoint_every=5, eval_every=5)
    straight = train(cfg, out_dir=tmp_path / "a")
    train(replace(cfg, steps=5), out_dir=tmp_path / "b")
    resumed = train(cfg, out_dir=tmp_path / "b", resume=True)
    assert resumed.step == straight.step == 10
    _same_runs(resumed, straight)
    with pytest.raises(TvlensError, match="another config"):
        train(replace(cfg, lr=1e-2), out_dir=tmp_path / "b", resume=True)
    # interrupted between two evaluations (the running loss sums are in the checkpoint),
    # and the λ = 0 baseline (its tvp_loss is NaN in the history)
    for lam in (1.0, 0.0):
        cfg = replace(SMALL, tvp_lambda=lam, steps=10, checkpoint_every=3, eval_every=4)
        straight = train(cfg)
        folder = tmp_path / f"c{lam}"
        train(replace(cfg, steps=6), out_dir=folder)
        _same_runs(train(cfg, out_dir=folder, resume=True), straight)


def test_checkpoints_are_safetensors_and_json(tmp_path):
    from safetensors import safe_open

    cfg = replace(SMALL, steps=3)
    run = train(cfg, out_dir=tmp_path)
    path = tmp_path / CHECKPOINT
    assert CHECKPOINT == "checkpoint.safetensors" and not (tmp_path / "checkpoint.pt").exists()
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["tvlens.tvp_checkpoint"])
    assert {f"params/{n}" for n, _ in run.model.named_parameters()} <= names
    assert "data_rng" in names and any(n.startswith("optimizer/state/") for n in names)
    assert meta["step"] == 3 and meta["config"] == cfg.to_dict() and "torch" in meta["versions"]
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    umask = os.umask(0)
    os.umask(umask)
    for name in (CHECKPOINT, "config.json"):  # the usual mode, not the temporary file's 0600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "config.json"]
    ckpt = read_checkpoint(path)
    assert ckpt.config == cfg and ckpt.step == 3 and ckpt.data_rng.dtype == torch.uint8
    model, back = load_model(tmp_path)
    assert back == cfg
    for (n, p), (_, q) in zip(run.model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    for file in Path(__file__).parents[1].joinpath("tvlens", "emergence").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):  # no pickle anywhere
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("torch", "save"), ("torch", "load")}, file
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("pickle" in n for n in names), file


def test_bad_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(TvlensError, match="no checkpoint"):
        load_model(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x04old pickle")
    with pytest.raises(TvlensError, match="pickle from an older tvlens"):
        train(SMALL, out_dir=tmp_path, resume=True)
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(TvlensError, match="not a readable tvlens TVP checkpoint"):
        load_model(tmp_path)
    save_file({"x": torch.zeros(2)}, str(path))  # safetensors, but not ours
    with pytest.raises(TvlensError, match="not a tvlens TVP checkpoint"):
        load_model(tmp_path)
    save_file({"x": torch.zeros(2)}, str(path), metadata={"tvlens.tvp_checkpoint": '{"kind": "vector"}'})
    with pytest.raises(TvlensError, match="not a tvlens TVP checkpoint"):
        load_model(tmp_path)
    train(replace(SMALL, steps=1), out_dir=tmp_path)
    from tvlens.emergence.checkpoint import KEY
    from tvlens.io import load_tensors, save_tensors

    tensors, meta = load_tensors(path, key=KEY)
    save_tensors(path, tensors, {**meta, "config": {**meta["config"], "n_experts": 4}}, key=KEY)
    with pytest.raises(TvlensError, match="n_experts"):  # a newer tvlens's field
        load_model(tmp_path)
    save_tensors(path, tensors, {**meta, "format_version": 99}, key=KEY)
    with pytest.raises(TvlensError, match="newer tvlens"):
        load_model(tmp_path)
    del tensors["data_rng"]
    save_tensors(path, tensors, meta, key=KEY)
    with pytest.raises(TvlensError, match="damaged.*data_rng"):
        train(replace(SMALL, steps=2), out_dir=tmp_path, resume=True)


def test_training_leaves_the_global_rng_alone():
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    first = build_model(SMALL)
    train(replace(SMALL, steps=2, eval_every=1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # the initial weights depend on cfg.seed alone
    again = build_model(SMALL)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), again.parameters()))
    other = build_model(replace(SMALL, seed=1))
    assert not all(torch.equal(p, q) for p, q in zip(first.parameters(), other.parameters()))


def test_token_prompts_are_rendered_by_the_vocabulary():
    v = Vocab(7)
    assert v.render([v.bos, 3, v.arrow, 5, v.comma, 2, v.arrow]) == "<bos> 3 -> 5 , 2 ->"
    batch = sample_batch(task_tables(SMALL.tasks()[0]), 3, 5, torch.Generator().manual_seed(0))
    qb = token_prompt_batch(batch.query_ids, batch.query_answers, 7)
    assert torch.equal(qb.input_ids, batch.query_ids) and qb.attention_mask.all()
    for row in range(5):
        x, y = int(batch.query_ids[row, 1]), int(batch.query_answers[row])
        assert qb.prompts[row] == f"<bos> {x} ->" and qb.answer_ids[row] == [y]
        assert qb.examples[row].x == qb.prompts[row] and qb.examples[row].y == str(y)
    assert qb.position_index("separator").tolist() == [2] * 5 == qb.position_index("last").tolist()
    icl = token_prompt_batch(batch.prompt_ids(), batch.ys[:, -1], 7)
    assert decode(batch.prompt_ids()[0].tolist(), 7)[1] == int(icl.prompts[0].split()[-2])
    assert icl.position_index("separator").tolist() == [4 * 3 - 2] * 5


def test_bad_token_prompts_are_refused():
    v = Vocab(7)
    with pytest.raises(TvlensError, match="arrow"):
        token_prompt_batch(torch.tensor([[v.bos, 3, v.arrow, 5]]), torch.tensor([1]), 7)
    with pytest.raises(TvlensError, match="outside the synthetic vocabulary"):
        token_prompt_batch(torch.tensor([[v.bos, 30, v.arrow]]), torch.tensor([1]), 7)
    with pytest.raises(TvlensError, match="one answer per prompt"):
        token_prompt_batch(torch.tensor([[v.bos, 3, v.arrow]]), torch.tensor([1, 2]), 7)


def test_tvp_config_is_a_registered_method_config(tmp_path):
    from tvlens.cli import build_parser
    from tvlens.cli.tvp import tvp_config_from_args
    from tvlens.methods.base import MethodConfig, get_config

    assert get_config("tvp") is TVPConfig and issubclass(TVPConfig, MethodConfig)
    d = SMALL.to_dict()
    assert d["families"] == ["offset"] and TVPConfig.from_dict(d) == SMALL
    assert TVPConfig.from_dict({**d, "families": ["offset", "affine"]}).families == ("offset", "affine")
    with pytest.raises(TvlensError, match="'n_experts'.*'rope_base'|'n_experts', 'rope_base'"):
        TVPConfig.from_dict({**d, "rope_base": 1e4, "n_experts": 4})
    # the CLI's flags come from the fields, spelt as before
    (tmp_path / "cfg.json").write_text(json.dumps({"n_values": 9, "d_model": 24}))
    args = build_parser().parse_args(
        ["tvp", "train", "--preset", "tiny", "--config", str(tmp_path / "cfg.json"),
         "--n-layers", "4", "--tvp-layer", "2", "--families", "offset,affine", "--positional",
         "standard", "--lr", "0.01", "--tvp-lambda", "0.5", "--n-ctx", "64", "--out", "x"])
    cfg = tvp_config_from_args(args)
    assert cfg == replace(PRESETS["tiny"], n_values=9, d_model=24, n_layers=4, tvp_layer=2,
                          families=("offset", "affine"), positional="standard", lr=0.01,
                          tvp_lambda=0.5, n_ctx=64)
    (tmp_path / "bad.json").write_text(json.dumps({"n_layer": 3}))
    args = build_parser().parse_args(["tvp", "train", "--config", str(tmp_path / "bad.json"), "--out", "x"])
    with pytest.raises(TvlensError, match="n_layer"):
        tvp_config_from_args(args)


def test_accuracy_figure_uses_the_exact_binomial_interval():
    from tvlens.emergence.figures import accuracy_by_layer_figure
    from tvlens.stats import exact_ci

    arm = {"tv_accuracy_by_layer": [0.25, 0.5, 1.0], "icl_accuracy": 0.75}
    result = {"config": {"n_eval": 8, "n_values": 7, "tvp_layer": 1},
              "with_tvp": arm, "without_tvp": {**arm, "tv_accuracy_by_layer": [0.0, 0.125, 0.5]}}
    fig = accuracy_by_layer_figure(result)
    band = fig.data[0]  # the with-TVP band: ci_high over the layers, then ci_low back
    lows, highs = zip(*(exact_ci(round(a * 8), 8) for a in arm["tv_accuracy_by_layer"]))
    assert list(band.y) == pytest.approx(list(highs) + list(lows)[::-1])
    lo, hi = exact_ci(6, 8)
    assert any(f"ICL, with TVP (0.75 [{lo:.2f}, {hi:.2f}])" == t.name for t in fig.data)


def test_emergence_modules_import_one_way():
    """No import cycle among tvlens.emergence's modules (lazy imports inside functions count)."""
    folder = Path(__file__).parents[1] / "tvlens" / "emergence"
    graph = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tvlens.emergence."):
                deps.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.rsplit(".", 1)[1] for a in node.names
                         if a.name.startswith("tvlens.emergence.")}
        graph[path.stem] = deps
    assert "training" not in graph["measure"] and "measure" in graph["training"]
    done: set[str] = set()

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join(stack + [name])}"
        if name in done:
            return
        for dep in graph.get(name, ()):
            visit(dep, stack + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


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
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
    assert data["steps"] == 3 and data["tvp_layer"] == PRESETS["tiny"].tvp_layer
    assert len(data["tv_accuracy_by_layer"]) == PRESETS["tiny"].n_layers
    # the reported measures, recomputed from the saved checkpoint
    from tvlens.emergence.measure import evaluate_run
    from tvlens.emergence.checkpoint import load_model

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
