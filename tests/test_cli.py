"""The command line: JSON output, one-line errors with non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tvlens.cli import main


def test_tasks_and_models_list(capsys):
    assert main(["tasks", "--json"]) == 0
    tasks = json.loads(capsys.readouterr().out)["tasks"]
    from tvlens import load_task
    from tvlens.tasks import builtin_task_names

    assert [t["name"] for t in tasks] == list(builtin_task_names()) and len(tasks) >= 12
    for t in tasks:  # each row describes the task load_task gives
        task = load_task(t["name"])
        assert t["pairs"] == len(task.pairs) and t["category"] == task.category, t["name"]
    assert main(["models", "--json"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert "smollm2-135m" in names


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--task", "no_such_task"], "unknown task"),
    (["evaluate", "--task", "antonym", "--model", "no-such-model"], "unknown model"),
    (["evaluate", "--task", "missing/file.json"], "does not exist"),
])
def test_errors_are_one_line_with_exit_code_2(argv, message):
    out = subprocess.run([sys.executable, "-m", "tvlens", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("tvlens: error")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_evaluate_json_on_the_embedded_model(smol, tmp_path, capsys):
    assert main(["evaluate", "--task", "antonym", "--shots", "3", "--n", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"model", "task", "shots", "n", "accuracy", "ci_low", "ci_high"} <= set(result)
    assert result["n"] == 8 and result["shots"] == 3 and result["model"] == "smollm2-135m"
    # the numbers are evaluate's on the same items (the CI: its seeded bootstrap, itself
    # held to the Wilson interval in test_scoring.py)
    from tvlens import evaluate, load_task

    r = evaluate(smol, load_task("antonym"), shots=3, n=8)
    assert (result["accuracy"], result["ci_low"], result["ci_high"]) == pytest.approx(
        (r.accuracy, r.ci_low, r.ci_high))


def test_prompt_prints_hendels_format(capsys):
    assert main(["prompt", "--task", "capitalize", "--template", "hendel", "--shots", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("--- prompt 1 (answer ' ")
    body = lines[1:]
    assert len(body) == 3 and all(b.startswith("example: ") for b in body)
    x, y = body[0][len("example: "):].split("-> ")
    assert y == x.capitalize() and body[-1].endswith("->")


def test_prompt_of_a_method_uses_its_own_format(capsys):
    """icl-tv's default is Hendel's format (and K = 5); fv's is Todd's."""
    assert main(["prompt", "--task", "capitalize", "--method", "icl-tv"]) == 0
    body = capsys.readouterr().out.splitlines()[1:]
    assert len(body) == 6 and all(b.startswith("example: ") for b in body)
    assert main(["prompt", "--task", "capitalize", "--method", "fv", "--shots", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("Q: ")


def test_bad_prompt_requests(capsys):
    assert main(["prompt", "--task", "capitalize"]) == 2
    assert "give --template NAME or --method NAME" in capsys.readouterr().err
    assert main(["prompt", "--task", "capitalize", "--method", "tvp"]) == 2
    assert "writes no text prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_prompt_json_tokens_rebuild_the_prompt(smol, capsys):
    assert main(["prompt", "--task", "antonym", "--template", "fv", "--shots", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["template"] == "fv" and len(out["prompts"]) == 1
    row = out["prompts"][0]
    assert row["prompt"].endswith("\nA:") and row["prompt"].count("Q: ") == 4
    assert smol.tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["prompt"]


# ----- one spelling per option; flags from the method configs ---------------------------
def _help(capsys, *verb) -> str:
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    return capsys.readouterr().out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_flags_come_from_the_method_configs(capsys):
    from dataclasses import fields

    from tvlens.methods import ATVConfig, FVConfig, ICLTVConfig, LTVConfig, VanillaConfig

    for verb in ("extract", "sweep"):
        text = _help(capsys, verb)
        for cls in (ICLTVConfig, VanillaConfig, FVConfig):
            assert all(_flag(f.name) in text for f in fields(cls)), (verb, cls)
        # defaults that differ by method are listed per method, from the configs
        assert "icl-tv 5, vanilla 5, fv 10" in " ".join(text.split())
    text = _help(capsys, "learn")
    assert all(_flag(f.name) in text for f in fields(LTVConfig))
    assert "--no-relative-lr" in text
    text = _help(capsys, "adaptive", "train")
    assert all(_flag(f.name) in text for f in fields(ATVConfig) if f.name != "target_template")
    assert "--template" in text and "--target-template" not in text


@pytest.mark.parametrize("verb", [("evaluate",), ("extract",), ("sweep",), ("learn",),
                                  ("prompt",), ("attribute", "ov"), ("attribute", "key-heads"),
                                  ("attribute", "geometry"), ("ablate-heads",),
                                  ("adaptive", "train"), ("adaptive", "evaluate")])
def test_every_verb_spells_the_common_options_the_same(capsys, verb):
    text = _help(capsys, *verb)
    for option in ("--seed", "--template", "--json"):
        assert f"{option} " in text or f"{option}\n" in text, (verb, option)
    if verb != ("adaptive", "train"):
        assert "--n " in text or "--n\n" in text, verb


def test_method_values_are_registry_names():
    from tvlens.cli import attribute, extract
    from tvlens.methods import REGISTRY

    assert set(extract.METHODS) <= set(REGISTRY)
    assert set(attribute.GEOMETRY_METHODS) <= set(REGISTRY)


def test_config_from_flags_keeps_defaults_and_applies_given(tmp_path):
    from tvlens.cli import build_parser
    from tvlens.cli.common import method_config
    from tvlens.methods import FVConfig, LTVConfig

    args = build_parser().parse_args(["learn", "--task", "antonym", "--layers", "3", "--steps", "7",
                                      "--no-relative-lr", "--out", str(tmp_path / "v.safetensors")])
    assert method_config(LTVConfig, args) == LTVConfig(steps=7, relative_lr=False)
    args = build_parser().parse_args(["extract", "--method", "fv", "--task", "antonym", "--k", "3",
                                      "--out", str(tmp_path / "v.safetensors")])
    assert method_config(FVConfig, args) == FVConfig(k=3)  # shots, template: FV's own defaults
    args = build_parser().parse_args(["adaptive", "evaluate", "--generator-dir", "g", "--task",
                                      "antonym", "--shots", "3"])
    assert args.icl_shots == 3  # --shots: the 0.1 spelling of --icl-shots


def test_bad_flag_of_another_method_is_refused_before_loading(tmp_path, capsys):
    out = str(tmp_path / "v.safetensors")
    assert main(["extract", "--method", "icl-tv", "--k", "5", "--task", "capitalize", "--out", out]) == 2
    assert "--k applies to fv, not to icl-tv" in capsys.readouterr().err
    assert main(["attribute", "geometry", "--task", "capitalize", "--layers", "1",
                 "--method", "pca"]) == 2
    assert "unknown method 'pca'" in capsys.readouterr().err


# ----- the vector's template ------------------------------------------------------------
@pytest.fixture
def tiny_cli(tiny, task, tmp_path, monkeypatch):
    """The tiny model behind `--model`, its task as a file, and a `qa` vector of it."""
    import tvlens.models
    from tvlens import TaskVector, fingerprint

    monkeypatch.setattr(tvlens.models, "load_model", lambda *a, **k: tiny)
    task_file = tmp_path / "tiny.json"
    task_file.write_text(json.dumps({"pairs": [list(p) for p in task.pairs]}))
    g = torch.Generator().manual_seed(0)
    tv = TaskVector(torch.randn(1, 1, tiny.cfg.d_model, generator=g), (1,), ("last",),
                    fingerprint(tiny), method="test", hyperparameters={"template": "qa"},
                    task="tiny")
    return str(task_file), str(tv.save(tmp_path / "v.safetensors"))


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_uses_the_vectors_template_unless_told(tiny, task, tiny_cli, capsys):
    from tvlens import TaskVector, evaluate

    task_file, vec = tiny_cli
    assert main(["evaluate", "--task", task_file, "--vector", vec, "--n", "6", "--json"]) == 0
    out = _last_json(capsys)
    assert out["template"] == "qa"
    r = evaluate(tiny, task, vector=TaskVector.load(vec), template="qa", n=6)
    assert (out["accuracy"], out["ci_low"], out["ci_high"]) == pytest.approx(
        (r.accuracy, r.ci_low, r.ci_high))
    with pytest.warns(UserWarning, match="'qa' format.*'arrow'"):
        assert main(["evaluate", "--task", task_file, "--vector", vec, "--n", "6",
                     "--template", "arrow", "--json"]) == 0
    assert _last_json(capsys)["template"] == "arrow"


def test_attribute_ov_uses_the_vectors_template_and_writes_atomic_json(tiny, task, tiny_cli,
                                                                       tmp_path, capsys):
    import os
    import stat

    from tvlens import TaskVector
    from tvlens.attribution import reinjection_test

    task_file, vec = tiny_cli
    folder = tmp_path / "ov"
    assert main(["attribute", "ov", "--task", task_file, "--vector", vec, "--n", "4",
                 "--out", str(folder), "--json"]) == 0
    out = _last_json(capsys)
    assert out["template"] == "qa"
    ref = reinjection_test(tiny, task, TaskVector.load(vec), n=4, template="qa").to_dict()
    assert out["vector_accuracy"] == pytest.approx(ref["vector_accuracy"])
    saved = json.loads((folder / "result.json").read_text())
    assert saved["template"] == "qa" and saved["vector_accuracy"] == out["vector_accuracy"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((folder / "result.json").stat().st_mode) == 0o666 & ~umask
    with pytest.warns(UserWarning, match="'qa' format.*'arrow'"):
        assert main(["attribute", "ov", "--task", task_file, "--vector", vec, "--n", "4",
                     "--template", "arrow", "--json"]) == 0
    assert _last_json(capsys)["template"] == "arrow"


def test_ablate_heads_json_names_the_template(tiny_cli, capsys):
    task_file, vec = tiny_cli
    assert main(["ablate-heads", "--task", task_file, "--vector", vec, "--heads", "0.1,2.3",
                 "--n", "4", "--random-control", "1", "--json"]) == 0
    out = _last_json(capsys)
    assert out["template"] == "qa" and out["heads"] == [[0, 1], [2, 3]]
