"""The public function-vector datasets (Todd et al., MIT; in ../shared for CI and developers)
load through tvlens's file loader, in the public list-of-objects format."""

from __future__ import annotations

import json

import pytest

from tvlens import TvlensError, load_task_file


def test_every_public_task_file_loads_or_is_refused_clearly(shared_data):
    files = sorted(shared_data.glob("*/*.json"))
    files = [f for f in files if f.parent.name in ("abstractive", "extractive")]
    assert len(files) >= 50
    loaded, refused = 0, []
    for path in files:
        raw = json.loads(path.read_text())
        all_strings = all(isinstance(r.get("input"), str) and isinstance(r.get("output"), str)
                          and r["input"].strip() and r["output"].strip() for r in raw)
        if all_strings:
            task = load_task_file(path)
            assert len(task) == len(raw) and task.name == path.stem
            assert task.pairs[0] == (raw[0]["input"], raw[0]["output"])
            assert len(task.train) + len(task.dev) + len(task.test) == len(task)
            loaded += 1
        else:  # e.g. a number or a list as output: refused with a message naming the item
            with pytest.raises(TvlensError, match="item"):
                load_task_file(path)
            refused.append(path.stem)
    assert loaded >= 45, refused


@pytest.mark.slow
def test_public_task_runs_end_to_end(shared_data, smol):
    import tvlens

    task = load_task_file(shared_data / "abstractive" / "present-past.json")
    zero = tvlens.evaluate(smol, task, shots=0, n=16, template="qa")
    icl = tvlens.evaluate(smol, task, shots=5, n=16, template="qa")
    assert icl.accuracy > zero.accuracy + 0.3, (zero.accuracy, icl.accuracy)
