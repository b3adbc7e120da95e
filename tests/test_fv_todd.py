"""Function vectors against Todd et al.'s released code (the oracle), on the embedded SmolLM2.

``tests/fixtures/todd_fv_smollm2_antonym.json`` holds numbers produced by Todd et al.'s own
``get_mean_head_activations`` and ``compute_indirect_effect`` (github.com/ericwtodd/
function_vectors, unmodified; commits, versions and date in its ``provenance``), run on the
prompts tvlens builds here, with the same token ids and the same float32 weights. These
tests rebuild those prompts, check they are byte for byte the fixture's (so a format or
sampling drift fails loudly, before any number is compared), and compare tvlens's fast
default path with them; a second test holds that fast path equal to tvlens's own per-head
loop. Regenerate the fixture with Todd's code as ``benchmarks/bench_fv_vs_todd.py``'s
docstring describes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from tvlens import load_task
from tvlens.extract import indirect_effects, indirect_effects_loop
from tvlens.interventions import z_hook_name
from tvlens.prompts import PromptSet, sample_queries
from tvlens.results import HeadTable
from tvlens.runner import run

FIXTURE = Path(__file__).parent / "fixtures" / "todd_fv_smollm2_antonym.json"

# |AIE(tvlens fast) − AIE(Todd)|: the two compute the same float32 maths in a different
# reduction order (prefix KV cache + last token vs Todd's full unbatched forward; the same
# eager attention and weights, and bitwise-equal mean head outputs). Measured: max 6.0e-8 on
# the 5-prompt AIE (per prompt <= 3.0e-7), AIEs up to 8.0e-3; float32 rounds at 1.2e-7
# relative, so 1e-6 allows ~15x the measured AIE error and stays >1000x below the AIEs that
# pick the FV heads (the 10th-largest is 1.4e-3), which a wrong head, position or mean moves.
AIE_ATOL_VS_TODD = 1e-6
# tvlens's mean hook_z vs Todd's mean o_proj input: the same tensor of the same eager
# forward (measured: bitwise equal); 1e-6 relative leaves room for a change of the
# reduction order of the mean (30 prompts, chunks of 8) only.
MEAN_RTOL = 1e-6
# fast path vs tvlens's loop: the same bound as tests/test_extract.py's AIE_ATOL_F32
# (float32 reduction order; measured 1.1e-7 on the fixture's prompt 0, all 270 heads).
AIE_ATOL_F32 = 1e-6


@pytest.fixture(scope="module")
def todd():
    return json.loads(FIXTURE.read_text())


def _prompts(model, todd):
    """The fixture's prompts, rebuilt with tvlens, checked string for string."""
    r = todd["recipe"]
    task = load_task(r["task"])
    clean = PromptSet.build(model, task, queries=sample_queries(task, r["n_clean"], seed=r["seed"], shots=r["shots"]),
                            shots=r["shots"], template=r["template"], seed=r["seed"])
    shuffled = PromptSet.build(model, task, shots=r["shots"], template=r["template"], seed=r["seed"],
                               queries=sample_queries(task, r["n_shuffled"], seed=r["seed"], shots=r["shots"]),
                               shuffled=True)
    assert clean.batch.prompts == todd["clean_prompts"], "clean prompts drifted from the fixture's"
    assert shuffled.batch.prompts == todd["shuffled_prompts"], "shuffled prompts drifted from the fixture's"
    assert [a[0] for a in shuffled.batch.answer_ids] == todd["first_answer_ids"], \
        "first answer tokens differ from Todd's get_answer_id"
    return task, clean, shuffled


def _mean_z(model, prompts):
    """Mean ``hook_z`` at the last token over ``prompts``: ``[L, H, d_head]`` (the runner's
    capture, as ``mean_head_outputs`` does it, on the fixture's prompts)."""
    names = [z_hook_name(layer) for layer in range(int(model.cfg.n_layers))]
    out = run(model, prompts, capture=names, capture_at="last", logits=None, batch_size=8, progress=False)
    return torch.stack([out.captured[n] for n in names], dim=1).float().mean(0)


def _fast(model, task, mz, batch, **kw):
    """The default path (prefix_cache="auto"), refusing its silent fallback to full forwards."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        aie = indirect_effects(model, task, mz, batch=batch, **kw)
    assert not [w for w in record if "prefix KV cache not used" in str(w.message)], \
        "the fast path fell back to full forwards"
    return aie


@pytest.mark.slow
def test_fast_indirect_effects_match_todds_released_code(smol, todd):
    task, clean, shuffled = _prompts(smol, todd)
    mz = _mean_z(smol, clean)
    ref = todd["todd_mean_last"]
    torch.testing.assert_close(mz.norm(dim=-1), torch.tensor(ref["norm"]), rtol=MEAN_RTOL, atol=0)
    heads = [tuple(lh) for lh in ref["heads"]]
    torch.testing.assert_close(torch.stack([mz[l, h] for l, h in heads]), torch.tensor(ref["vectors"]),
                               rtol=MEAN_RTOL, atol=MEAN_RTOL * float(mz.abs().max()))

    aie = _fast(smol, task, mz, shuffled)
    want = torch.tensor(todd["todd_aie"])
    assert want.abs().max() > 1e3 * AIE_ATOL_VS_TODD  # the effects are far above the tolerance
    rho = spearmanr(aie.flatten().numpy(), want.flatten().numpy()).statistic
    assert rho >= 0.99, f"Spearman {rho:.4f} between tvlens's and Todd's AIE"
    ours = set(HeadTable(aie, "indirect_effect").top(k=10))
    theirs = set(HeadTable(want, "indirect_effect").top(k=10))
    assert len(ours & theirs) >= 9, f"top-10 heads: tvlens {sorted(ours)}, Todd {sorted(theirs)}"
    torch.testing.assert_close(aie, want, atol=AIE_ATOL_VS_TODD, rtol=0)


@pytest.mark.slow
def test_fast_indirect_effects_equal_the_per_head_loop_on_smollm2(smol, todd):
    task, clean, shuffled = _prompts(smol, todd)
    mz = _mean_z(smol, clean.select(range(8)))
    batch = shuffled.select([0, 1])
    top = HeadTable(torch.tensor(todd["todd_aie"]), "indirect_effect").top(k=1)[0][0]
    layers = sorted({0, top, int(smol.cfg.n_layers) - 1})  # the strongest head's layer among them
    heads = [(layer, h) for layer in layers for h in range(int(smol.cfg.n_heads))]
    slow = indirect_effects_loop(smol, task, mz, batch=batch, heads=heads)
    assert slow.nan_to_num().abs().max() > 100 * AIE_ATOL_F32  # patching matters here
    fast = _fast(smol, task, mz, batch, heads=heads)
    assert torch.equal(fast.isnan(), slow.isnan())  # the same heads evaluated
    torch.testing.assert_close(fast.nan_to_num(), slow.nan_to_num(), atol=AIE_ATOL_F32, rtol=0)
