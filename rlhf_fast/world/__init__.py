"""The InstructGPT miniature: a generated language and fact table, instruction tasks with programmatic
scorers, a pretraining corpus, simulated customers and labelers, and the datasets they produce."""

from rlhf_fast.world.build import (
    PromptRecord,
    World,
    WorldSizes,
    build_world,
    load_world,
    make_rankings,
    write_datasets,
)
from rlhf_fast.world.corpus import CorpusOptions
from rlhf_fast.world.labelers import Labeler, prefer, preference_probability, rank, utility
from rlhf_fast.world.language import vocabulary
from rlhf_fast.world.oracle import LabelerReward
from rlhf_fast.world.task import TaskInstance, TaskScore
from rlhf_fast.world.tasks import TASK_NAMES

__all__ = [
    "TASK_NAMES",
    "CorpusOptions",
    "Labeler",
    "LabelerReward",
    "PromptRecord",
    "TaskInstance",
    "TaskScore",
    "World",
    "WorldSizes",
    "build_world",
    "load_world",
    "make_rankings",
    "prefer",
    "preference_probability",
    "rank",
    "utility",
    "vocabulary",
    "write_datasets",
]
