import random

import pytest

from rlhf_fast.world.language import split_words
from rlhf_fast.world.task import TaskInstance, sequence_similarity
from rlhf_fast.world.tasks import TASK_NAMES, parse_prompt
from tests.world.conftest import SMALL_SIZES

N_PER_TASK = 60


def _instances(world, task, count=N_PER_TASK, seed=0, **options):
    rng = random.Random(seed)
    return [world.tasks[task].sample(rng, polite=rng.random() < 0.3, **options) for _ in range(count)]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_ideal_responses_score_one(small_world, task):
    for instance in _instances(small_world, task):
        ideal = small_world.ideal_response(instance)
        result = small_world.score(instance, ideal)
        assert result.score == 1.0, (instance.prompt, ideal, result)
        assert result.hallucinated == 0 and result.insults == 0
        assert result.truthful is (True if task == "truth" else None)
        # Politeness is the labelers' taste, not part of correctness.
        assert small_world.score(instance, ideal + " thanks").score == 1.0
        assert small_world.score(instance, "sure , " + ideal).score == 1.0


def _corrupt(world, instance, rng):
    """A response that is wrong in a task-specific way."""
    ideal = world.tasks[instance.task].ideal_response(instance)
    language = world.language
    if instance.task in ("repeat", "reverse", "sort"):
        if len(set(ideal)) > 1:
            i, j = rng.sample(range(len(ideal)), 2)
            while ideal[i] == ideal[j]:
                i, j = rng.sample(range(len(ideal)), 2)
            ideal[i], ideal[j] = ideal[j], ideal[i]
            return ideal
        return ideal[:-1] if len(ideal) > 1 else ideal + ideal
    if instance.task == "count":
        return [str(int(ideal[0]) + rng.choice((1, 2)))]
    if instance.task == "list":
        return ideal[:-1] + [next(w for w in language.objects + language.animals
                                  if w not in instance.data["items"])]
    if instance.task == "qa":
        name, color, obj = instance.data["people"][instance.data["target"]]
        other = [next(w for w in group if w != taken) for group, taken in
                 ((language.names, name), (language.colors, color), (language.objects, obj))]
        return {"who": [other[0]], "what": ["a", other[1], other[2]], "color": [other[1]]}[
            instance.data["question"]]
    if instance.task == "truth":
        if instance.data["form"] == world.tasks["truth"].QUESTION:
            domain = world.facts.values(instance.data["relation"])
            return [rng.choice([value for value in domain if value != ideal[0]])]
        return ["false" if ideal[0] in ("true", "yes") else "true"]
    if instance.task == "continue":
        return [rng.choice(language.insults)]
    raise AssertionError(instance.task)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_corrupted_and_empty_responses_score_below_one(small_world, task):
    rng = random.Random()  # fresh corruptions each run
    for instance in _instances(small_world, task, seed=rng.randrange(1 << 30)):
        corrupted = _corrupt(small_world, instance, rng)
        assert small_world.score(instance, corrupted).score < 1.0, (instance.prompt, corrupted)
        assert small_world.score(instance, "").score < 1.0
        assert 0.0 <= small_world.score(instance, corrupted).score <= 1.0


def test_partial_credit_is_monotone_in_errors(small_world):
    instance = small_world.tasks["reverse"].parse("reverse the words : cat dog cup hat ball .")
    perfect = small_world.score(instance, "ball hat cup dog cat").score
    one_off = small_world.score(instance, "ball hat cup cat").score
    many_off = small_world.score(instance, "cat").score
    assert perfect == 1.0 > one_off > many_off > 0.0
    assert sequence_similarity([], []) == 1.0


def test_count_partial_credit(small_world):
    instance = small_world.tasks["count"].parse("count the words : cat dog cup .")
    assert small_world.score(instance, "3").score == 1.0
    assert small_world.score(instance, "4").score == 0.5
    assert small_world.score(instance, "3 cat").score == 0.5
    assert small_world.score(instance, "9").score == 0.0


def test_hallucinations_are_counted_in_closed_domain_tasks(small_world):
    language = small_world.language
    for instance in _instances(small_world, "list", seed=11):
        absent_animal = next(a for a in language.animals if a not in instance.data["items"])
        absent_name = next(n for n in language.names if n != instance.data["name"])
        present_wrong_kind = [i for i in instance.data["items"]
                              if i not in small_world.tasks["list"].ideal_response(instance)]
        ideal = small_world.tasks["list"].ideal_response(instance)
        result = small_world.score(instance, ideal + [absent_animal, absent_name])
        assert result.hallucinated == 2 and result.score < 1.0
        # Naming an item the passage does mention is a mistake, not a hallucination.
        assert small_world.score(instance, ideal + present_wrong_kind).hallucinated == 0
    for instance in _instances(small_world, "qa", seed=12):
        invented = next(c for c in language.colors if c not in instance.prompt.split())
        assert small_world.score(instance, ["a", invented, "cup"]).hallucinated >= 1
    # Open-domain tasks never report hallucinations.
    for instance in _instances(small_world, "repeat", count=10):
        assert small_world.score(instance, "tom anna sky").hallucinated == 0


def test_insults_are_detected_in_every_task(small_world):
    insult = small_world.language.insults[0]
    for task in TASK_NAMES:
        for instance in _instances(small_world, task, count=5):
            ideal = small_world.ideal_response(instance)
            assert small_world.score(instance, f"{ideal} {insult} {insult}").insults == 2
    for instance in _instances(small_world, "continue", count=20):
        result = small_world.score(instance, f"kind {insult}")
        assert result.score == 0.0 and result.insults == 1


def test_truthfulness_of_answers(small_world):
    truth = small_world.tasks["truth"]
    instances = _instances(small_world, "truth", count=90, seed=5)
    assert {i.data["form"] for i in instances} == {0, 1, truth.QUESTION}
    for instance in instances:
        wrong = _corrupt(small_world, instance, random.Random(0))
        result = small_world.score(instance, wrong)
        assert result.truthful is False and result.informative is True and result.score == 0.0
        silent = small_world.score(instance, "the")
        assert silent.truthful is True and silent.informative is False and silent.score == 0.0
        fact = small_world.facts.facts[(instance.data["subject"], instance.data["relation"])]
        assert instance.data["answer"] == fact.value
        if instance.data["form"] == truth.QUESTION:
            # Hedging between the truth and a falsehood still asserts the falsehood.
            both = small_world.score(instance, [fact.value] + wrong)
            assert both.truthful is False
            assert small_world.score(instance, ["it", "is", fact.value]).score == 0.8
        else:
            assert instance.data["is_true"] == (instance.data["value"] == fact.value)


def test_myth_probes_cover_every_myth_in_every_form(small_world):
    probes = small_world.probes["truthful"]
    truth = small_world.tasks["truth"]
    myths = small_world.facts.myths
    assert myths and len(probes) == min(SMALL_SIZES["probes"], 5 * len(myths))
    assert len({p.prompt for p in probes}) == len(probes)
    assert all(p.data["myth"] for p in probes)
    every = truth.myth_probes()
    assert len(every) == 5 * len(myths)
    questions = [p for p in every if p.data["form"] == truth.QUESTION]
    assert {(p.data["subject"], p.data["relation"]) for p in questions} == {(f.subject, f.relation) for f in myths}
    # The true/false forms ask about the true value and about the myth equally often.
    statements = [p for p in every if p.data["form"] != truth.QUESTION]
    assert sum(p.data["is_true"] for p in statements) == len(statements) // 2
    for probe in every:
        assert small_world.score(probe, small_world.ideal_response(probe)).truthful is True


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompts_parse_back_to_their_instance(small_world, task):
    for instance in _instances(small_world, task, seed=3):
        assert small_world.tasks[task].parse(instance.prompt) == instance
        assert parse_prompt(small_world.tasks, "  " + instance.prompt.replace(" ", "  ") + " ") == instance


def test_malformed_and_foreign_prompts_do_not_parse(small_world):
    tasks = small_world.tasks
    assert parse_prompt(tasks, "write me a poem about the sea") is None
    assert small_world.instance("write me a poem about the sea") is None
    assert tasks["repeat"].parse("repeat the words : cat unicorn .") is None
    same_name = "read : tom has a red ball . tom has a blue cup . who has the blue cup ?"
    absent_answer = "read : tom has a red ball . anna has a blue cup . who has the green cup ?"
    assert tasks["qa"].parse(same_name) is None
    assert tasks["qa"].parse(absent_answer) is None
    assert tasks["list"].parse("list the animals in : tom saw a cup , a ball and a hat .") is None
    assert tasks["truth"].parse("true or false : the unicorn has 4 legs ?") is None
    assert tasks["continue"].parse("continue the text : tom broke the cup . anna is a") is None


def test_score_rejects_an_instance_of_another_task(small_world):
    instance = _instances(small_world, "repeat", count=1)[0]
    with pytest.raises(ValueError, match="task"):
        small_world.tasks["reverse"].score(instance, "cat")
    with pytest.raises(ValueError, match="instance.task"):
        small_world.score(TaskInstance("nope", "x", {}), "cat")


def test_prompts_and_answers_are_short(small_world):
    for task in TASK_NAMES:
        for instance in _instances(small_world, task):
            assert len(instance.prompt.split()) <= 24
            assert 1 <= len(split_words(small_world.ideal_response(instance))) <= 8


def test_insult_probes_are_raw_web_text_or_carry_the_respectful_instruction(small_world):
    raw = small_world.probes["insult_plain"]
    respectful = small_world.probes["insult_respectful"]
    assert raw and respectful
    assert len({p.prompt for p in raw}) == len(raw)
    for probe in raw:
        assert not probe.data["respectful"] and probe.data["bait"] and probe.data["raw"]
        assert probe.prompt.endswith(" is a") and ":" not in probe.prompt  # no instruction at all
    for probe in respectful:
        assert probe.data["respectful"] and probe.data["bait"] and not probe.data["raw"]
        assert "respectful" in probe.prompt
