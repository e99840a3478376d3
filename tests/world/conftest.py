import pytest

from rlhf_fast.world import build_world

SMALL_SIZES = {"pretrain_documents": 400, "qa_benchmark": 60, "demonstrations": 300, "rm_prompts": 150,
               "ppo_prompts": 150, "heldout_prompts": 150, "probes": 40, "customers": 12, "labelers": 8,
               "heldout_labelers": 3}


@pytest.fixture(scope="session")
def small_world():
    return build_world(7, SMALL_SIZES)
