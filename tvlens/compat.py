"""The versions of the libraries whose internals tvlens touches, as tested.

tvlens reaches into TransformerLens's bridge (hook names, ``boot_native``, the bridge
builder) and Hugging Face transformers (model forward arguments, ``logits_to_keep``, KV
caches). A release outside the range below may change a number without an error — as
transformers 5.24 did to the KV-cached indirect effects — so importing tvlens with one
installed warns once, naming the tested range. It does not refuse: users upgrade, and the
test suite (``make test-latest``) is how an upgrade is checked.

``TESTED`` equals the bounds in ``pyproject.toml`` (a test holds them together).
"""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.version import Version  # a dependency of transformers

TESTED: dict[str, tuple[str, str]] = {
    # distribution: (lowest tested, first untested), i.e. lowest <= version < first untested
    "transformers": ("5.9", "5.25"),
    "transformer-lens": ("4.3", "4.4"),
}


def _in_range(version: str, low: str, high: str) -> bool:
    """``low <= version < high`` on release numbers (5.24.0.dev0 counts as 5.24.0)."""
    release = Version(version).release
    return Version(low).release <= release < Version(high).release


def untested_versions() -> list[str]:
    """One line per installed library outside its tested range (empty when all are in)."""
    out = []
    for dist, (low, high) in TESTED.items():
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if not _in_range(have, low, high):
            out.append(f"{dist} {have} (tested: >={low},<{high})")
    return out


def warn_if_untested() -> None:
    lines = untested_versions()
    if lines:
        warnings.warn(
            "tvlens was tested with other versions of " + "; ".join(lines) + ". Numbers may "
            "differ; install the tested versions (pip install -r requirements.lock) or run "
            "`make test-latest` to check this environment.", RuntimeWarning, stacklevel=3)
