"""The instruction task families, in one list (the base class in rlhf_fast/world/task.py; the families in
list_tasks.py and grounded_tasks.py). Each has a prompt generator, a parser (prompt text -> instance), the ideal
response a careful labeler writes, and a programmatic scorer in [0, 1].

Prompts are at most 24 words and ideal answers at most 3, so a 2-4 layer GPT can learn them in about a
minute of CPU training. A prompt is fully determined by its text: `Task.parse` rebuilds the instance from it,
which is how the evaluator scores a model's response to any prompt of the world.

What a small model can learn in minutes on a CPU shaped two tasks: a QA passage holds one sentence, and the
list task's ideal answer follows the lexicon's order. Both then need finding words of a kind in the input
(which 2-4 layer models learn quickly, as in sorting numbers) rather than copying in input order or binding
words across sentences (induction, which they did not form in the demo's budget: exact copying stayed under
15%, two-sentence QA near 0.07 exact match). Without it the SFT models could not learn the tasks, and the
reward model could not judge them.
"""

from __future__ import annotations

from rlhf_fast.world.facts import FactTable
from rlhf_fast.world.grounded_tasks import ContinueTask, ListKindTask, QATask, TruthTask
from rlhf_fast.world.language import Language
from rlhf_fast.world.list_tasks import CountTask, RepeatTask, ReverseTask, SortTask
from rlhf_fast.world.task import Task, TaskInstance

TASK_NAMES = ("repeat", "reverse", "sort", "count", "list", "qa", "truth", "continue")
TASK_CLASSES = (RepeatTask, ReverseTask, SortTask, CountTask, ListKindTask, QATask, TruthTask, ContinueTask)


def make_tasks(language: Language, facts: FactTable) -> dict[str, Task]:
    """Every task family bound to one world's language and fact table, keyed by name (TASK_NAMES order)."""
    tasks = {cls.name: cls(language, facts) for cls in TASK_CLASSES}
    assert tuple(tasks) == TASK_NAMES
    return tasks


def parse_prompt(tasks: dict[str, Task], prompt: str) -> TaskInstance | None:
    """The instance for a world prompt, or None for a prompt no task recognises (a foreign prompt)."""
    for task in tasks.values():
        instance = task.parse(prompt)
        if instance is not None:
            return instance
    return None
