"""The report's files: JSON (every number), Markdown (summary + tables), self-contained
HTML (plotly's JS inlined once, MathJax off, no CDN) and PNG / PDF of each figure."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from tvlens.io import write_json, write_text

VERDICT_COLOURS = {"reproduces": "#1b7837", "partially": "#b8860b",
                   "does not reproduce": "#b2182b", "inconclusive": "#636363",
                   "refused": "#404040"}


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "—" if math.isnan(x) else f"{x:.{digits}f}"


def _interval(v: dict) -> str:
    if v.get("ci_low") is None or math.isnan(float(v["ci_low"])):
        return _num(v["mean"])
    return f"{_num(v['mean'])} [{_num(v['ci_low'])}, {_num(v['ci_high'])}]"


def _models(report: dict) -> list[str]:
    seen = []
    for r in report["results"]:
        if r["model"] not in seen:
            seen.append(r["model"])
    return seen


def summary_rows(report: dict) -> list[dict]:
    """One row per finding: its verdict per model (``·`` where it did not run)."""
    rows: dict[str, dict] = {}
    for r in report["results"]:
        rows.setdefault(r["finding"], {"finding": r["finding"], "title": r["title"]})[r["model"]] = r["verdict"]
    return list(rows.values())


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value_rows(r: dict) -> list[list[str]]:
    rows = []
    for name, v in r["values"].items():
        paper = r["paper"]["values"].get(name)
        seeds = ", ".join(_num(x) for x in v["seeds"]) if len(v["seeds"]) > 1 else ""
        rows.append([name, _interval(v), seeds, _num(paper["value"]) if paper else ""])
    return rows


def _claim_rows(r: dict) -> list[list[str]]:
    return [[c["text"], _interval(c["difference"]), c["outcome"]] for c in r["claims"]]


def _table_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = list(dict.fromkeys(k for row in rows for k in row))  # every column any row has
    return header, [[_num(row.get(h)) if isinstance(row.get(h), float) else row.get(h, "")
                     for h in header] for row in rows]


def markdown(report: dict) -> str:
    """The whole report as Markdown (what ``docs/results`` pages are generated from)."""
    models = _models(report)
    out = [f"# tvlens reproduce — {report['profile']} profile, {report['seeds']} seed(s)", "",
           f"Made {report['created']} with tvlens {report['versions'].get('tvlens', '?')}, "
           f"torch {report['versions'].get('torch', '?')}, transformers "
           f"{report['versions'].get('transformers', '?')}.", *_merged_from(report), "", "## Summary", "",
           _md_table(["finding", *models],
                     [[row["finding"], *(row.get(m, "·") for m in models)] for row in summary_rows(report)]),
           "", "## How a verdict is computed", "", report["rule"], ""]
    for r in report["results"]:
        out += finding_markdown(r, title=f"{r['title']} — `{r['finding']}` on {r['model']}")
    return "\n".join(out)


def _merged_from(report: dict) -> list[str]:
    """A line per source report of a merged report (:func:`~tvlens.reproduce.report.merge_reports`)."""
    src = report.get("merged_from") or []
    gone = report.get("superseded") or []
    return (["", f"Merged from {len(src)} runs:", ""]
            + [f"- made {m['created']}: {', '.join(m['results'])}" for m in src]
            + ([f"- superseded by a newer run: {', '.join(gone)}"] if gone else [])) if src else []


def finding_markdown(r: dict, *, title: str, level: int = 2) -> list[str]:
    """One result of a report (a finding on a model) as Markdown lines: the paper's claim
    and values, the verdict, the claims' differences, our values beside the paper's, the
    finding's tables, its settings and seconds."""
    out = [f"{'#' * level} {title}", "", f"**Paper.** {r['paper']['claim']}", ""]
    for name, pv in r["paper"]["values"].items():
        out.append(f"- paper `{name}`: {_num(pv['value'])} — {pv['source']}")
    if r.get("refused"):
        return out + ["", f"**Refused on this model:** {r['refused']}", ""]
    out += ["", f"**Verdict: {r['verdict']}.**", "",
            _md_table(["claim", "difference [95% CI]", "outcome"], _claim_rows(r)), "",
            _md_table(["value", "ours [95% CI]", "seeds", "paper"], _value_rows(r)), ""]
    for tname, rows in r["tables"].items():
        header, body = _table_rows(rows)
        if header:
            out += [f"*{tname}* (seed 0)", "", _md_table(header, body), ""]
    return out + [f"Settings: `{r['settings']}`; seconds per seed: {r['seconds']}.", ""]


def _html_table(header: Sequence[str], rows: Sequence[Sequence], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _verdict_cell(v: str | None) -> str:
    if v is None:
        return "·"
    return f'<span class="verdict" style="background:{VERDICT_COLOURS[v]}">{html.escape(v)}</span>'


def to_html(report: dict, figures: dict[tuple[str, str], tuple[str, list[str]]]) -> str:
    """The report as one offline HTML page (``figures``: (finding, model) → (div, files))."""
    import plotly.offline

    models = _models(report)
    esc = html.escape
    summary = _html_table(["finding", *models],
                          [[f'<a href="#{esc(row["finding"])}">{esc(row["finding"])}</a> — {esc(row["title"])}',
                            *(_verdict_cell(row.get(m)) for m in models)] for row in summary_rows(report)],
                          "summary")
    sections = []
    for r in report["results"]:
        anchor = r["finding"] if r["model"] == next(x["model"] for x in report["results"]
                                                    if x["finding"] == r["finding"]) else ""
        paper = "".join(f"<li><code>{esc(k)}</code>: {_num(v['value'])} — {esc(v['source'])}</li>"
                        for k, v in r["paper"]["values"].items())
        div, files = figures.get((r["finding"], r["model"]), ("", []))
        links = " ".join(f'<a href="{esc(f)}">{esc(Path(f).suffix[1:].upper())}</a>' for f in files)
        tables = "".join(f"<h4>{esc(t)} (seed 0)</h4>" + _html_table(*_escaped(rows))
                         for t, rows in r["tables"].items() if rows)
        sections.append(f"""
<section id="{esc(anchor)}">
<h2>{esc(r['title'])} — <code>{esc(r['finding'])}</code> on {esc(r['model'])} {_verdict_cell(r['verdict'])}</h2>
<p><b>Paper.</b> {esc(r['paper']['claim'])}</p><ul>{paper}</ul>
{f"<p><b>Refused on this model:</b> {esc(r['refused'])}</p>" if r.get("refused") else ""}
{_html_table(["claim", "difference [95% CI]", "outcome"], [[esc(c) for c in row] for row in _claim_rows(r)])}
{_html_table(["value", "ours [95% CI]", "seeds", "paper"], [[esc(c) for c in row] for row in _value_rows(r)])}
<div class="figure">{div}</div><p class="files">{links}</p>
{tables}
<p class="settings">Settings: <code>{esc(str(r['settings']))}</code>; seconds per seed: {esc(str(r['seconds']))}</p>
</section>""")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tvlens reproduce</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
.verdict {{ color: white; padding: 1px 6px; border-radius: 3px; font-size: 0.85em; }}
.settings, .files {{ font-size: 0.8em; color: #555; }}
</style>
<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>
</head><body>
<h1>tvlens reproduce — {esc(report['profile'])} profile, {report['seeds']} seed(s)</h1>
<p>Made {esc(report['created'])}; versions: <code>{esc(str(report['versions']))}</code></p>
<h2>Summary</h2>
{summary}
<h2>How a verdict is computed</h2>
<pre>{esc(report['rule'])}</pre>
{''.join(sections)}
</body></html>
"""


def _escaped(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    header, body = _table_rows(rows)
    return header, [[html.escape(str(c)) for c in row] for row in body]


def write_outputs(out: Path, report: dict, findings, *, figures: bool = True) -> None:
    """report.json, report.md, report.html and (``figures``) PNG + PDF of each figure."""
    from tvlens.plots import export

    by_id = {f.id: f for f in findings}
    divs: dict[tuple[str, str], tuple[str, list[str]]] = {}
    (out / "figures").mkdir(exist_ok=True)
    for r in report["results"]:
        finding = by_id.get(r["finding"])  # None: a merged result of a finding not known here
        if finding is None or finding.figure is None or r.get("refused"):
            continue
        fig = finding.figure(r)
        files = []
        if figures:
            for ext in ("png", "pdf"):
                path = out / "figures" / f"{r['finding']}-{r['model']}.{ext}"
                export(fig, path)
                files.append(str(path.relative_to(out)))
        r["figures"] = files
        divs[(r["finding"], r["model"])] = (
            fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False), files)
    write_json(out / "report.json", report, indent=1)
    write_text(out / "report.md", markdown(report))
    write_text(out / "report.html", to_html(report, divs))
