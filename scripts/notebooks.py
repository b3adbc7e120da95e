"""Execute the notebooks: in place with their outputs (``make notebooks``), or with smaller
parameters for the test suite (``tests/test_notebooks.py`` imports :func:`execute`).

    python scripts/notebooks.py                 # every notebooks/*.ipynb, outputs saved in place
    python scripts/notebooks.py notebooks/attribution.ipynb
    python scripts/notebooks.py --check         # exit 1 unless every notebook is committed executed

Each notebook has one code cell tagged ``parameters`` (the papermill convention); an
``overrides`` string is run as a cell right after it. Cells run in a temporary folder (files
a notebook saves do not land in the repo); a notebook is written back only when every
cell succeeded, atomically, so a failed run leaves the committed one as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 3600


def parameters_index(nb) -> int:
    """The index of the notebook's one cell tagged ``parameters``."""
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(found) != 1:
        raise ValueError(f"a notebook needs exactly one cell tagged 'parameters', found {len(found)}")
    return found[0]


def execute(path: Path, *, overrides: str = "", extra_cells: tuple[str, ...] = (),
            workdir: Path | None = None, timeout: int = CELL_TIMEOUT_S):
    """Run the notebook at ``path`` top to bottom and return it with its outputs (raises on the
    first failing cell). ``overrides``: code run right after the parameters cell;
    ``extra_cells``: code cells appended at the end."""
    nb = nbformat.read(path, as_version=4)
    if overrides:
        nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(overrides))
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in extra_cells)
    with tempfile.TemporaryDirectory() as tmp:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(workdir or tmp)}})
        client.execute()
    return nb


def problems(path: Path) -> list[str]:
    """Why the committed notebook at ``path`` does not count as executed (empty: it does)."""
    nb = nbformat.read(path, as_version=4)
    out = []
    try:
        parameters_index(nb)
    except ValueError as err:
        out.append(str(err))
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    if counts != list(range(1, len(code) + 1)):
        out.append(f"cells not executed once, top to bottom (execution counts {counts})")
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    if errors:
        out.append(f"{len(errors)} cell(s) with an error output")
    if not any(c.get("outputs") for c in code):
        out.append("no outputs")
    blind = [o for c in code for o in c.get("outputs", [])
             if "application/vnd.plotly.v1+json" in o.get("data", {}) and "image/png" not in o.get("data", {})]
    if blind:
        out.append(f"{len(blind)} figure(s) without a PNG (static viewers show nothing): call "
                   "tvlens.plots.static_figures_in_notebooks() first")
    leaks = [o for c in code for o in c.get("outputs", [])
             if o.get("name") == "stderr" and "site-packages/" in "".join(o.get("text", ""))]
    if leaks:
        out.append(f"{len(leaks)} stderr output(s) from an installed library (a warning naming this "
                   "machine's paths): silence it where tvlens imports that library")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    ap.add_argument("--check", action="store_true", help="only check that each is committed executed")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or NOTEBOOKS
    if args.check:
        bad = {p: problems(p) for p in paths}
        for p, why in bad.items():
            for w in why:
                print(f"{p.name}: {w}; run `make notebooks`", file=sys.stderr)
        return 1 if any(bad.values()) else 0
    for path in paths:
        start = time.perf_counter()
        nb = execute(path)
        for cell in nb.cells:  # keep the committed file free of per-run kernel noise
            cell.get("metadata", {}).pop("execution", None)
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        os.replace(tmp, path)
        print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
