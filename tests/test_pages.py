"""``tvlens pages``: the results pages and the README's table come from the reports."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tvlens import TvlensError
from tvlens.reproduce import FINDINGS
from tvlens.reproduce.pages import PAGES, README_BEGIN, README_END, load_reports, render_page, write_pages
from tvlens.reproduce.render import _interval

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "docs" / "results" / "reports"


def _committed() -> list[str]:
    return [f"docs/results/reports/{name}" for name in (REPORTS / "index.txt").read_text().split()]


def test_committed_pages_and_readme_are_what_the_committed_reports_give(monkeypatch):
    monkeypatch.chdir(ROOT)  # the command written into the pages names relative paths
    stale = write_pages(_committed(), "docs/results", readme="README.md", check=True)
    assert stale == [], f"edited by hand or stale: {stale}; run `make pages`"


def test_every_finding_has_one_page_and_every_number_reaches_it():
    assert sorted(f for p in PAGES for f in p.findings) == sorted(FINDINGS)
    reports = load_reports([REPORTS / "quick.json"])
    pages = {p.name: render_page(p, reports, command="test") for p in PAGES}
    for r in reports[0][1]["results"]:
        (home,) = [p.name for p in PAGES if r["finding"] in p.findings]
        text = pages[home]
        assert f"**Verdict: {r['verdict']}.**" in text
        for v in r["values"].values():
            assert _interval(v) in text
        for c in r["claims"]:
            assert _interval(c["difference"]) in text
        others = [name for name, t in pages.items() if name != home]
        assert not any(f"`{r['finding']}`" in pages[o] for o in others)
    assert all(f"(history/{name}.md)" in t for name, t in pages.items())


def test_reports_appear_in_the_order_given(tmp_path):
    quick = json.loads((REPORTS / "quick.json").read_text())
    full = copy.deepcopy(quick)
    full["profile"], full["seeds"] = "full", 3
    for r in full["results"]:
        r["verdict"] = "does not reproduce"
    (tmp_path / "full.json").write_text(json.dumps(full))
    text = render_page(PAGES[0], load_reports([tmp_path / "full.json", REPORTS / "quick.json"]),
                       command="test")
    assert text.index("### smollm2-135m, full profile, 3 seed(s)") < text.index("### smollm2-135m, quick profile")
    assert text.index("**Verdict: does not reproduce.**") < text.index("**Verdict: reproduces.**")


def test_a_page_edited_by_hand_is_caught_and_a_rerun_restores_it(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nold table\n{README_END}\n\nafter\n")
    report = str(REPORTS / "quick.json")
    written = write_pages([report], tmp_path, readme=readme)
    assert len(written) == len(PAGES) + 1 and readme.read_text().endswith("\n\nafter\n")
    assert "old table" not in readme.read_text() and "| [`atv`](docs/results/adaptive.md) |" in readme.read_text()
    page = tmp_path / "extracted.md"
    page.write_text(page.read_text().replace("0.771", "0.871"))
    assert write_pages([report], tmp_path, readme=readme, check=True) == [page]
    cli = [sys.executable, "-m", "tvlens", "pages", report, "--out", str(tmp_path), "--readme", str(readme)]
    res = subprocess.run([*cli, "--check"], capture_output=True, text=True)
    assert res.returncode == 1 and "extracted.md is not what the reports give" in res.stderr
    assert subprocess.run(cli, capture_output=True, text=True).returncode == 0
    assert write_pages([report], tmp_path, readme=readme, check=True) == []


def test_bad_input_gets_one_line(tmp_path):
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(TvlensError, match="not a report of `tvlens reproduce`"):
        load_reports([tmp_path / "other.json"])
    with pytest.raises(TvlensError, match="no reports given"):
        load_reports([])
    (tmp_path / "README.md").write_text("# no block\n")
    with pytest.raises(TvlensError, match="has no results block; add the two lines"):
        write_pages([REPORTS / "quick.json"], tmp_path / "pages", readme=tmp_path / "README.md")
    assert not (tmp_path / "pages").exists()  # refused before anything was written
    res = subprocess.run([sys.executable, "-m", "tvlens", "pages", str(tmp_path / "missing.json"),
                          "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
