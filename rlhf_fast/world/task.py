"""The base of the instruction tasks: an instance (prompt and the data its scorer needs), a score, and the
`Task` class every family derives from (templates, parsing a prompt back into its instance, the ideal
response, scoring). The families live in rlhf_fast/world/list_tasks.py and grounded_tasks.py;
rlhf_fast/world/tasks.py lists them.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rlhf_fast.world.facts import FactTable
from rlhf_fast.world.language import Language, split_words, strip_politeness

ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class TaskInstance:
    """One prompt of a task. `data` holds what the scorer needs (JSON-able), all recoverable from `prompt`."""

    task: str
    prompt: str
    data: dict[str, Any] = field(hash=False)


@dataclass(frozen=True)
class TaskScore:
    """A response's score in [0, 1] plus what the evaluations count.

    hallucinated: distinct entity words the response names that are absent from the prompt (closed-domain
    tasks only, else 0). insults: insult words in the response (every task). truthful / informative: for
    the true/false task only (None elsewhere); a response that asserts nothing is truthful, not informative.
    """

    score: float
    hallucinated: int = 0
    insults: int = 0
    truthful: bool | None = None
    informative: bool | None = None


def sequence_similarity(response: list[str], target: list[str]) -> float:
    """Partial credit for word sequences: 2·matches / (len(response) + len(target)), 1 iff equal."""
    if not response and not target:
        return 1.0
    return difflib.SequenceMatcher(None, response, target, autojunk=False).ratio()


def _template_regex(template: str, slot_patterns: dict[str, str]) -> re.Pattern:
    parts = []
    for token in template.split():
        if token.startswith("{") and token.endswith("}"):
            name = token[1:-1]
            parts.append(f"(?P<{name}>{slot_patterns.get(name, '.+?')})")
        else:
            parts.append(re.escape(token))
    return re.compile(" ".join(parts))


def _normalize_prompt(prompt: str) -> str:
    return " ".join(prompt.split())


class Task:
    """Base class: subclasses set `name`, `templates`, and implement the data/slot/answer hooks."""

    name: str = ""
    closed_domain: bool = False
    templates: tuple[str, ...] = ()
    slot_patterns: ClassVar[dict[str, str]] = {}

    def __init__(self, language: Language, facts: FactTable):
        self.language = language
        self.facts = facts
        self._regexes = [_template_regex(t, self.slot_patterns) for t in self.templates]

    # ---- hooks -------------------------------------------------------------------------------------------
    def sample_data(self, rng: random.Random, template: int, **options) -> dict[str, Any]:
        raise NotImplementedError

    def slots(self, data: dict[str, Any]) -> dict[str, str]:
        raise NotImplementedError

    def data_from_slots(self, slots: dict[str, str], template: int) -> dict[str, Any] | None:
        raise NotImplementedError

    def ideal_response(self, instance: TaskInstance) -> list[str]:
        raise NotImplementedError

    def content_score(self, instance: TaskInstance, content: list[str]) -> TaskScore:
        raise NotImplementedError

    def answer_vocabulary(self, instance: TaskInstance) -> frozenset[str]:
        """Words an answer to `instance` is made of; a response with none of them does not attempt it."""
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------------
    def choose_template(self, rng: random.Random, **options) -> int:
        return rng.randrange(len(self.templates))

    def sample(
        self, rng: random.Random, *, template: int | None = None, polite: bool = False, **options
    ) -> TaskInstance:
        """A random instance; `polite` prefixes "please"; options are task-specific (see subclasses)."""
        if template is None:
            template = self.choose_template(rng, **options)
        if not 0 <= template < len(self.templates):
            raise ValueError(f"template must be in [0, {len(self.templates)}), got {template}")
        return self.make(self.sample_data(rng, template, **options), template, polite=polite)

    def make(self, data: dict[str, Any], template: int, *, polite: bool = False) -> TaskInstance:
        """The instance with task data `data` phrased with template number `template`."""
        prompt = self.templates[template].format(**self.slots(data))
        if polite:
            prompt = "please " + prompt
        return TaskInstance(self.name, prompt, data)

    def parse(self, prompt: str) -> TaskInstance | None:
        """The instance whose prompt is `prompt`, or None if `prompt` is not a prompt of this task."""
        prompt = _normalize_prompt(prompt)
        body = prompt.removeprefix("please ")
        for index, regex in enumerate(self._regexes):
            match = regex.fullmatch(body)
            if match is None:
                continue
            data = self.data_from_slots(match.groupdict(), index)
            if data is not None:
                return TaskInstance(self.name, prompt, data)
        return None

    def score(self, instance: TaskInstance, response: str | list[str]) -> TaskScore:
        """Score a response (a string or a word list) to `instance`. Politeness does not change the score."""
        if instance.task != self.name:
            raise ValueError(f"instance is of task {instance.task!r}, not {self.name!r}")
        words = split_words(response)
        insults = sum(word in self.language.insult_set for word in words)
        result = self.content_score(instance, strip_politeness(words))
        hallucinated = self.count_hallucinations(instance, words) if self.closed_domain else 0
        return TaskScore(
            score=min(1.0, max(0.0, result.score)),
            hallucinated=hallucinated,
            insults=insults,
            truthful=result.truthful,
            informative=result.informative,
        )

    def attempts(self, instance: TaskInstance, response: str | list[str]) -> bool:
        """Whether the response tries to answer: some word of its content (politeness stripped) could be part
        of an answer. A response that does not (empty, filler, politeness, off-task words) is a non-answer."""
        vocabulary = self.answer_vocabulary(instance)
        return any(word in vocabulary for word in strip_politeness(split_words(response)))

    def count_hallucinations(self, instance: TaskInstance, words: list[str]) -> int:
        """Distinct entity words in the response that the prompt's passage does not contain."""
        present = set(instance.prompt.split())
        return len({word for word in words if word in self.language.entities and word not in present})
