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
    assert len(tasks) >= 12 and {"name", "category", "pairs"} <= set(tasks[0])
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
    assert result["ci_low"] <= result["accuracy"] <= result["ci_high"]
