"""How the reward model's K samples per prompt are shared between the SFT models that draw them."""

import random

from rlhf_fast.pipeline.evaluation import merge_shares, policy_shares


def test_shares_add_up_to_each_prompts_samples_the_first_policies_taking_the_remainder():
    rng = random.Random(0)
    per_prompt = [rng.randint(0, 9) for _ in range(200)]
    for policies in (1, 2, 3):
        shares = policy_shares(per_prompt, policies)
        assert len(shares) == policies
        assert [sum(column) for column in zip(*shares)] == per_prompt
        for column in zip(*shares):  # equal shares, one more for the first policies while a remainder lasts
            assert max(column) - min(column) <= 1 and list(column) == sorted(column, reverse=True)
    assert policy_shares([4, 5, 9], 2) == [[2, 3, 5], [2, 2, 4]]


def test_merged_shares_keep_each_prompts_samples_in_the_order_of_the_policies():
    first = [["a1", "a2"], [], ["c1"]]
    second = [["a3"], ["b1"], []]
    assert merge_shares([first, second]) == [["a1", "a2", "a3"], ["b1"], ["c1"]]
    assert merge_shares([first]) == first
