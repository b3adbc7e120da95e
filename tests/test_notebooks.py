"""Every notebook in notebooks/ runs top to bottom, and what it computes is checked; the
committed notebooks are executed, with their outputs (``make notebooks``).

``scripts/notebooks.py``'s ``execute`` runs a notebook with :data:`FAST` run right after
its ``parameters`` cell (smaller sizes than the committed run) and raises on the first
failing cell; a cell appended to each notebook prints, as JSON, values its cells left in
the namespace, which the test then holds to what the notebook claims.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tvlens_notebooks", ROOT / "scripts" / "notebooks.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
NOTEBOOKS = runner.NOTEBOOKS

# notebook stem -> the test's parameters (run after the notebook's own parameters cell)
FAST = {
    "quickstart": "N, N_PROMPTS = 16, 8",
    "extracted_vectors": "N, N_PROMPTS, FV_LAYERS, FV_CLEAN, FV_SHUFFLED = 12, 8, 10, 6, 3",
    "learned_vectors": "STEPS, N, FV_PROMPTS, FV_IE_PROMPTS = 20, 8, 4, 2",
    "attribution": "STEPS, N, RANDOM_SETS, N_COPIES, FIT_PROMPTS = 20, 8, 2, 64, 2",
    "adaptive_vectors": "MAX_STEPS, N = 3, 4",
    "tvp_emergence": "STEPS, N_EVAL = 60, 64",
}

# notebook stem -> (expression evaluated in the notebook's kernel, check of its value)
CHECKS = {
    "quickstart": (
        "{'zero': zero.accuracy, 'icl': icl.accuracy, 'n': zero.n, 'best_tv': float(sweep.accuracy.max())}",
        # SmolLM2 capitalize, qa: zero-shot ~0.02, 5-shot ICL ~0.94, task vector ~0.8 at layer 21
        lambda v: v["n"] == 16 and v["icl"] > v["zero"] + 0.3 and v["best_tv"] > v["zero"] + 0.3),
    "extracted_vectors": (
        "{'zero': float(sweep.zero_shot[0]), 'icl': float(sweep.icl[0]), 'best': int(sweep.best_layer),"
        " 'layers': list(LAYERS), 'fv_heads': len(fv.history['heads'])}",
        lambda v: v["icl"] > v["zero"] + 0.3 and v["best"] in v["layers"] and v["fv_heads"] == 10),
    "learned_vectors": (
        "{'zero': float(by.loc['zero-shot', 'accuracy']), 'ltv': float(by.loc['LTV', 'accuracy']),"
        " 'methods': list(by.index), 'loss_gap': loss_gap, 'grad_gap': grad_gap,"
        " 'composition': list(comp['name']), 'steps': tv.history['steps_run']}",
        # even 20 steps lift capitalize above zero-shot; the prefix-cached gradient equals the
        # full one up to float32 reduction order (measured ~1e-7 relative)
        lambda v: v["ltv"] > v["zero"] and v["loss_gap"] < 1e-5 and v["grad_gap"] < 1e-4
        and v["steps"] <= 20 and len(v["methods"]) == 6 and len(v["composition"]) == 7
        and v["composition"][-2:] == ["θ_present_past on present_past", "θ_capitalize on capitalize"]),
    "attribution": (
        "{'key_heads': len(kh.key_heads), 'later': min(h[0] for h in kh.key_heads) > LAYER,"
        " 'n_after': (model.cfg.n_layers - 1 - LAYER) * model.cfg.n_heads, 'percent': PERCENT,"
        " 'conditions': len(frame), 'geo_layers': list(geo['layers']), 'cos': geo['rotation_cos']}",
        lambda v: v["key_heads"] == round(v["percent"] / 100 * v["n_after"]) and v["later"]
        and v["conditions"] > 10 and v["geo_layers"] == [6, 23] and all(-1 <= c <= 1 for c in v["cos"])),
    "adaptive_vectors": (
        "{'steps': hist['steps'], 'groups': sorted(set(table['group'])),"
        " 'methods': sorted(set(table['method'])), 'same': bool(torch.equal(gen.generate(xs), back.generate(xs)))}",
        lambda v: v["steps"] == 3 and v["groups"] == ["in-domain", "unseen"] and v["same"]
        and {"atv", "zero-shot", "majority label"} <= set(v["methods"])),
    "tvp_emergence": (
        "{arm: result[arm]['tv_accuracy_by_layer'] for arm in ('with_tvp', 'without_tvp')}",
        lambda v: all(len(a) == len(v["with_tvp"]) > 0 and all(0 <= x <= 1 for x in a)
                      for a in v.values())),
}


def test_every_notebook_has_a_check_and_test_parameters():
    assert NOTEBOOKS, "notebooks/ should hold at least the quickstart"
    assert {p.stem for p in NOTEBOOKS} == set(CHECKS) == set(FAST)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_is_executed_with_its_outputs(path):
    assert runner.problems(path) == [], f"{path.name}: run `make notebooks`"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_computes_what_it_claims(path, tmp_path):
    expression, holds = CHECKS[path.stem]
    check = f"import json as _json\nprint('TVLENS-CHECK ' + _json.dumps({expression}))"
    nb = runner.execute(path, overrides=FAST[path.stem], extra_cells=(check,), workdir=tmp_path,
                        timeout=600)
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    line = [x for x in text.splitlines() if x.startswith("TVLENS-CHECK ")]
    assert line, f"the check cell printed nothing: {nb.cells[-1].outputs}"
    value = json.loads(line[0].removeprefix("TVLENS-CHECK "))
    assert holds(value), value
