import math
import random

import numpy as np
import pytest

from rlhf_fast.world import build_world, make_rankings, prefer, preference_probability, rank, utility
from rlhf_fast.world.labelers import write_demonstration
from rlhf_fast.world.language import strip_politeness


def _instance(world, task="reverse", seed=0):
    return world.tasks[task].sample(random.Random(seed))


def test_plackett_luce_top_choice_follows_softmax_of_utilities(small_world):
    labeler = small_world.labelers[0]
    instance = small_world.tasks["reverse"].parse("reverse the words : cat dog cup hat .")
    responses = ["hat cup dog cat", "hat cup cat", "hat dog cup cat", "cat"]
    utilities = np.array([utility(labeler, instance, r) for r in responses])
    assert len(set(utilities.round(9))) == len(responses)
    expected = np.exp(utilities / labeler.noise - (utilities / labeler.noise).max())
    expected /= expected.sum()
    rng = random.Random()  # fresh draws each run
    draws = 4000
    top = np.zeros(len(responses))
    for _ in range(draws):
        top[rank(labeler, instance, responses, rng).index(0)] += 1
    observed = top / draws
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert np.all(np.abs(observed - expected) <= tolerance), (observed, expected)


def test_rankings_prefer_higher_utility(small_world):
    rng = random.Random()
    tasks = ["repeat", "reverse", "sort", "list", "qa"]
    agreements = []
    for index in range(200):
        labeler = rng.choice(small_world.labelers)
        instance = _instance(small_world, tasks[index % len(tasks)], seed=rng.randrange(1 << 30))
        ideal = small_world.ideal_response(instance).split()
        pool = [ideal, ideal[:-1], list(reversed(ideal)) + ["cat"], [], ideal + ["tom"]]
        responses = [" ".join(r) for r in pool]
        ranks = rank(labeler, instance, responses, rng)
        utilities = [utility(labeler, instance, r) for r in responses]
        for i in range(len(responses)):
            for j in range(len(responses)):
                if utilities[i] > utilities[j] + 0.3 and responses[i] != responses[j]:
                    agreements.append(ranks[i] < ranks[j])
    assert np.mean(agreements) > 0.8


def test_ranks_are_dense_and_duplicates_tie(small_world):
    labeler, instance = small_world.labelers[1], _instance(small_world)
    ideal = small_world.ideal_response(instance)
    responses = [ideal, "cat", ideal, "  cat ", "dog dog"]
    ranks = rank(labeler, instance, responses, random.Random())
    assert ranks[0] == ranks[2] and ranks[1] == ranks[3]
    assert sorted(set(ranks)) == [0, 1, 2]
    with pytest.raises(ValueError, match="responses"):
        rank(labeler, instance, [])


def test_default_judgment_is_reproducible_and_order_free(small_world):
    labeler, instance = small_world.labelers[2], _instance(small_world, "qa")
    responses = ["anna", "a red cup", "tom", "blue", "cup"]
    first = rank(labeler, instance, responses)
    assert rank(labeler, instance, responses) == first
    permutation = [3, 0, 4, 1, 2]
    permuted = rank(labeler, instance, [responses[i] for i in permutation])
    assert permuted == [first[i] for i in permutation]
    a, b = "anna", "tom"
    assert prefer(labeler, instance, a, b) + prefer(labeler, instance, b, a) == 1.0
    assert prefer(labeler, instance, a, " anna ") == 0.5


def test_prefer_frequency_matches_the_preference_probability(small_world):
    labeler = small_world.labelers[3]
    instance = small_world.tasks["sort"].parse("sort the numbers : 5 3 9 1 .")
    a, b = "1 3 5 9", "1 5 3 9"
    probability = preference_probability(labeler, instance, a, b)
    assert 0.5 < probability < 1.0
    assert preference_probability(labeler, instance, b, a) == pytest.approx(1 - probability)
    rng = random.Random()
    draws = 3000
    observed = np.mean([prefer(labeler, instance, a, b, rng) for _ in range(draws)])
    assert abs(observed - probability) < 5 * math.sqrt(probability * (1 - probability) / draws) + 1e-3


def test_labelers_penalize_insults_and_hallucinations(small_world):
    insult = small_world.language.insults[0]
    for labeler in small_world.labelers:
        instance = _instance(small_world, "list", seed=3)
        ideal = small_world.ideal_response(instance)
        absent = next(a for a in small_world.language.animals if a not in instance.data["items"])
        assert utility(labeler, instance, ideal) > utility(labeler, instance, f"{ideal} {absent}")
        assert utility(labeler, instance, ideal) > utility(labeler, instance, f"{ideal} {insult}") + 0.9


def test_demonstrations_are_ideal_with_personal_flavor(small_world):
    rng = random.Random()
    labeler = max(small_world.labelers, key=lambda l: l.flavor_rate)
    flavored = 0
    draws = 1500
    for index in range(draws):
        instance = _instance(small_world, ["repeat", "qa", "truth"][index % 3], seed=index)
        demonstration = write_demonstration(labeler, instance, rng)
        assert strip_politeness(demonstration.split()) == small_world.ideal_response(instance).split()
        flavored += demonstration != small_world.ideal_response(instance)
    p = labeler.flavor_rate
    assert abs(flavored / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-3
    # The world's demonstrations come only from training labelers and include some flavor.
    assert any(d["response"] != small_world.ideal_response(small_world.instance(d["prompt"]))
               for d in small_world.demonstrations)


def test_make_rankings_writes_valid_strict_rankings(small_world):
    rng = random.Random()
    instances = small_world.instances("rm")[:40]
    samples = []
    for instance in instances:
        ideal = small_world.ideal_response(instance)
        samples.append([ideal, ideal + " thanks", "sky sky", "", ideal, "snow sun"])
    samples[0] = ["cat", "cat ", " cat"]  # all identical: no comparison, skipped
    labelers = small_world.train_labelers
    rankings = make_rankings(small_world, [i.prompt for i in instances], samples, labelers, rng)
    assert len(rankings) == len(instances) - 1
    for record in rankings:
        completions, ranks = record["completions"], record["ranks"]
        assert len(completions) == len(set(completions)) == 4 and all(completions)
        assert sorted(ranks) == list(range(len(ranks)))
        assert record["labeler"] in {l.id for l in labelers}
    data = pytest.importorskip("rlhf_fast.data.records")
    for record in rankings:
        data.Ranking(record["prompt"], record["completions"], record["ranks"])
    with pytest.raises(ValueError, match="same length"):
        make_rankings(small_world, instances, samples[:-1], labelers, rng)
    with pytest.raises(ValueError, match="samples"):
        make_rankings(small_world, instances[:1], [["a"] * 10], labelers, rng)
    with pytest.raises(ValueError, match="not a world prompt"):
        make_rankings(small_world, ["hello there"], [["a", "b"]], labelers, rng)


def _attempts(world, instance, rng):
    """An ideal answer, a partial one, a wrong attempt, and unhelpful responses to `instance`."""
    task = world.tasks[instance.task]
    ideal = world.ideal_response(instance).split()
    vocabulary = task.answer_vocabulary(instance) - set(ideal)
    if task.closed_domain:  # a wrong answer from the passage: wrong, not hallucinated
        vocabulary &= set(instance.prompt.split())
    vocabulary = {word for word in vocabulary if world.score(instance, word).score == 0}
    wrong = [rng.choice(sorted(vocabulary))] if vocabulary else ideal[:1] * 2  # no wrong word: half an answer
    unhelpful = ["thanks", "sure , glad to help", "", "thanks thanks thanks", f"{ideal[0]} {ideal[0]} {ideal[0]}",
                 "the the is", "please thanks hope this helps"]
    return " ".join(ideal), " ".join(wrong), unhelpful


def test_labelers_put_helpfulness_first(small_world):
    """Every labeler ranks a wrong attempt above a polite non-answer, a repetition or an off-task response,
    and the ideal answer above the wrong one."""
    rng = random.Random(0)
    for index, instance in enumerate(small_world.instances("heldout")[:120]):
        if instance.task == "continue":
            continue
        ideal, wrong, unhelpful = _attempts(small_world, instance, rng)
        for labeler in small_world.labelers:
            worst_attempt = min(utility(labeler, instance, ideal), utility(labeler, instance, wrong))
            assert utility(labeler, instance, ideal) > utility(labeler, instance, wrong), (instance.prompt, wrong)
            for response in unhelpful:
                assert worst_attempt > utility(labeler, instance, response), (index, instance.prompt, response)


def test_non_answers_and_repetitions_are_recognized(small_world):
    from rlhf_fast.world.labelers import is_unhelpful
    from rlhf_fast.world.language import repeats_word

    assert repeats_word("thanks thanks thanks") and repeats_word("a cat cat cat .")
    assert not repeats_word("cat cat dog cat cat") and not repeats_word("")
    instance = small_world.tasks["reverse"].parse("reverse the words : cat dog cup .")
    task = small_world.tasks["reverse"]
    assert task.attempts(instance, "cup dog cat") and task.attempts(instance, "thanks , cup")
    assert not task.attempts(instance, "sure , thanks") and not task.attempts(instance, "the is a")
    assert is_unhelpful(task, instance, "cup cup cup") and not is_unhelpful(task, instance, "cup dog cat")


def test_labelers_agree_with_each_other_on_clear_pairs(small_world):
    """Inter-labeler agreement is high on pairs whose helpfulness differs (what an RM can learn) and near
    chance only where the responses are equally good."""
    rng = random.Random(1)
    agree, pairs = 0, 0
    for instance in small_world.instances("heldout")[:100]:
        ideal, wrong, unhelpful = _attempts(small_world, instance, rng)
        for a, b in ((ideal, wrong), (wrong, unhelpful[0]), (ideal, unhelpful[3])):
            votes = [prefer(labeler, instance, a, b, rng) for labeler in small_world.labelers]
            agree += sum(x == y for i, x in enumerate(votes) for y in votes[i + 1:])
            pairs += len(votes) * (len(votes) - 1) // 2
    assert agree / pairs > 0.9


def test_some_baiting_demonstrations_continue_in_the_source_voice(small_world):
    rng = random.Random()
    labeler = max(small_world.train_labelers, key=lambda l: l.literal_rate)
    task = small_world.tasks["continue"]
    insults = 0
    draws = 800
    for _ in range(draws):
        instance = task.sample(rng, bait=True, respectful=bool(rng.random() < 0.5))
        demonstration = write_demonstration(labeler, instance, rng).split()
        insults += any(word in small_world.language.insult_set for word in demonstration)
        kind = task.sample(rng, bait=False)
        assert not any(w in small_world.language.insult_set for w in write_demonstration(labeler, kind, rng).split())
    p = labeler.literal_rate
    assert abs(insults / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_default_panels_share_their_mean_taste(seed):
    # A reward model learns the training panel's tastes and is judged by the held-out panel's: with the
    # default panel sizes the two weigh style (against their noise) alike; with 8 and 4 labelers, seed 1's
    # panels differed threefold.
    # Every size but the labelers' as small as it goes: only the labelers are looked at.
    datasets = ("qa_benchmark", "demonstrations", "rm_prompts", "ppo_prompts", "heldout_prompts", "probes")
    world = build_world(seed, {"pretrain_documents": 10, **{name: 2 for name in datasets}})
    train, heldout = world.train_labelers, world.heldout_labelers
    assert (len(train), len(heldout)) == (30, 10)

    def politeness(panel):
        return np.mean([labeler.politeness_weight / labeler.noise for labeler in panel])

    assert politeness(heldout) == pytest.approx(politeness(train), rel=0.2)
