"""``tvlens reproduce``: regenerate the papers' findings into a report folder."""

from __future__ import annotations

import sys

from tvlens.cli.common import add_json_arg, print_json, print_table


def register(sub) -> None:
    from tvlens.reproduce import FINDINGS, PROFILES

    p = sub.add_parser("reproduce", help="regenerate every finding of the papers into a report",
                       description="Run each finding on each model and seed (cached as it completes: "
                                   "an interrupted run continues), judge it against the paper by the "
                                   "rule stated in the report, and write DIR/report.{json,md,html} "
                                   "and DIR/figures/.")
    p.add_argument("--models", default="smollm2-135m", help="comma-separated embedded models "
                   "(default smollm2-135m; also gemma-3-270m when installed)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per finding and model (default 1)")
    p.add_argument("--profile", default="quick", choices=PROFILES,
                   help="quick: minutes on a laptop; full: the real reproduction")
    p.add_argument("--only", default=None, help=f"comma-separated finding ids: {', '.join(FINDINGS)}")
    p.add_argument("--out", required=True, help="output folder (created; reused to resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace parts made with other settings (the old ones are kept aside)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG/PDF export")
    p.add_argument("--merge", nargs="+", metavar="REPORT", default=None,
                   help="run nothing: join these report.json files (same profile, seeds and "
                        "versions; made one finding at a time, or elsewhere) into DIR's report")
    p.add_argument("--supersede", action="store_true",
                   help="with --merge: a finding × model in several reports keeps the newest one")
    add_json_arg(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("pages", help="write docs/results pages (and the README's results table) "
                       "from reproduce reports",
                       description="Regenerate the results pages from report.json files of "
                                   "`tvlens reproduce`, so that no number in them is typed by hand. "
                                   "Reports are shown in the order given.")
    p.add_argument("reports", nargs="+", help="report.json files (e.g. docs/results/reports/*.json)")
    p.add_argument("--out", required=True, help="folder of the pages (e.g. docs/results)")
    p.add_argument("--readme", default=None, help="also rewrite this README's results block")
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 if a page differs from what the reports give")
    p.set_defaults(func=cmd_pages)


def cmd_reproduce(args) -> int:
    from tvlens.reproduce import reproduce

    if args.merge is not None:
        return _merge(args)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    log = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = reproduce(args.out, models=models, seeds=args.seeds, profile=args.profile,
                           only=args.only, overwrite=args.overwrite, figures=not args.no_figures,
                           log=log)
    except KeyboardInterrupt:
        print(f"tvlens: interrupted; the finished parts are cached in {args.out}: rerun the same "
              "command to continue", file=sys.stderr)
        return 130
    rows = [{"finding": r["finding"], "model": r["model"], "verdict": r["verdict"],
             "seconds": sum(r["seconds"])} for r in report["results"]]
    if args.json:
        print_json({"out": args.out, "results": rows})
    else:
        print_table(rows)
        print(f"report: {args.out}/report.html, report.json, report.md")
    return 0


def _merge(args) -> int:
    from pathlib import Path

    from tvlens.errors import TvlensError
    from tvlens.reproduce import get_findings
    from tvlens.reproduce.render import write_outputs
    from tvlens.reproduce.report import merge_reports

    report = merge_reports(args.merge, supersede=args.supersede)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TvlensError(f"{str(out)!r} is a file; --out must be a folder")
    if (out / "report.json").exists() and not args.overwrite:
        raise TvlensError(f"{out / 'report.json'} exists; give another --out, or --overwrite to "
                          "replace that report")
    out.mkdir(parents=True, exist_ok=True)
    write_outputs(out, report, get_findings(), figures=not args.no_figures)
    rows = [{"finding": r["finding"], "model": r["model"], "verdict": r["verdict"]}
            for r in report["results"]]
    if args.json:
        print_json({"out": args.out, "results": rows})
    else:
        print_table(rows)
        print(f"report: {args.out}/report.html, report.json, report.md (merged from "
              f"{len(args.merge)} reports)")
    return 0


def cmd_pages(args) -> int:
    from tvlens.reproduce.pages import write_pages

    files = write_pages(args.reports, args.out, readme=args.readme, check=args.check)
    if args.check:
        for path in files:
            print(f"tvlens: {path} is not what the reports give: rerun without --check", file=sys.stderr)
        return 1 if files else 0
    for path in files:
        print(f"wrote {path}")
    return 0
