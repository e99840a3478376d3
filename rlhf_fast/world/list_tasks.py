"""Task families that transform the prompt's list of words: repeat, reverse, sort, count."""

from __future__ import annotations

from rlhf_fast.world.task import Task, TaskScore, sequence_similarity


class _ListTask(Task):
    min_items, max_items = 2, 5

    def pool(self) -> tuple[str, ...]:
        return self.language.animals + self.language.objects + self.language.colors

    def target(self, items: list[str]) -> list[str]:
        raise NotImplementedError

    def sample_data(self, rng, template, **options):
        count = rng.randint(self.min_items, self.max_items)
        return {"items": rng.sample(self.pool(), count)}

    def slots(self, data):
        return {"items": " ".join(data["items"])}

    def data_from_slots(self, slots, template):
        items = slots["items"].split()
        pool = set(self.pool())
        if not items or any(item not in pool for item in items):
            return None
        return {"items": items}

    def ideal_response(self, instance):
        return self.target(instance.data["items"])

    def answer_vocabulary(self, instance):
        return frozenset(self.pool())

    def content_score(self, instance, content):
        return TaskScore(sequence_similarity(content, self.ideal_response(instance)))


class RepeatTask(_ListTask):
    name = "repeat"
    templates = ("repeat the words : {items} .", "say again : {items} .", "copy this : {items} .")

    def target(self, items):
        return list(items)


class ReverseTask(_ListTask):
    name = "reverse"
    templates = (
        "reverse the words : {items} .",
        "say backwards : {items} .",
        "write in reverse order : {items} .",
    )

    def target(self, items):
        return list(reversed(items))


class SortTask(_ListTask):
    name = "sort"
    templates = (
        "sort the numbers : {items} .",
        "put in order : {items} .",
        "sort from small to big : {items} .",
    )

    def pool(self):
        return self.language.numbers

    def target(self, items):
        return sorted(items, key=int)


class CountTask(_ListTask):
    """How many words are in a list. Exact answer 1, off by one 0.5; extra words halve the score."""

    name = "count"
    templates = ("count the words : {items} .", "how many words : {items} ?", "count : {items} .")
    min_items, max_items = 1, 6

    def sample_data(self, rng, template, **options):
        count = rng.randint(self.min_items, self.max_items)
        return {"items": [rng.choice(self.pool()) for _ in range(count)]}

    def data_from_slots(self, slots, template):
        data = super().data_from_slots(slots, template)
        if data is None or len(data["items"]) >= len(self.language.numbers):
            return None
        return data

    def target(self, items):
        return [str(len(items))]

    def answer_vocabulary(self, instance):
        return frozenset(self.language.numbers)

    def content_score(self, instance, content):
        numbers = [word for word in content if word in self.language.numbers]
        if not numbers:
            return TaskScore(0.0)
        error = abs(int(numbers[0]) - len(instance.data["items"]))
        score = {0: 1.0, 1: 0.5}.get(error, 0.0)
        return TaskScore(score * (0.5 if len(content) > 1 else 1.0))
