"""The intervention protocol: anything that changes a forward returns hooks for it.

An intervention is an object with ``hooks(model, batch) -> [(hook_name, fn), ...]``: the
TransformerLens forward hooks that make the change on forwards of ``model`` over the
left-padded ``batch`` (positions resolve per row through its attention mask). A
:class:`~tvlens.vector.TaskVector`, an adaptive generator, a
:class:`~tvlens.interventions.heads.HeadPatch` (zero / mean ablation, FV's patching)
and a :class:`~tvlens.interventions.residual.ResidualEdit` all follow it, and they
compose: ``a + b`` (or ``Compose([a, b, ...])``) runs ``a``'s hooks, then ``b``'s.

Two optional attributes let a composition refuse what cannot go together:

- ``made_for``: the :class:`~tvlens.models.ModelFingerprint` the intervention was built
  for (``None``: any model). Parts made for different models cannot be composed.
- ``replaced_sites()``: the ``(hook name, position)`` sites it *overwrites*. Two parts
  overwriting the same site would silently let the second win, so that is refused.

A third tells the runner when a KV cache of the prompt prefix may serve it:
``last_token_only`` (:func:`last_token_only`), true when it changes nothing before each
row's last token.

Hooks are registered with :func:`hooks_applied` (or by :func:`tvlens.runner.run`), which
removes every one of them on exit, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

from tvlens.errors import TvlensError

Hook = tuple[str, Callable]


@runtime_checkable
class HasHooks(Protocol):
    def hooks(self, model, batch) -> list[Hook]: ...


class Intervention:
    """Base class of tvlens's interventions (duck typing on ``hooks`` is enough)."""

    made_for: Any = None

    def hooks(self, model, batch) -> list[Hook]:  # pragma: no cover - abstract
        raise NotImplementedError

    def replaced_sites(self) -> set[tuple[str, Any]]:
        return set()

    def describe(self) -> str:
        return type(self).__name__

    def __add__(self, other):
        if isinstance(other, HasHooks):
            return Compose([self, other])
        return NotImplemented

    def __radd__(self, other):
        if other == 0 or other is None:  # sum([...]) starts from 0
            return self
        if isinstance(other, HasHooks):
            return Compose([other, self])
        return NotImplemented


def describe(part) -> str:
    fn = getattr(part, "describe", None)
    return fn() if callable(fn) else repr(part) if hasattr(part, "method") else type(part).__name__


def _made_for(part):
    fp = getattr(part, "made_for", None)
    if fp is None:  # TaskVector keeps it as `model`, generators as `target`
        fp = getattr(part, "model", None) if hasattr(part, "vectors") else None
    return fp


class Compose(Intervention):
    """Several interventions in one forward, applied in order; see the module docstring.

    Raises :class:`TvlensError` naming both parts when two were made for different
    models or overwrite the same (hook, position) site.
    """

    def __init__(self, parts: Iterable):
        flat: list = []
        for p in parts:
            if p is None:
                continue
            if not isinstance(p, HasHooks):
                raise TvlensError(f"cannot compose {type(p).__name__}: an intervention needs a "
                                  "hooks(model, batch) method")
            flat.extend(p.parts if isinstance(p, Compose) else [p])
        self.parts = flat
        self._check()

    def _check(self) -> None:
        seen_model: tuple[Any, Any] | None = None
        seen_sites: dict = {}
        for p in self.parts:
            fp = _made_for(p)
            if fp is not None:
                if seen_model is not None and fp != seen_model[0]:
                    a = seen_model[0].describe() if hasattr(seen_model[0], "describe") else seen_model[0]
                    b = fp.describe() if hasattr(fp, "describe") else fp
                    raise TvlensError(
                        f"cannot compose {describe(seen_model[1])} (made for {a}) with "
                        f"{describe(p)} (made for {b}); build both for the same model")
                seen_model = (fp, p)
            sites = p.replaced_sites() if hasattr(p, "replaced_sites") else set()
            for site in sites:
                if site in seen_sites:
                    raise TvlensError(
                        f"{describe(seen_sites[site])} and {describe(p)} both replace {site[0]} at "
                        f"position {site[1]!r}; only one can set it (add one of them instead)")
                seen_sites[site] = p

    @property
    def made_for(self):
        for p in self.parts:
            if _made_for(p) is not None:
                return _made_for(p)
        return None

    @property
    def last_token_only(self) -> bool:
        return all(last_token_only(p) for p in self.parts)

    def replaced_sites(self) -> set:
        out: set = set()
        for p in self.parts:
            out |= p.replaced_sites() if hasattr(p, "replaced_sites") else set()
        return out

    def hooks(self, model, batch) -> list[Hook]:
        return [h for p in self.parts for h in p.hooks(model, batch)]

    def for_rows(self, rows) -> Compose:
        out = Compose([])
        out.parts = [p.for_rows(rows) if callable(getattr(p, "for_rows", None)) else p
                     for p in self.parts]
        return out

    def describe(self) -> str:
        return " + ".join(describe(p) for p in self.parts)

    def __repr__(self) -> str:
        return f"Compose([{', '.join(describe(p) for p in self.parts)}])"


class BoundHooks(Intervention):
    """Hooks already bound to one batch (for code that builds ``fwd_hooks`` itself)."""

    def __init__(self, hooks: Sequence[Hook]):
        self._hooks = list(hooks)

    def hooks(self, model, batch) -> list[Hook]:
        return list(self._hooks)


def as_intervention(value) -> HasHooks | None:
    """``None`` / ``()`` → None; a list → :class:`Compose`; an intervention → itself."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return BoundHooks(value)  # raw (hook name, fn) pairs
        return Compose(value) if value else None
    if not isinstance(value, HasHooks):
        raise TvlensError(f"{type(value).__name__} is not an intervention: it needs a "
                          "hooks(model, batch) method (a TaskVector, HeadPatch, generator, ...)")
    return value


def last_token_only(intervention) -> bool:
    """Whether ``intervention`` changes a forward only at each row's last token, so that a KV
    cache of the prompt prefix stays valid under it (causal attention): its
    ``last_token_only`` attribute (False when it has none: assume it may touch any
    position); a composition when every part does; None (no intervention) does."""
    iv = as_intervention(intervention)
    return True if iv is None else bool(getattr(iv, "last_token_only", False))


def intervention_hooks(model, intervention, batch) -> list[Hook]:
    """The hooks of ``intervention`` (None → none) for ``batch``."""
    iv = as_intervention(intervention)
    return [] if iv is None else list(iv.hooks(model, batch))


@contextmanager
def hooks_applied(model, hooks: Sequence[Hook]):
    """Register ``hooks`` on ``model`` for the body; every one is removed on exit."""
    with model.hooks(fwd_hooks=list(hooks)):
        yield model
