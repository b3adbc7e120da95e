"""The versions of the libraries whose internals tvlens touches, as tested.

tvlens reaches into TransformerLens's bridge (hook names, ``boot_native``, the bridge
builder) and Hugging Face transformers (model forward arguments, ``logits_to_keep``, KV
caches). A release outside the range below may change a number without an error — as
transformers 5.24 did to the KV-cached indirect effects — so importing tvlens with one
installed warns once, naming the tested range. It does not refuse: users upgrade, and the
test suite (``make test-latest``) is how an upgrade is checked.

``TESTED`` equals the bounds in ``pyproject.toml`` (a test holds them together).

The one TransformerLens internal tvlens relies on lives here too, behind public helpers
(:func:`original_component`, :func:`has_original_component`,
:func:`swap_original_component`), so a change in TransformerLens breaks one place with a
clear :class:`~tvlens.errors.TvlensError` instead of an ``AttributeError`` deep in a method.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from importlib import metadata

from packaging.version import Version  # a dependency of transformers
from torch import nn

from tvlens.errors import TvlensError

TESTED: dict[str, tuple[str, str]] = {
    # distribution: (lowest tested, first untested), i.e. lowest <= version < first untested
    # 5.24 renamed the cache argument; TransformerLens 4.3's attention then keeps an empty
    # cache, so TransformerBridge.generate (KV cache on by default) continues without context
    # (measured: tests/test_environment.py). tvlens's own prefix cache works around it
    # (tvlens.kv_cache), the bridge's generate cannot be: 5.24 is outside the tested range.
    "transformers": ("5.9", "5.24"),
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


# --- TransformerLens bridge internals (tested with transformer-lens 4.3.0) -------------------
#
# A TransformerLens ``TransformerBridge`` block (``model.blocks[i]``, a ``BlockBridge``)
# wraps the Hugging Face decoder layer it bridges. TransformerLens 4.3 keeps that layer as
# the child module ``block._modules["_original_component"]``: the public
# ``block.original_component`` property reads it, and ``BlockBridge.forward`` calls it on
# every forward (after the block's input hooks, before its output hooks). Replacing the
# child therefore changes what the block computes while every hook point stays in place.
#
# The public setter, ``set_original_component``, is not usable for a temporary swap:
# ``BlockBridge.set_original_component`` also deletes the hook points (``hook_attn_out``,
# ``hook_mlp_out``) whose submodules the new module lacks, which would not come back when
# the original layer is put back. So the swap writes the child slot directly.

_ORIGINAL = "_original_component"


def _tl_hint() -> str:
    low, high = TESTED["transformer-lens"]
    try:
        have = metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        have = "not installed"
    return (f"tvlens expects TransformerLens bridge blocks to hold the wrapped layer as the "
            f"child module '{_ORIGINAL}' (tested with transformer-lens >={low},<{high}; "
            f"installed: {have}); install a tested version: pip install "
            f"'transformer-lens>={low},<{high}'")


def has_original_component(block: nn.Module) -> bool:
    """Whether ``block`` (e.g. ``model.blocks[i]`` of a bridge) wraps a module tvlens can swap."""
    return isinstance(getattr(block, "_modules", None), dict) and \
        isinstance(block._modules.get(_ORIGINAL), nn.Module)


def original_component(block: nn.Module) -> nn.Module:
    """The Hugging Face module a bridge block wraps (its decoder layer).

    Raises :class:`TvlensError` when ``block`` wraps none (not a bridge block, or a
    TransformerLens release that stores the layer elsewhere).
    """
    if not has_original_component(block):
        raise TvlensError(f"{type(block).__name__} wraps no original component: {_tl_hint()}")
    return block._modules[_ORIGINAL]


def swap_original_component(block: nn.Module, module: nn.Module) -> nn.Module:
    """Make ``block`` run ``module`` in place of the layer it wraps; return the replaced one.

    The block's hook points are untouched (see the comment above); swap back by calling
    this again with the returned module, in a ``finally``. Raises :class:`TvlensError` as
    :func:`original_component` does.
    """
    previous = original_component(block)
    block._modules[_ORIGINAL] = module
    return previous


@contextmanager
def hf_progress_bars(enabled: bool):
    """Hugging Face's progress bars on or off for the body, restored afterwards (library code
    must not change the process-wide setting)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
