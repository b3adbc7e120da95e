"""Arguments and output helpers shared by every command group.

One spelling per option across verbs:

================  ===================================================================
``--n``           items of the split that are scored (the first N)
``--seed``        the seed of the prompts (and of training, for the trained methods)
``--shots``       demonstrations in the prompts the verb scores or trains on
                  (``--icl-shots``: those of the ICL reference column)
``--template``    the prompt format (a ``TEMPLATES`` name or a demo string); for a verb
                  reading ``--vector`` the default is the vector's own format
``--out``         what the verb makes: a vector file (``extract``, ``learn``), a
                  generator or run folder (``adaptive train``, ``tvp train``), or the
                  folder of results and figures (``sweep``, ``attribute``, ``demo``, ...)
``--method``      a :data:`tvlens.methods.REGISTRY` name (``icl-tv``, ``fv``, ``ltv``, ...)
================  ===================================================================

Method settings come from the method's config (:func:`tvlens.methods.add_config_flags`),
so a flag left out keeps the config's default.
"""

from __future__ import annotations

import math
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from tvlens.errors import TvlensError


def add_model_arg(p) -> None:
    p.add_argument("--model", default=None,
                   help="embedded model name, HF folder or hub name (default: smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def add_task_arg(p, required: bool = True) -> None:
    p.add_argument("--task", required=required, help="built-in task name or path to a JSON task file")


def add_json_arg(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def add_seed_arg(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default 0)")


def add_template_arg(p, *, vector: bool = True, default: str = "arrow") -> None:
    p.add_argument("--template", default=None,
                   help="prompt format: hendel, fv, qa, arrow or a demo string with {x} and {y} "
                        + ("(default: the format the vector was made with, else " if vector
                           else "(default: ") + f"{default})")


def template_for(args, vector=None, *, own: str | None = None, default: str = "arrow",
                 what: str = "tvlens") -> str:
    """``--template`` if given (a warning naming both formats when it differs from the
    vector's own), else the vector's own format (``own`` when the vector does not carry
    one), else ``default``."""
    from types import SimpleNamespace

    from tvlens.evaluation import resolve_template

    holder = SimpleNamespace(template=own) if own is not None else vector
    return resolve_template(holder, getattr(args, "template", None), default=default, what=what)


def add_method_flags(p, classes, *, skip: tuple[str, ...] = ()) -> None:
    """The flags of several method configs on one parser (``extract --method M``).

    Each field once; where the configs' defaults differ the help lists them per method.
    """
    from tvlens.methods import add_config_flags
    from tvlens.methods.base import config_help

    owners: dict[str, list] = {}
    for cls in classes:
        for f in fields(cls):
            owners.setdefault(f.name, []).append(cls)
    differ = {name for name, cs in owners.items()
              if len({repr(getattr(c(), name)) for c in cs}) > 1}
    done = set(skip) | differ
    for cls in classes:
        add_config_flags(p, cls, skip=tuple(done))
        done |= {f.name for f in fields(cls)}
    for name in sorted(differ - set(skip)):
        cls = owners[name][0]
        f = next(f for f in fields(cls) if f.name == name)
        kind = type(getattr(cls(), name))
        if kind not in (int, float, str):
            raise TypeError(f"{name}: per-method defaults of type {kind.__name__} need a flag of their own")
        shown = ", ".join(f"{c.method} {getattr(c(), name)!r}" for c in owners[name])
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, type=kind,
                       help=f"{config_help(f)} (default: {shown})")


def method_config(cls, args, classes=(), *, base=None):
    """``cls``'s config from the flags; a flag of another of ``classes`` is refused."""
    from tvlens.methods import config_from_args

    own = {f.name for f in fields(cls)}
    for other in classes:
        for f in fields(other):
            if f.name not in own and getattr(args, f.name, None) is not None:
                users = [c.method for c in classes if f.name in {g.name for g in fields(c)}]
                raise TvlensError(f"--{f.name.replace('_', '-')} applies to {', '.join(users)}, "
                                  f"not to {cls.method}; leave it out")
    return config_from_args(cls, args, base=base)


def load_model_arg(args):
    from tvlens.models import load_model

    return load_model(args.model, device=args.device, progress=not getattr(args, "json", False))


def load_task_arg(args):
    from tvlens.tasks import load_task

    return load_task(args.task)


def out_path(path: str, *, overwrite: bool = False, is_dir: bool = False) -> Path:
    """Validate an output path: its folder must exist; an existing file needs --overwrite."""
    p = Path(path)
    if is_dir:
        if p.exists() and not p.is_dir():
            raise TvlensError(f"output folder {path!r} is a file")
        if not p.parent.exists():
            raise TvlensError(f"folder {str(p.parent)!r} does not exist; create it first")
        p.mkdir(exist_ok=True)
        return p
    if not p.parent.exists():
        raise TvlensError(f"folder {str(p.parent)!r} does not exist; create it first")
    if p.exists() and not overwrite:
        raise TvlensError(f"{path!r} exists; pass --overwrite to replace it")
    return p


def int_list(text: str, what: str = "layers") -> list[int]:
    """``"0,4,8"`` → ``[0, 4, 8]``; anything else is a TvlensError naming the option."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TvlensError(f"--{what} {text!r} must be comma-separated integers, e.g. 10 or 0,4,8") from None
    if not values:
        raise TvlensError(f"--{what} is empty; give at least one integer, e.g. 10")
    return values


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (list, dict)):
        try:
            return _clean(obj.item())
        except (ValueError, TypeError):
            pass
    return obj


def print_json(obj: dict) -> None:
    import json

    json.dump(_clean(obj), sys.stdout)
    sys.stdout.write("\n")


def write_json(path, obj: dict, *, indent: int = 1) -> Path:
    """Atomically write ``obj`` (non-finite floats as null, like ``--json``) to ``path``."""
    from tvlens.io import write_json as _write

    return _write(path, _clean(obj), indent=indent)


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """A plain aligned table on stdout."""
    if not rows:
        return
    columns = columns or list(rows[0])

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns))
