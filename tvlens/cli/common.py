"""Arguments and output helpers shared by every command group."""

from __future__ import annotations

import json
import math
import sys
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
    json.dump(_clean(obj), sys.stdout)
    sys.stdout.write("\n")


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
