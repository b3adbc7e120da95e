"""The command line: JSON output, one-line errors with non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_prompt_json_tokens_rebuild_the_prompt(smol, capsys):
    assert main(["prompt", "--task", "antonym", "--template", "fv", "--shots", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["template"] == "fv" and len(out["prompts"]) == 1
    row = out["prompts"][0]
    assert row["prompt"].endswith("\nA:") and row["prompt"].count("Q: ") == 4
    assert smol.tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["prompt"]
