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
    # Kang et al.'s released code (ATV), the target's side: ATV_training.py:996 appends
    # "\nA:" to each natural-language template of the task; a task with none in the prompt
    # file gets the fallback of utils/data_utils.py:90-137 + :273, "Q: {x}\nA:" with the
    # answer " {y}" — these bytes (the same as "fv"). Per task: atv_templates(task).
    "atv": Template("Q: {x}\nA: {y}\n\n"),
}

# ----- ATV (Kang et al. 2025): the generator's query and the target's per-task templates --
# The generator reads "Q: {x} \n A: " (ATV_training.py:1060, vector_template), x stripped
# (utils/data_utils.py:237), tokenized with the generator tokenizer's defaults (GPT-2's: no BOS).
ATV_QUERY_TEMPLATE = "Q: {x} \n A: "
# Natural-language templates per built-in task, written for tvlens in the two styles of ATV's
# dataset_files/natural_prompts_manual.json ("<instruction>\n\nQuestion: {input}",
# "{input}\nQuestion: <question>") — that file has none for these tasks. Each gets "\nA:"
# appended (atv_template); a task missing here gets TEMPLATES["atv"], as in the released code.
_ATV_TASK_TEXT: dict[str, tuple[str, str]] = {  # task: (instruction, question)
    "capitalize": ("Write the word with its first letter capitalised.",
                   "How is this word written with a capital first letter?"),
    "uppercase": ("Write the word in capital letters.", "How is this word written in capital letters?"),
    "first_letter": ("Give the first letter of the word.", "What is the first letter of this word?"),
    "next_letter": ("Give the letter that comes next in the alphabet.",
                    "Which letter comes after this one in the alphabet?"),
    "first_item": ("Give the first word of the list.", "What is the first word of this list?"),
    "last_item": ("Give the last word of the list.", "What is the last word of this list?"),
    "antonym": ("Give the antonym of the word.", "What is the opposite of this word?"),
    "category_of": ("Name the category the item belongs to.", "What kind of thing is this?"),
    "country_capital": ("Name the capital city of the country.", "What is the capital of this country?"),
    "country_language": ("Name the language spoken in the country.",
                         "What language is spoken in this country?"),
    "english_french": ("Translate the English word into French.", "What is this word in French?"),
    "english_spanish": ("Translate the English word into Spanish.", "What is this word in Spanish?"),
    "present_past": ("Give the past tense of the verb.", "What is the past tense of this verb?"),
    "singular_plural": ("Give the plural of the noun.", "What is the plural of this word?"),
    # the ATV classification suite (tvlens.tasks.builtin.ATV_TRAIN_SUITE / ATV_UNSEEN_SUITE)
    "sentiment": ("Classify the sentiment of the review as positive or negative.",
                  "Is the sentiment of this review positive or negative?"),
    "language_id": ("Name the language the word is written in.", "What language is this word in?"),
    "number_sign": ("Say whether the number is positive or negative.",
                    "Is this number positive or negative?"),
    "city_language": ("Name the language spoken in the city.", "What language is spoken in this city?"),
    "french_category": ("Name the category the French word belongs to.",
                        "What kind of thing does this French word name?"),
}
ATV_NATURAL: dict[str, tuple[str, ...]] = {
    name: (f"{instr}\n\nQuestion: {{x}}", f"{{x}}\nQuestion: {question}", f"{instr}\n\nQ: {{x}}")
    for name, (instr, question) in _ATV_TASK_TEXT.items()
}


ATV_ANSWER_CUES = ("Answer:", "The answer is", "A:")  # ATV_evaluate.py:269


def atv_template(natural: str, cue: str = "A:") -> Template:
    """One ATV target template: the natural-language ``natural`` (``{x}`` — or ATV's own
    ``{input}`` — once) with ``"\\n" + cue`` appended (training: ``"A:"``), the answer
    ``" {y}"``; a demonstration ends with ``"\\n\\n"`` (utils/data_utils.py:250-257)."""
    text = natural.replace("{input}", "{x}")
    if "{y}" in text or text.count("{x}") != 1:
        raise TvlensError(f"ATV template {natural!r} must contain {{x}} (or {{input}}) once and no "
                          "{y}: the answer follows the appended '\\nA:'")
    if cue not in ATV_ANSWER_CUES:
        raise TvlensError(f"unknown ATV answer cue {cue!r}; use one of {', '.join(map(repr, ATV_ANSWER_CUES))}")
    return Template(text + "\n" + cue + " {y}\n\n")


def atv_templates(task: str, natural: Sequence[str] | None = None) -> list[Template]:
    """The target templates ATV trains task ``task`` with (its loss averaged over them):
    ``natural`` (strings for :func:`atv_template`) if given, else ``ATV_NATURAL[task]``,
    else ``[TEMPLATES["atv"]]`` (the released code's fallback for a task without templates)."""
    texts = natural if natural is not None else ATV_NATURAL.get(task)
    if texts is not None and len(texts) == 0:
        raise TvlensError(f"no ATV templates given for task {task!r}; give at least one or None")
    return [atv_template(t) for t in texts] if texts is not None else [TEMPLATES["atv"]]


def atv_eval_templates(task: str, natural: Sequence[str] | None = None) -> list[Template]:
    """The released ATV evaluation's templates for ``task``: each natural template (as
    :func:`atv_templates` finds them) under each of the 3 answer cues
    (:data:`ATV_ANSWER_CUES`), cue by cue — ``[t + "\\n" + cue for cue in cues for t in
    naturals]`` (``ATV_evaluate.py:1020``); a task without natural templates keeps
    ``[TEMPLATES["atv"]]``."""
    texts = natural if natural is not None else ATV_NATURAL.get(task)
    if texts is None:
        return atv_templates(task, natural)
    atv_templates(task, texts)  # the same checks
    return [atv_template(t, cue) for cue in ATV_ANSWER_CUES for t in texts]


def get_template(template: str | Template) -> Template:
    """A :class:`Template`, a registered name (``TEMPLATES``: ``"hendel"``, ``"fv"``, ``"qa"``,
    ``"arrow"``, ``"atv"``) or a demo string."""
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
