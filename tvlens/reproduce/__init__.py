"""``tvlens reproduce``: every finding of the papers regenerated in one command, the paper's
number beside ours, with seeds, intervals and a verdict computed by a stated rule.

    from tvlens.reproduce import reproduce
    report = reproduce("runs/repro", models=["smollm2-135m"], seeds=1, profile="quick")
    [(r["finding"], r["model"], r["verdict"]) for r in report["results"]]

Modules: ``verdicts`` (the rule: claims, differences, outcomes, verdicts) → ``findings``
(what each paper claims and how it is measured, through the public API) → ``report``
(the resumable cache of finished parts, the assembled report) → ``render`` (JSON,
Markdown, offline HTML, figures).
"""

from tvlens.reproduce.findings import FINDINGS, PROFILES, Finding, PaperValue, get_findings
from tvlens.reproduce.report import reproduce
from tvlens.reproduce.verdicts import RULE, VERDICTS, Claim, judge, outcome, verdict

__all__ = ["FINDINGS", "PROFILES", "RULE", "VERDICTS", "Claim", "Finding", "PaperValue",
           "get_findings", "judge", "outcome", "reproduce", "verdict"]
