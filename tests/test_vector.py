"""TaskVector: files (bit-exact, atomic, refusals) and arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from tvlens import TaskVector, TvlensError, fingerprint, tiny_model


def _tv(model, **kw):
    return TaskVector(torch.randn(2, 1, model.cfg.d_model), (0, 2), ("last",), fingerprint(model),
                      method="test", hyperparameters={"lr": 0.1}, task="tiny", **kw)


def test_save_load_is_bit_exact(tiny, tmp_path):
    tv = _tv(tiny, mode="replace", scale=0.5)
    path = tv.save(tmp_path / "v.safetensors")
    back = TaskVector.load(path, tiny)
    assert torch.equal(back.vectors, tv.vectors)
    assert (back.layers, back.positions, back.mode, back.scale, back.method, back.task) == (
        tv.layers, tv.positions, tv.mode, tv.scale, tv.method, tv.task)
    assert back.hyperparameters == {"lr": 0.1} and back.model == tv.model


def test_load_refuses_another_model(tiny, tmp_path):
    path = _tv(tiny).save(tmp_path / "v.safetensors")
    other = tiny_model(d_vocab=50, n_layers=3, d_model=32, name="other")
    with pytest.raises(TvlensError, match="was made for"):
        TaskVector.load(path, other)


def test_existing_file_is_kept_unless_overwrite(tiny, tmp_path):
    path = tmp_path / "v.safetensors"
    first = _tv(tiny)
    first.save(path)
    with pytest.raises(TvlensError, match="exists"):
        _tv(tiny).save(path)
    assert torch.equal(TaskVector.load(path).vectors, first.vectors)
    second = _tv(tiny)
    second.save(path, overwrite=True)
    assert torch.equal(TaskVector.load(path).vectors, second.vectors)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temp files left


def test_save_into_missing_folder_is_refused(tiny, tmp_path):
    with pytest.raises(TvlensError, match="does not exist"):
        _tv(tiny).save(tmp_path / "nope" / "v.safetensors")


@pytest.mark.parametrize("content", [b"not a safetensors file", b""])
def test_malformed_file_is_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(TvlensError, match="not a readable tvlens vector"):
        TaskVector.load(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, tmp_path / "w.safetensors")
    with pytest.raises(TvlensError, match="not a tvlens vector"):
        TaskVector.load(tmp_path / "w.safetensors")


def test_metadata_is_plain_json(tiny, tmp_path):
    from safetensors import safe_open

    path = _tv(tiny).save(tmp_path / "v.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tvlens"])
    assert meta["model"]["name"] == tiny.cfg.model_name and meta["layers"] == [0, 2]


def test_arithmetic(tiny):
    a, b = _tv(tiny), _tv(tiny)
    assert torch.equal((a + b).vectors, a.vectors + b.vectors)
    assert torch.equal((a - b).vectors, a.vectors - b.vectors)
    assert torch.equal((-a).vectors, -a.vectors)
    assert torch.equal((3 * a).vectors, a.vectors * 3) and torch.equal((a * 3).vectors, a.vectors * 3)
    assert torch.equal((a / 2).vectors, a.vectors / 2)
    assert (a + b).task == "tiny+tiny"
    with pytest.raises(TypeError):
        a + 1  # noqa: B018
    with pytest.raises(TypeError):
        a * "x"  # noqa: B018


def test_arithmetic_refuses_mismatches(tiny):
    a = _tv(tiny)
    b = TaskVector(torch.randn(2, 1, tiny.cfg.d_model), (0, 1), ("last",), fingerprint(tiny))
    with pytest.raises(TvlensError, match="different layers"):
        a + b  # noqa: B018
    c = TaskVector(a.vectors, a.layers, a.positions, fingerprint(tiny), mode="replace")
    with pytest.raises(TvlensError, match="different mode"):
        a + c  # noqa: B018


def test_wrong_width_is_refused(tiny):
    with pytest.raises(TvlensError, match="width"):
        TaskVector(torch.randn(1, 1, 7), (0,), ("last",), fingerprint(tiny))
