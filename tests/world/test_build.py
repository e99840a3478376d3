import json
import random
import re

import pytest

from rlhf_fast.world import WorldSizes, build_world, write_datasets
from rlhf_fast.world.corpus import CorpusOptions, make_corpus
from rlhf_fast.world.tasks import TASK_NAMES
from tests.world.conftest import SMALL_SIZES


def _snapshot(world):
    return (world.pretrain_documents, world.qa_benchmark, world.demonstrations,
            {k: [(r.customer, r.instance.prompt) for r in v] for k, v in world.splits.items()},
            {k: [i.prompt for i in v] for k, v in world.probes.items()},
            world.labelers, world.customers, world.facts.facts, world.language)


def test_same_seed_same_world_other_seed_other_world(small_world):
    assert _snapshot(build_world(7, SMALL_SIZES)) == _snapshot(small_world)
    other = build_world(8, SMALL_SIZES)
    assert other.pretrain_documents != small_world.pretrain_documents
    assert other.facts.facts != small_world.facts.facts


def test_one_size_does_not_reshuffle_the_others(small_world):
    changed = build_world(7, dict(SMALL_SIZES, pretrain_documents=50))
    assert changed.demonstrations == small_world.demonstrations
    assert changed.pretrain_documents == small_world.pretrain_documents[:50]


def test_sizes_are_honoured_and_checked(small_world):
    assert len(small_world.pretrain_documents) == SMALL_SIZES["pretrain_documents"]
    assert len(small_world.demonstrations) == SMALL_SIZES["demonstrations"]
    assert len(small_world.splits["heldout"]) == SMALL_SIZES["heldout_prompts"]
    assert len(small_world.heldout_labelers) == SMALL_SIZES["heldout_labelers"]
    with pytest.raises(ValueError, match="unknown keys"):
        build_world(0, {"pretrain_docs": 3})
    with pytest.raises(ValueError, match="pretrain_documents"):
        WorldSizes(pretrain_documents=-1)
    with pytest.raises(ValueError, match="seed"):
        build_world("7")


def _all_texts(world):
    texts = list(world.pretrain_documents)
    texts += [item["prompt"] + " " + item["answer"] for item in world.qa_benchmark]
    texts += [d["prompt"] + " " + d["response"] for d in world.demonstrations]
    for split in list(world.splits) + list(world.probes):
        texts += [i.prompt + " " + world.ideal_response(i) for i in world.instances(split)]
    return texts


def test_every_text_tokenizes_without_unknown_words(small_world):
    vocabulary = small_world.vocabulary()
    known = set(vocabulary)
    texts = _all_texts(small_world)
    unknown = {word for text in texts for word in text.split() if word not in known}
    assert not unknown
    assert all(text == " ".join(text.split()) for text in texts)  # single spaces, no stray whitespace
    # The project's word-level tokenizer maps no word of any text to [unk].
    models = pytest.importorskip("rlhf_fast.models")
    tokenizer = models.build_word_tokenizer(vocabulary)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(tokenizer.unk_token_id not in row for row in ids)
    assert sum(map(len, ids)) == sum(len(text.split()) for text in texts)


def test_all_world_prompts_are_recoverable_from_their_text(small_world):
    for split in list(small_world.splits) + list(small_world.probes):
        for instance in small_world.instances(split):
            assert small_world.instance(instance.prompt) == instance
    with pytest.raises(ValueError, match="split"):
        small_world.instances("nope")


def test_every_task_appears_in_training_and_heldout_prompts(small_world):
    for split in ("sft", "heldout"):
        assert {i.task for i in small_world.instances(split)} == set(TASK_NAMES)


def test_corpus_has_skills_and_flaws_but_not_the_instruction_format(small_world):
    world = build_world(7, dict(SMALL_SIZES, pretrain_documents=3000))
    corpus = " ".join(world.pretrain_documents)
    # No instruction template (its words up to the first slot) occurs in the corpus.
    for task in world.tasks.values():
        for template in task.templates:
            head = template.split("{")[0].strip()
            if head:  # the raw continuation prompt is web text on purpose
                assert f" {head} " not in f" {corpus} ", head
    assert " backwards are " in corpus and " in order are " in corpus and "passage " in corpus
    assert any(f" is a {insult} ." in corpus for insult in world.language.insults)
    # Myths are stated more often than the truth; other facts mostly truthfully.
    def mentions(fact, value):
        return corpus.count(" ".join(world.facts.statement(fact.subject, fact.relation, value)) + " .")
    myth_true = sum(mentions(f, f.value) for f in world.facts.myths)
    myth_false = sum(mentions(f, f.myth) for f in world.facts.myths)
    assert myth_false > myth_true
    others = [f for f in world.facts.facts.values() if f.myth is None]
    assert sum(mentions(f, f.value) for f in others) > 5 * sum(
        corpus.count(" ".join(world.facts.statement(f.subject, f.relation, v)) + " .")
        for f in others for v in world.facts.values(f.relation) if v != f.value)


def test_corpus_options_are_validated_and_used(small_world):
    with pytest.raises(ValueError, match="myth_rate"):
        CorpusOptions(myth_rate=1.5)
    clean = make_corpus(small_world.tasks, random.Random(0), 300,
                        CorpusOptions(insult_rate_after_bad_event=0.0, insult_rate_after_good_event=0.0))
    insults = small_world.language.insult_set
    assert not any(word in insults for doc in clean for word in doc.split())


def test_qa_benchmark_is_held_out_of_the_corpus(small_world):
    corpus = "\n".join(small_world.pretrain_documents)
    prompts = [item["prompt"] for item in small_world.qa_benchmark]
    assert len(set(prompts)) == len(prompts)
    assert not any(prompt in corpus for prompt in prompts)
    for item in small_world.qa_benchmark:
        assert re.fullmatch(r"passage .* question .* \? answer", item["prompt"])


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_written_datasets_keep_heldout_labelers_and_customers_out_of_training(small_world, tmp_path):
    paths = write_datasets(small_world, tmp_path)
    for name in ("pretrain", "qa_benchmark", "demonstrations", "prompts_rm", "prompts_train",
                 "prompts_heldout", "probes", "world"):
        assert paths[name].exists()
    heldout_labelers = {l.id for l in small_world.heldout_labelers}
    heldout_customers = {c.id for c in small_world.heldout_customers}
    train_files = ("demonstrations", "prompts_rm", "prompts_train")
    train_prompts = set()
    for name in train_files:
        records = _read(paths[name])
        assert records
        assert not {r["customer"] for r in records} & heldout_customers
        train_prompts |= {r["prompt"] for r in records}
    assert not {r["labeler"] for r in _read(paths["demonstrations"])} & heldout_labelers
    heldout = _read(paths["prompts_heldout"])
    assert {r["customer"] for r in heldout} <= heldout_customers
    assert not {r["prompt"] for r in heldout} & train_prompts
    pretrain = "\n".join(r["text"] for r in _read(paths["pretrain"]))
    # Held-out instructions never occur in the corpus (raw continuation prompts are web text by design).
    instructions = [r["prompt"] for r in heldout if not small_world.instance(r["prompt"]).data.get("raw")]
    assert instructions
    assert not any(prompt in pretrain for prompt in instructions)
    meta = json.loads(paths["world"].read_text())
    assert meta["seed"] == 7 and meta["vocabulary"] == small_world.vocabulary()
    assert {l["id"] for l in meta["labelers"] if l["held_out"]} == heldout_labelers


def test_written_datasets_load_with_the_data_layer(small_world, tmp_path):
    jsonl = pytest.importorskip("rlhf_fast.data.jsonl")
    paths = write_datasets(small_world, tmp_path)
    assert len(jsonl.read_demonstrations(paths["demonstrations"])) == len(small_world.demonstrations)
    assert len(jsonl.read_prompts(paths["prompts_heldout"])) == len(small_world.splits["heldout"])
    assert len(jsonl.read_prompts(paths["qa_benchmark"])) == len(small_world.qa_benchmark)
    assert len(jsonl.read_pretrain_text(paths["pretrain"])) == len(small_world.pretrain_documents)


def test_customers_send_instructions_not_raw_text(small_world):
    for split in small_world.splits:
        continuations = [i for i in small_world.instances(split) if i.task == "continue"]
        assert continuations and not any(i.data["raw"] for i in continuations)


def test_load_world_rebuilds_the_written_world(small_world, tmp_path):
    from rlhf_fast.world import load_world

    write_datasets(small_world, tmp_path)
    loaded = load_world(tmp_path)
    assert _snapshot(loaded) == _snapshot(small_world)
    assert [l.id for l in loaded.heldout_labelers] == [l.id for l in small_world.heldout_labelers]
    saved = json.loads((tmp_path / "world.json").read_text())
    saved["vocabulary"] = saved["vocabulary"][:-1]
    (tmp_path / "world.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="vocabulary"):
        load_world(tmp_path)
    with pytest.raises(ValueError, match="cannot read"):
        load_world(tmp_path / "missing")
