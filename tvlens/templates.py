"""Prompt formats: a :class:`Template` writes one demonstration; ``TEMPLATES`` names each
paper's format, byte for byte (see :mod:`tvlens.prompts` for how prompts are cut and
tokenized)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tvlens.errors import TvlensError
from tvlens.tasks.task import Pair


@dataclass(frozen=True)
class Template:
    """How one demonstration is written; the query is the demonstration cut before ``{y}``.

    Args:
        demo: must contain ``{x}`` then ``{y}`` once each.
        prefix: text before the first demonstration (an instruction, say).
    """

    demo: str = "{x} -> {y}\n"
    prefix: str = ""

    def __post_init__(self) -> None:
        ix, iy = self.demo.find("{x}"), self.demo.find("{y}")
        if ix < 0 or iy < 0 or self.demo.count("{x}") != 1 or self.demo.count("{y}") != 1:
            raise TvlensError(
                f"template {self.demo!r} must contain {{x}} and {{y}} exactly once each"
            )
        if iy < ix:
            raise TvlensError(f"template {self.demo!r} must put {{x}} before {{y}}")

    @property
    def _before_y(self) -> str:
        return self.demo[: self.demo.find("{y}")]

    @property
    def answer_prefix(self) -> str:
        """Trailing whitespace before ``{y}``: it belongs to the answer (``" Paris"``)."""
        before = self._before_y
        return before[len(before.rstrip(" ")) :]

    def format_demo(self, x: str, y: str) -> str:
        return self.demo.replace("{x}", x).replace("{y}", y)

    def format_query(self, x: str) -> str:
        return self._before_y.rstrip(" ").replace("{x}", x)

    def format_answer(self, y: str) -> str:
        return self.answer_prefix + y

    def prompt(self, demos: Sequence[Pair], x: str) -> str:
        return self.prefix + "".join(self.format_demo(a, b) for a, b in demos) + self.format_query(x)

    def text_before_separator(self, demos: Sequence[Pair], x: str) -> str:
        """The prompt up to the end of the query input ``x`` (for ``"separator"``)."""
        query = self._before_y.rstrip(" ")
        return self.prefix + "".join(self.format_demo(a, b) for a, b in demos) + query[
            : query.find("{x}")
        ] + x


TEMPLATES: dict[str, Template] = {
    # Hendel et al.'s released code (icl_task_vectors): core/data/datasets/few_shot_format.py
    # writes "example:{x}->{y}" joined by "\n" and ends with "example:{x}->";
    # core/data/tasks/mapping_task.py prefixes x and y of mapping tasks with a space.
    "hendel": Template("example: {x}-> {y}\n"),
    # Todd et al.'s released code (function_vectors): "Q: {x}\nA: {y}\n\n", query "Q: {x}\nA:".
    "fv": Template("Q: {x}\nA: {y}\n\n"),
    "qa": Template("Q: {x}\nA: {y}\n\n"),  # the same format as "fv", under its older name
    # A bare arrow: no paper's format (it is *not* Hendel's, which has the "example:" prefix).
    "arrow": Template("{x} -> {y}\n"),
}


def get_template(template: str | Template) -> Template:
    """A :class:`Template`, a registered name (``TEMPLATES``: ``"hendel"``, ``"fv"``, ``"qa"``,
    ``"arrow"``) or a demo string."""
    if isinstance(template, Template):
        return template
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{x}" in template:
        return Template(template)
    raise TvlensError(
        f"unknown template {template!r}: use one of {sorted(TEMPLATES)} or a string with {{x}} and {{y}}"
    )


def template_name(template: str | Template) -> str:
    """The registered name of ``template`` (``"hendel"``, ...), else its demo string."""
    t = get_template(template)
    if isinstance(template, str) and template in TEMPLATES:
        return template
    for name, known in TEMPLATES.items():
        if known == t and name != "qa":  # "qa" is "fv"'s older alias
            return name
    return t.demo
