"""``tvlens reproduce``: the verdict rule, the resumable cache, the report files."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
from scipy import stats as sps

from tvlens import TvlensError, evaluate
from tvlens.reproduce import Claim, Finding, PaperValue, judge, outcome, verdict
from tvlens.reproduce.findings import Context, resolve_layers, value
from tvlens.reproduce.render import write_outputs
from tvlens.reproduce.report import assemble, run_parts
from tvlens.stats import accuracy


# --- the rule, against an independent implementation --------------------------------------

def _rule(claims, runs):
    """The rule as the report states it, written out again from its text."""
    outcomes = []
    for left, right in claims:
        def side(run, name):
            if isinstance(name, float):
                return name, name, name
            v = run[name]
            return v["value"], v["ci_low"], v["ci_high"]

        if len(runs) == 1:
            (_, ll, lh), (_, rl, rh) = side(runs[0], left), side(runs[0], right)
            lo, hi = ll - rh, lh - rl
        else:
            d = np.array([side(r, left)[0] - side(r, right)[0] for r in runs])
            half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            own_lo = np.mean([side(r, left)[1] - side(r, right)[2] for r in runs])
            own_hi = np.mean([side(r, left)[2] - side(r, right)[1] for r in runs])
            r_lo, r_hi = (right, right) if isinstance(right, float) else (0.0, 1.0)
            lo = max(min(d.mean() - half, own_lo), 0.0 - r_hi)  # rates: left in [0, 1]
            hi = min(max(d.mean() + half, own_hi), 1.0 - r_lo)
        outcomes.append("holds" if lo > 0 else "fails" if hi < 0 else "unclear")
    if all(o == "holds" for o in outcomes):
        return outcomes, "reproduces"
    if all(o == "fails" for o in outcomes):
        return outcomes, "does not reproduce"
    return outcomes, "partially" if "holds" in outcomes else "inconclusive"


def test_verdicts_follow_the_stated_rule_on_random_numbers():
    rng = np.random.default_rng(0)
    seen = set()
    for trial in range(400):
        n_seeds = int(rng.integers(1, 4))
        runs = []
        for _ in range(n_seeds):
            run = {}
            for name in ("a", "b", "c"):
                v = float(rng.uniform(0, 1))
                w = float(rng.uniform(0, 0.3))
                run[name] = {"value": v, "ci_low": v - w, "ci_high": v + w, "n": 32}
            runs.append(run)
        pairs = [("a", "b"), ("b", 0.5), ("c", "a")][: int(rng.integers(1, 4))]
        claims = [Claim(f"{left} > {right}", left, right) for left, right in pairs]
        got = judge(claims, runs)
        outcomes, expected = _rule(pairs, runs)
        assert [c["outcome"] for c in got["claims"]] == outcomes
        assert got["verdict"] == expected
        seen.add(expected)
    assert seen == {"reproduces", "partially", "does not reproduce", "inconclusive"}


def test_rule_edge_cases():
    assert outcome({"ci_low": 0.0, "ci_high": 0.2}) == "unclear"  # touching 0 is not clear of it
    assert outcome({"ci_low": float("nan"), "ci_high": 1.0}) == "unclear"
    assert verdict(["holds", "unclear"]) == "partially"
    assert verdict(["unclear", "fails"]) == "inconclusive"
    with pytest.raises(TvlensError, match="at least one claim"):
        verdict([])
    with pytest.raises(TvlensError, match="did not measure"):
        judge([Claim("x > y", "x", "y")], [{"x": {"value": 1, "ci_low": 1, "ci_high": 1}}])


def test_seed_interval_is_never_narrower_than_the_seeds_own_and_stays_in_range():
    from tvlens.stats import replicate_interval

    # three seeds that agree to the digit (shared items): the items' error remains
    agree = replicate_interval([0.95] * 3, own=[(0.85, 1.0)] * 3, bounds=(0.0, 1.0))
    assert (agree.ci_low, agree.ci_high) == (0.85, 1.0)
    assert replicate_interval([0.95] * 3).ci_high == pytest.approx(0.95, abs=1e-12)  # zero width
    # a spread rate: Student-t alone leaves [0, 1]; the range cuts it, the mean stays
    spread = [0.211, 0.600, 0.998]
    half = sps.t.ppf(0.975, 2) * np.std(spread, ddof=1) / math.sqrt(3)
    assert np.mean(spread) + half > 1 and np.mean(spread) - half < 0
    rate = replicate_interval(spread, own=[(v - 0.03, v + 0.03) for v in spread], bounds=(0.0, 1.0))
    assert (rate.ci_low, rate.ci_high) == (0.0, 1.0) and rate.value == pytest.approx(np.mean(spread))
    # the seeds' spread, when wider than their own intervals, is kept as it is
    wide = replicate_interval([0.4, 0.5, 0.6], own=[(v - 0.01, v + 0.01) for v in (0.4, 0.5, 0.6)],
                              bounds=(0.0, 1.0))
    assert wide.ci_low == pytest.approx(0.5 - sps.t.ppf(0.975, 2) * 0.1 / math.sqrt(3))
    # NaN own bounds (a majority baseline has none) are left out; one seed gives its own
    assert replicate_interval([0.3, 0.4], own=[(float("nan"), float("nan"))] * 2).ci_low < 0.3
    one = replicate_interval([0.5], own=[(0.3, 0.7)])
    assert (one.ci_low, one.ci_high) == (0.3, 0.7)
    with pytest.raises(TvlensError, match="outside its declared range"):
        replicate_interval([0.5, 1.5], bounds=(0.0, 1.0))


def test_report_intervals_use_each_values_range():
    from tvlens.reproduce.mechanisms import ROTATION
    from tvlens.reproduce.verdicts import aggregate, difference

    assert ROTATION.value_range("rotation_cos_early") == (-1.0, 1.0)
    assert ROTATION.value_range("scale_ratio_late") == (0.0, math.inf)
    assert ROTATION.value_range("fit_r2_layer9") == (-math.inf, 1.0)
    assert ROTATION.value_range("vector_accuracy") == (0.0, 1.0)  # undeclared: a rate
    runs = [{"scale_ratio_late": {"value": v, "ci_low": v - 1, "ci_high": v + 1},
             "rotation_cos_late": {"value": c, "ci_low": c - 0.1, "ci_high": c + 0.1},
             "rotation_cos_early": {"value": -c, "ci_low": -c - 0.1, "ci_high": -c + 0.1}}
            for v, c in ((3.0, 0.95), (2.5, 0.2), (3.5, 0.99))]
    agg = aggregate(runs, ROTATION.value_range)
    assert agg["scale_ratio_late"]["ci_high"] > 3.5  # a ratio is not cut at 1
    assert -1.0 <= agg["rotation_cos_late"]["ci_low"] and agg["rotation_cos_late"]["ci_high"] == 1.0
    d = difference(Claim("late > early", "rotation_cos_late", "rotation_cos_early"), runs,
                   ROTATION.value_range)
    assert d["ci_high"] == 2.0 and d["ci_low"] >= -2.0  # cos − cos lies in [−2, 2]
    constant = difference(Claim("late > 0.5", "rotation_cos_late", 0.5), runs, ROTATION.value_range)
    assert constant["ci_high"] == 0.5  # 1 − 0.5
    with pytest.raises(TvlensError, match="outside its declared range"):
        aggregate(runs)  # as rates, a ratio of 3 is out of range: declared wrongly, not clipped


def test_profile_layers_fit_any_depth(tiny):
    assert resolve_layers(tiny, [0.0, 0.5, 1.0]) == [0, 1, 2]
    assert resolve_layers(tiny, "middle_half") == [0, 1, 2]  # layers 3 // 4 … (3 · 3) // 4
    assert resolve_layers(tiny, [0.49, 0.51]) == [1]  # fractions round to distinct layers


# --- the engine, on a real (tiny) finding ---------------------------------------------------

def _finding(calls: list, *, stop_at: int | None = None, n: int = 6) -> Finding:
    """ICL vs zero-shot on the tiny model: a real measurement through tvlens.evaluate."""

    def measure(ctx: Context) -> dict:
        if stop_at is not None and ctx.seed == stop_at:
            raise KeyboardInterrupt
        calls.append((ctx.model_name, ctx.seed))
        model, task = ctx.load(ctx.model_name)
        zs = evaluate(model, task, n=ctx.settings["n"], seed=ctx.seed)
        icl = evaluate(model, task, shots=3, n=ctx.settings["n"], seed=ctx.seed)
        return {"values": {"zero_shot": value(zs.interval), "icl": value(icl.interval)},
                "tables": {"scores": [{"condition": "zero-shot", "accuracy": zs.accuracy, "n": zs.n},
                                      {"condition": "ICL", "accuracy": icl.accuracy, "n": icl.n}]}}

    def figure(result):
        import plotly.graph_objects as go

        return go.Figure(go.Bar(x=list(result["values"]), y=[v["mean"] for v in result["values"].values()]))

    return Finding("tiny-icl", "ICL on a tiny model", "ICL beats zero-shot.",
                   {"icl": PaperValue(0.9, "a made-up paper value for the test")},
                   (Claim("ICL beats zero-shot", "icl", "zero_shot"),),
                   {"quick": {"n": n}, "full": {"n": 12}}, measure, figure)


@pytest.fixture
def loader(tiny, task):
    return lambda name: (tiny, task)


def test_parts_are_cached_resumed_and_never_silently_replaced(tmp_path, loader):
    calls = []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while seed 1 runs
        run_parts(tmp_path, [_finding(calls, stop_at=1)], ["tiny"], 2, "quick", load=loader)
    part0 = tmp_path / "cache" / "tiny-icl" / "tiny" / "seed0.json"
    assert calls == [("tiny", 0)] and part0.exists()
    saved = json.loads(part0.read_text())
    parts = run_parts(tmp_path, [_finding(calls)], ["tiny"], 2, "quick", load=loader)
    assert calls == [("tiny", 0), ("tiny", 1)]  # only the missing seed ran
    assert parts[("tiny-icl", "tiny")][0] == saved
    run_parts(tmp_path, [_finding(calls)], ["tiny"], 2, "quick", load=loader)
    assert len(calls) == 2  # a rerun with the same settings computes nothing
    with pytest.raises(TvlensError, match="other settings \\(n\\).*--overwrite"):
        run_parts(tmp_path, [_finding(calls, n=4)], ["tiny"], 2, "quick", load=loader)
    assert json.loads(part0.read_text()) == saved  # refused: untouched
    run_parts(tmp_path, [_finding(calls, n=4)], ["tiny"], 1, "quick", load=loader, overwrite=True)
    kept = list(part0.parent.glob("seed0.superseded-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == saved
    assert json.loads(part0.read_text())["settings"]["n"] == 4


def test_report_numbers_verdicts_and_files(tmp_path, loader, tiny, task):
    finding = _finding([])
    parts = run_parts(tmp_path, [finding], ["tiny"], 2, "quick", load=loader)
    report = assemble([finding], parts, models=["tiny"], seeds=2, profile="quick")
    (r,) = report["results"]
    by_seed = [evaluate(tiny, task, shots=3, n=6, seed=s).accuracy for s in (0, 1)]
    assert r["values"]["icl"]["seeds"] == pytest.approx(by_seed)
    assert r["values"]["icl"]["mean"] == pytest.approx(np.mean(by_seed))
    assert r["verdict"] == _rule([("icl", "zero_shot")], [p["values"] for p in parts[("tiny-icl", "tiny")]])[1]
    assert r["paper"]["values"]["icl"] == {"value": 0.9, "source": "a made-up paper value for the test"}
    write_outputs(tmp_path, report, [finding], figures=False)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["results"][0]["verdict"] == r["verdict"] and "**holds** when the interval lies above 0" in saved["rule"]
    md = (tmp_path / "report.md").read_text()
    assert "| tiny-icl |" in md and r["verdict"] in md
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)  # offline: every script is inline
    assert page.count("<script") >= 2  # plotly.js once, then the figure


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (the export dependency)")
def test_report_html_renders_offline_in_headless_chromium(tmp_path, loader):
    finding = _finding([])
    parts = run_parts(tmp_path, [finding], ["tiny"], 1, "quick", load=loader)
    report = assemble([finding], parts, models=["tiny"], seeds=1, profile="quick")
    write_outputs(tmp_path, report, [finding], figures=False)
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom",
         (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120)
    dom, log = proc.stdout, proc.stderr
    assert 'class="summary"' in dom and "tiny-icl" in dom
    assert 'class="main-svg"' in dom  # plotly's inlined JS ran and drew the figure
    console_errors = [line for line in log.splitlines() if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert not console_errors, console_errors


@pytest.mark.slow
def test_quick_profile_on_smollm2_follows_the_rule(tmp_path, smol):
    """The whole quick profile on the embedded model (the one slow reproduction test):
    every finding has its paper values, our values with intervals, and a verdict that the
    stated rule, written out again in :func:`_rule`, derives from its numbers; a rerun is
    served from the cache."""
    from tvlens.reproduce import FINDINGS, reproduce

    report = reproduce(tmp_path, models=["smollm2-135m"], seeds=1, profile="quick", figures=False,
                       progress=False)
    assert {r["finding"] for r in report["results"]} == set(FINDINGS)
    for r in report["results"]:
        f = FINDINGS[r["finding"]]
        assert r["model"] == ("synthetic" if f.synthetic else "smollm2-135m")
        for name, v in r["values"].items():
            assert v["ci_low"] <= v["mean"] + 1e-9 and v["mean"] <= v["ci_high"] + 1e-9, (r["finding"], name)
        runs = [{k: {"value": v["seeds"][0], "ci_low": v["ci_low"], "ci_high": v["ci_high"]}
                 for k, v in r["values"].items()}]
        pairs = [(c.left, float(c.right) if not isinstance(c.right, str) else c.right) for c in f.claims]
        outcomes, expected = _rule(pairs, runs)
        assert [c["outcome"] for c in r["claims"]] == outcomes and r["verdict"] == expected, r["finding"]
        assert set(r["paper"]["values"]) and all(p["source"] for p in r["paper"]["values"].values())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["verdict"] for r in saved["results"]] == [r["verdict"] for r in report["results"]]
    again = reproduce(tmp_path, models=["smollm2-135m"], seeds=1, profile="quick", figures=False,
                      progress=False)
    assert [r["values"] for r in again["results"]] == [r["values"] for r in report["results"]]


def test_a_method_that_refuses_a_model_is_reported_not_judged(tmp_path, loader):
    def measure(ctx):
        raise TvlensError("the OV decomposition cannot fold this model's post-attention norm")

    finding = Finding("refuser", "A refusing finding", "-", {"x": PaperValue(None, "none")},
                      (Claim("x > 0", "x", 0.0),), {"quick": {}, "full": {}}, measure)
    parts = run_parts(tmp_path, [finding], ["tiny"], 1, "quick", load=loader)
    report = assemble([finding], parts, models=["tiny"], seeds=1, profile="quick")
    (r,) = report["results"]
    assert r["verdict"] == "refused" and "post-attention norm" in r["refused"] and r["values"] == {}
    write_outputs(tmp_path, report, [finding], figures=False)
    assert "Refused on this model:** the OV decomposition" in (tmp_path / "report.md").read_text()
    calls = []
    finding2 = Finding("refuser", "A refusing finding", "-", {}, (), {"quick": {}, "full": {}},
                       lambda ctx: calls.append(1))
    run_parts(tmp_path, [finding2], ["tiny"], 1, "quick", load=loader)
    assert calls == []  # the refusal is cached like any finished part


def test_ov_finding_pools_tasks_at_the_base_layer_and_tables_every_layer(tiny, task, monkeypatch,
                                                                       tmp_path):
    """The full profile's shape (two tasks, an extra layer) on the tiny model, with a fixed
    vector per layer standing in for the LTVs: the claims' values are the base layer's
    accuracies pooled over the tasks' prompts, ``by_layer`` pools each layer, ``per_task``
    equals ``reinjection_test`` per task and layer, recovery is of the pooled accuracies."""
    import torch

    import tvlens
    from tvlens import TaskVector
    from tvlens.attribution import reinjection_test
    from tvlens.reproduce.mechanisms import OV_REINJECTION

    monkeypatch.setattr(tvlens, "load_task", lambda name: task)

    def vec(layer):
        g = torch.Generator().manual_seed(layer)
        return TaskVector.single(tiny, 3 * torch.randn(tiny.cfg.d_model, generator=g), layer)

    class Ctx(Context):
        def ltv(self, task, layer, **kw):
            return vec(layer)

    settings = {"tasks": ["a", "b"], "other_layers": [0.0], "n": 6, "packaged": "unweighted", "ltv": {}}
    out = OV_REINJECTION.measure(Ctx("tiny", 0, settings, tmp_path, lambda name: tiny))
    base = tiny.cfg.n_layers // 2
    assert out["extra"]["layers"] == [0, base] and out["extra"]["layer"] == base
    single = {layer: reinjection_test(tiny, task, vec(layer), n=6) for layer in (0, base)}
    for k, sc in single[base].scores.items():  # two copies of the same prompts, pooled
        assert out["values"][k] == value(accuracy(np.concatenate([sc, sc]), seed=0))
    assert {r["layer"] for r in out["tables"]["by_layer"]} == {0, base}
    assert len(out["tables"]["per_task"]) == 2 * 2 * len(single[base].accuracies)
    for r in out["tables"]["per_task"]:
        assert r["accuracy"] == single[r["layer"]].accuracies[r["condition"]].value
    acc = {r["condition"]: r["accuracy"] for r in out["tables"]["conditions"]}
    for r in out["tables"]["conditions"]:
        gain = acc["vector"] - acc["zero_shot"]
        if r["condition"] not in ("zero_shot", "vector") and gain > 0:
            assert r["recovery"] == pytest.approx((r["accuracy"] - acc["zero_shot"]) / gain)


def test_reports_of_separate_runs_merge_into_one(tmp_path, loader, capsys):
    """Two runs of different findings → one report with both results as they were judged,
    in report order; other settings, other versions, a clash and an existing report are
    refused in one line."""
    from tvlens.cli import main
    from tvlens.reproduce.report import merge_reports

    a, b = _finding([]), _finding([])
    b = Finding("tiny-icl-2", b.title, b.paper, b.paper_values, b.claims, b.profiles, b.measure, b.figure)
    reps = {}
    for f in (a, b):
        parts = run_parts(tmp_path / f.id, [f], ["tiny"], 1, "quick", load=loader)
        reps[f.id] = assemble([f], parts, models=["tiny"], seeds=1, profile="quick")
        write_outputs(tmp_path / f.id, reps[f.id], [f], figures=False)
    paths = [tmp_path / "tiny-icl-2" / "report.json", tmp_path / "tiny-icl" / "report.json"]
    merged = merge_reports(paths)
    assert [r["finding"] for r in merged["results"]] == ["tiny-icl-2", "tiny-icl"]  # not in FINDINGS: as given
    assert merged["results"][1] == json.loads(paths[1].read_text())["results"][0]
    assert [m["report"] for m in merged["merged_from"]] == [str(p) for p in paths]
    assert merged["models"] == ["tiny"] and merged["seeds"] == 1
    with pytest.raises(TvlensError, match="at least two"):
        merge_reports(paths[:1])
    other = json.loads(paths[0].read_text())
    other["versions"] = {**other["versions"], "torch": "0.0"}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(TvlensError, match="other versions"):
        merge_reports([paths[1], tmp_path / "other.json"])
    clash = json.loads(paths[1].read_text())
    clash["results"][0]["verdict"] = "does not reproduce"
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    with pytest.raises(TvlensError, match="both hold tiny-icl on tiny"):
        merge_reports([paths[1], tmp_path / "clash.json"])
    clash["created"] = "2999-01-01T00:00:00"  # newer: it wins under supersede, in either order
    (tmp_path / "clash.json").write_text(json.dumps(clash))
    for order in ([paths[1], tmp_path / "clash.json"], [tmp_path / "clash.json", paths[1]]):
        newest = merge_reports(order, supersede=True)
        assert [r["verdict"] for r in newest["results"]] == ["does not reproduce"]
        assert newest["superseded"] == [f"tiny-icl/tiny made {merged['merged_from'][1]['created']}"]
    # a merge of a merge keeps every original run (and what was superseded) as its provenance
    (tmp_path / "newest.json").write_text(json.dumps(newest))
    again = merge_reports([tmp_path / "newest.json", paths[0]])
    assert [m["created"] for m in again["merged_from"]] == [m["created"] for m in newest["merged_from"]] + [
        merged["merged_from"][0]["created"]]
    assert again["superseded"] == newest["superseded"]
    # superseding a result of a merged report names the run that made it, not the merge
    for name, created, src in (("other", "3500-01-01T00:00:00", paths[0]),
                               ("later", "4000-01-01T00:00:00", paths[1])):
        rep = json.loads(src.read_text())
        rep["created"] = created
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    (tmp_path / "wider.json").write_text(json.dumps(
        merge_reports([tmp_path / "newest.json", tmp_path / "other.json"])))  # made 3500
    third = merge_reports([tmp_path / "wider.json", tmp_path / "later.json"], supersede=True)
    assert third["superseded"][-1] == "tiny-icl/tiny made 2999-01-01T00:00:00"
    out = tmp_path / "merged"
    assert main(["reproduce", "--merge", *map(str, paths), "--out", str(out), "--no-figures"]) == 0
    assert json.loads((out / "report.json").read_text())["results"] == merged["results"]
    assert "Merged from 2 runs" in (out / "report.md").read_text()
    assert main(["reproduce", "--merge", *map(str, paths), "--out", str(out), "--no-figures"]) == 2
    assert "exists; give another --out, or --overwrite" in capsys.readouterr().err
