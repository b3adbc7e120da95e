"""Attention heads as ``(layer, query head)`` pairs: enumerate and validate them.

Heads are *query* heads throughout tvlens, also for grouped-query attention (SmolLM2:
9 query / 3 KV heads per layer), because ``hook_z`` and ``W_O`` are per query head.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvlens.errors import TvlensError

Head = tuple[int, int]


def all_heads(model) -> list[Head]:
    """Every ``(layer, head)`` of ``model``, layer-major."""
    return [(layer, h) for layer in range(int(model.cfg.n_layers)) for h in range(int(model.cfg.n_heads))]


def check_heads(model, heads: Sequence[Sequence[int]]) -> list[Head]:
    """Validate ``(layer, head)`` pairs against ``model``; duplicates are dropped, order kept."""
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    out: list[Head] = []
    for pair in heads:
        if len(pair) != 2:
            raise TvlensError(f"a head is (layer, head); got {pair!r}")
        layer, h = int(pair[0]), int(pair[1])
        if not (0 <= layer < L and 0 <= h < H):
            raise TvlensError(f"head {h} of layer {layer} ({layer}.{h}) is out of range: this "
                              f"model has layers 0..{L - 1} and heads 0..{H - 1}")
        if (layer, h) not in out:
            out.append((layer, h))
    return out
