"""One small type behind every method: a config dataclass, registered by name.

A method's config holds every setting that changes its result (shots, prompt counts,
template, seed, ...), never the model or the task. It round-trips through JSON
(:meth:`MethodConfig.to_dict` / :meth:`MethodConfig.from_dict`), is stored in every
vector or generator the method makes (with :func:`tvlens.io.versions`), and gives the
CLI its flags (:func:`add_config_flags`), so an option is spelt the same in every verb.

    @register
    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        method: ClassVar[str] = "my-method"
        shots: int = field(default=5, metadata={"help": "demonstrations per prompt"})

    get_config("my-method")                 # -> MyConfig
    MyConfig.from_dict({"shots": 3})        # unknown keys -> TvlensError naming them
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from tvlens.errors import TvlensError

REGISTRY: dict[str, type[MethodConfig]] = {}
# modules whose import registers configs (imported on first lookup; emergence's TVPConfig
# cannot be imported from here at import time without a cycle)
PROVIDERS = ("tvlens.methods.configs", "tvlens.emergence.config")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config; subclasses set the class variable ``method``."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Build from a dict; refuse keys this version of tvlens does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"method"})
        if unknown:
            raise TvlensError(
                f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}: the config was "
                "written by another (newer?) tvlens; upgrade tvlens or remove those keys"
            )
        if data.get("method", cls.method) != cls.method:
            raise TvlensError(f"this config is for method {data['method']!r}, not {cls.method!r}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for k, v in data.items():
            if k == "method":
                continue
            if isinstance(v, list) and "tuple" in str(hints.get(k, "")):
                v = tuple(v)
            kwargs[k] = v
        return cls(**kwargs)

    def replace(self, **changes) -> MethodConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def merged(cls, config: MethodConfig | None = None, **given) -> MethodConfig:
        """``config`` (default ``cls()``) with every keyword that differs from the class
        default applied on top: how a method function reads ``config=`` next to keywords."""
        defaults = cls()
        changes = {k: v for k, v in given.items() if v != getattr(defaults, k)}
        return (config or defaults).replace(**changes)


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``cls`` findable as ``get_config(cls.method)``."""
    if not cls.method:
        raise TypeError(f"{cls.__name__} must set the class variable `method`")
    REGISTRY[cls.method] = cls
    return cls


def methods() -> list[str]:
    """Every registered method name (the one vocabulary of ``--method`` values)."""
    import importlib

    for module in PROVIDERS:
        importlib.import_module(module)
    return sorted(REGISTRY)


def get_config(method: str) -> type[MethodConfig]:
    """The config class of ``method`` (the one vocabulary of ``--method`` values)."""
    if method not in REGISTRY:
        methods()
    if method not in REGISTRY:
        raise TvlensError(f"unknown method {method!r}; use one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[method]


def config_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", f.name.replace("_", " "))


def add_config_flags(parser, cls: type[MethodConfig], *, skip: tuple[str, ...] = (),
                     defaults_from: MethodConfig | None = None) -> None:
    """One ``--flag`` per field of ``cls`` (``n_prompts`` → ``--n-prompts``), default None.

    A flag left out keeps the config's default (so the CLI never restates a default);
    booleans become ``--flag`` / ``--no-flag``; tuples are comma-separated.
    """
    import argparse

    hints = typing.get_type_hints(cls)
    base = defaults_from or cls()
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = getattr(base, f.name)
        text = f"{config_help(f)} (default: {default!r})"
        choices = f.metadata.get("choices")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=text)
        elif "tuple" in str(kind) or f.metadata.get("comma"):
            parser.add_argument(flag, dest=f.name, default=None, help=text + ", comma-separated")
        else:
            scalar = _scalar_type(kind)
            if type(None) in typing.get_args(kind) and choices is None:
                scalar, text = _or_none(scalar), text + "; 'none' for None"
            parser.add_argument(flag, dest=f.name, default=None, type=scalar, choices=choices,
                                help=text)


class _NoneFlag:
    """What ``--flag none`` parses to: the field set to None (a flag left out is None)."""

    def __repr__(self) -> str:
        return "none"


NONE_FLAG = _NoneFlag()


def _or_none(scalar):
    def parse(text: str):
        return NONE_FLAG if text.strip().lower() == "none" else scalar(text)
    parse.__name__ = scalar.__name__  # argparse names the type in its error message
    return parse


def _scalar_type(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if kind in (int, float, str):
        return kind
    for t in (float, int, str):
        if t in args:
            return t
    return str


def config_from_args(cls: type[MethodConfig], args, base: MethodConfig | None = None) -> MethodConfig:
    """``base`` (default: ``cls()``) with every flag the user gave applied on top."""
    hints = typing.get_type_hints(cls)
    cfg = base or cls()
    changes = {}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if value is NONE_FLAG:
            value = None
        elif isinstance(value, str) and ("tuple" in str(hints[f.name]) or f.metadata.get("comma")):
            inner = typing.get_args(hints[f.name])
            conv = inner[0] if inner and inner[0] in (int, float) else str
            try:
                value = tuple(conv(v) for v in value.split(",") if v.strip())
            except ValueError:
                raise TvlensError(f"--{f.name.replace('_', '-')} {value!r} must be a comma-separated "
                                  f"list of {conv.__name__}s") from None
        changes[f.name] = value
    return dataclasses.replace(cfg, **changes)
