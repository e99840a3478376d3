"""The sampler's cache of captured decode steps.

On a CPU the graph path runs under an emulated CUDA graph: "capture" keeps the decode step's program and buffers
and "replay" runs that step again, so everything around the graph is exercised here: the cache key and its hits,
the buffers reset in place between calls, the outputs copied out of them, the generator hand-off, invalidation
when the model's tensors are replaced, least-recently-used eviction, and `prepare`. What only a GPU can show
(capture itself, the registered generator inside the graph, no host synchronization) is in the `cuda` tests at
the end, which use real graphs.
"""

from __future__ import annotations

import gc

import pytest
import torch

from rlhf_fast.models import PolicyModel, functional
from rlhf_fast.rollout import clear_graphs, prepare, sample, sampler
from tests.helpers import fresh_generator
from tests.models.archs import EOS, PAD, build_causal_lm, left_padded_prompts


@pytest.fixture
def generator():
    return fresh_generator()


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


class EmulatedGraph:
    """A CUDA graph's stand-in: the step recorded at capture (with the generator registered then), run on replay."""

    def __init__(self, program, buffers):
        self.program, self.buffers = program, buffers

    def replay(self):
        self.program.step(self.buffers)


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class _Stream:
    def wait_event(self, event):
        pass


@pytest.fixture
def emulated_graphs(monkeypatch):
    """CPU tensors take the graph path; returns the list of captured (emulated) graphs."""
    captures = []

    def capture(program, buffers, noise):
        # Inside a real graph the noise comes from the generator registered with it: the entry's own.
        assert program.selector.greedy or program.selector.generator is noise
        captures.append(EmulatedGraph(program, buffers))
        return captures[-1]

    monkeypatch.setattr(sampler, "_GRAPH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(sampler, "_graph_can_sample", lambda selector: True)
    monkeypatch.setattr(sampler, "_capture_decode_step", capture)
    monkeypatch.setattr(sampler, "_warm_up", lambda program, buffers, stream: program.step(buffers))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    clear_graphs()
    yield captures
    clear_graphs()


SETTINGS = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 0.9, "top_k": 12, "top_p": 0.9},
}


def run(model, ids, mask, steps, setting, seed, use_cuda_graph, device="cpu"):
    """One call with a generator seeded with `seed`; returns the output and the generator's state after."""
    generator = torch.Generator(device).manual_seed(seed)
    out = sample(
        model,
        ids,
        mask,
        steps,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=generator,
        return_logprobs=True,
        use_cuda_graph=use_cuda_graph,
        **SETTINGS[setting],
    )
    return out, generator.get_state()


def assert_same_output(a, b):
    for name in ("sequences", "response_ids", "response_mask", "logprobs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize(("arch", "flat_step"), [("gpt2", True), ("llama", False)])
def test_cached_graph_equals_eager_across_calls(
    arch, flat_step, setting, generator, emulated_graphs, monkeypatch
):
    if not flat_step:
        monkeypatch.setattr(functional, "ARCHITECTURES", {})
    model = build_causal_lm(arch, seed_of(generator))
    # Two batches of the same shape, then one with a shorter prompt and a longer response (same P + T).
    calls = [
        (left_padded_prompts([6, 2, 4], generator), 8),
        (left_padded_prompts([3, 6, 1], generator), 8),
        (left_padded_prompts([4, 2, 3], generator), 10),
    ]
    outputs = []
    for (ids, mask), steps in calls:
        seed = seed_of(generator)
        graphed, graphed_state = run(model, ids, mask, steps, setting, seed, use_cuda_graph=True)
        eager, eager_state = run(model, ids, mask, steps, setting, seed, use_cuda_graph=False)
        assert_same_output(graphed, eager)
        assert torch.equal(graphed_state, eager_state), "the caller's generator advanced differently"
        outputs.append((graphed, eager))
    assert len(emulated_graphs) == 1, "one capture serves every call with the same batch size and P + T"
    for (
        graphed,
        eager,
    ) in outputs:  # the outputs are copies: later calls, which reuse the buffers, leave them be
        assert_same_output(graphed, eager)


def test_default_generator_hand_off(generator, emulated_graphs):
    """generator=None draws from (and advances) the default generator, with the graph as without it."""
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([5, 3], generator)
    seed = seed_of(generator)
    results = []
    with torch.random.fork_rng(devices=[]):
        for use_cuda_graph in (True, False):
            torch.manual_seed(seed)
            out = sample(
                model, ids, mask, 7, eos_token_id=None, pad_token_id=PAD, use_cuda_graph=use_cuda_graph
            )
            results.append(
                (out.response_ids, torch.rand(3))
            )  # the next draw shows where the generator stands
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_new_key_captures_and_least_recently_used_is_evicted(generator, emulated_graphs):
    model = build_causal_lm("gpt2", seed_of(generator))
    policy = PolicyModel(model)  # the cache is per transformers model, however the policy is passed
    limit = sampler.MAX_GRAPHS_PER_MODEL
    prompts = {batch: left_padded_prompts([3] * batch, generator) for batch in range(1, limit + 2)}
    for batch in range(1, limit + 1):
        sample(
            model,
            *prompts[batch],
            4,
            temperature=0.0,
            eos_token_id=EOS,
            pad_token_id=PAD,
            use_cuda_graph=True,
        )
    assert len(emulated_graphs) == limit
    sample(policy, *prompts[1], 4, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, use_cuda_graph=True)
    assert len(emulated_graphs) == limit, "batch 1 is cached (and now the most recently used)"
    sample(
        model,
        *prompts[limit + 1],
        4,
        temperature=0.0,
        eos_token_id=EOS,
        pad_token_id=PAD,
        use_cuda_graph=True,
    )
    assert len(emulated_graphs) == limit + 1 and len(sampler._GRAPHS[model].entries) == limit
    sample(model, *prompts[2], 4, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, use_cuda_graph=True)
    assert len(emulated_graphs) == limit + 2, "batch 2 was the least recently used, so it was evicted"
    # Settings that change the captured kernels are part of the key.
    for kwargs in (
        {"temperature": 0.7},
        {"temperature": 0.7, "top_k": 5},
        {"temperature": 0.0, "eos_token_id": 4},
        {"temperature": 0.0, "return_logprobs": True},
    ):
        before = len(emulated_graphs)
        sample(
            model, *prompts[1], 4, **{"eos_token_id": EOS, "pad_token_id": PAD, **kwargs}, use_cuda_graph=True
        )
        assert len(emulated_graphs) == before + 1, kwargs
    clear_graphs(policy)
    assert model not in sampler._GRAPHS


def test_in_place_updates_keep_the_graph_replaced_tensors_drop_it(generator, emulated_graphs):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([4, 6, 2], generator)
    seed = seed_of(generator)
    run(model, ids, mask, 6, "sampled", seed, use_cuda_graph=True)
    with torch.no_grad():  # what an optimizer step does
        for parameter in model.parameters():
            parameter.mul_(1.1)
    graphed, _ = run(model, ids, mask, 6, "sampled", seed, use_cuda_graph=True)
    assert len(emulated_graphs) == 1
    assert_same_output(graphed, run(model, ids, mask, 6, "sampled", seed, use_cuda_graph=False)[0])
    run(
        model, *left_padded_prompts([3, 3], generator), 6, "sampled", seed, use_cuda_graph=True
    )  # a second key
    assert len(emulated_graphs) == 2 and len(sampler._GRAPHS[model].entries) == 2
    with torch.no_grad():  # new tensors at new addresses: every graph of the model is stale
        model.transformer.h[0].mlp.c_fc.weight.data = model.transformer.h[0].mlp.c_fc.weight.data * 0.9
    graphed, _ = run(model, ids, mask, 6, "sampled", seed, use_cuda_graph=True)
    assert len(emulated_graphs) == 3 and len(sampler._GRAPHS[model].entries) == 1
    assert_same_output(graphed, run(model, ids, mask, 6, "sampled", seed, use_cuda_graph=False)[0])
    model.double()  # every tensor replaced, and the dtypes change
    run(model, ids, mask, 6, "greedy", seed, use_cuda_graph=True)
    assert len(emulated_graphs) == 4


def test_failed_call_drops_its_entry(generator, emulated_graphs, monkeypatch):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([4, 2], generator)

    def interrupted(graph, steps):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampler, "_replay", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sample(model, ids, mask, 5, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, use_cuda_graph=True)
    assert not sampler._GRAPHS[model].entries


def test_prepare_captures_without_touching_generators(generator, emulated_graphs):
    model = build_causal_lm("llama", seed_of(generator))
    ids, mask = left_padded_prompts([5, 1, 3, 4], generator)
    default_state = torch.random.get_rng_state()
    assert prepare(
        PolicyModel(model),
        4,
        5,
        9,
        eos_token_id=EOS,
        pad_token_id=PAD,
        return_logprobs=True,
        **SETTINGS["sampled"],
    )
    assert torch.equal(torch.random.get_rng_state(), default_state)
    assert len(emulated_graphs) == 1
    seed = seed_of(generator)
    graphed, graphed_state = run(model, ids, mask, 9, "sampled", seed, use_cuda_graph=True)
    assert len(emulated_graphs) == 1, "the call replays the graph prepare captured"
    eager, eager_state = run(model, ids, mask, 9, "sampled", seed, use_cuda_graph=False)
    assert_same_output(graphed, eager)
    assert torch.equal(graphed_state, eager_state)


def test_prepare_without_graphs_returns_false(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    assert not prepare(model, 2, 3, 4, eos_token_id=EOS, pad_token_id=PAD)  # CPU: sample uses no graph
    with pytest.raises(ValueError, match="batch_size"):
        prepare(model, 0, 3, 4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompt_length"):
        prepare(model, 2, 1.5, 4, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_new_tokens"):
        prepare(model, 2, 3, 0, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="top_p"):
        prepare(model, 2, 3, 4, top_p=0.0, eos_token_id=EOS, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------------------- CUDA
def counting_captures(monkeypatch) -> list:
    """Wraps the real capture to count it."""
    captures = []
    real = sampler._capture_decode_step

    def capture(*args):
        captures.append(real(*args))
        return captures[-1]

    monkeypatch.setattr(sampler, "_capture_decode_step", capture)
    return captures


def sync_checked(call):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize(("arch", "flat_step"), [("gpt2", True), ("qwen2", False)])
def test_cuda_graph_captured_once_then_replayed_without_sync(
    arch, flat_step, setting, generator, monkeypatch
):
    if not flat_step:
        monkeypatch.setattr(functional, "ARCHITECTURES", {})
    clear_graphs()
    captures = counting_captures(monkeypatch)
    model = build_causal_lm(arch, seed_of(generator)).cuda()
    calls = [
        (left_padded_prompts([7, 2, 5, 1], generator), 12),
        (left_padded_prompts([3, 7, 6, 4], generator), 12),
        (left_padded_prompts([4, 2, 3, 5], generator), 14),
    ]  # the last: P + T = 19 again, split 5 + 14
    for index, ((ids, mask), steps) in enumerate(calls):
        ids, mask = ids.cuda(), mask.cuda()
        seed = seed_of(generator)
        if index == 0:
            graphed, graphed_state = run(model, ids, mask, steps, setting, seed, True, device="cuda")
        else:  # the whole call, prefill included, makes no host synchronization
            graphed, graphed_state = sync_checked(
                lambda ids=ids, mask=mask, steps=steps, seed=seed: run(
                    model, ids, mask, steps, setting, seed, True, device="cuda"
                )
            )
        eager, eager_state = run(model, ids, mask, steps, setting, seed, False, device="cuda")
        assert_same_output(graphed, eager)
        assert torch.equal(graphed_state, eager_state)
    assert len(captures) == 1
    clear_graphs()


@pytest.mark.cuda
def test_cuda_graph_follows_in_place_updates_and_recaptures_replaced_tensors(generator, monkeypatch):
    clear_graphs()
    captures = counting_captures(monkeypatch)
    model = build_causal_lm("llama", seed_of(generator)).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([5, 3, 6], generator))
    seed = seed_of(generator)
    run(model, ids, mask, 10, "sampled", seed, True, device="cuda")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.1)
    graphed, _ = run(model, ids, mask, 10, "sampled", seed, True, device="cuda")
    assert len(captures) == 1
    assert_same_output(graphed, run(model, ids, mask, 10, "sampled", seed, False, device="cuda")[0])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data * 0.9  # new memory; the old is freed and may be reused
    graphed, _ = run(model, ids, mask, 10, "sampled", seed, True, device="cuda")
    assert len(captures) == 2
    assert_same_output(graphed, run(model, ids, mask, 10, "sampled", seed, False, device="cuda")[0])
    clear_graphs()


@pytest.mark.cuda
def test_cuda_prepare_then_sample_without_sync(generator, monkeypatch):
    clear_graphs()
    captures = counting_captures(monkeypatch)
    model = build_causal_lm("gpt2", seed_of(generator)).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([4, 6], generator))
    cuda_state = torch.cuda.get_rng_state()
    assert prepare(
        model, 2, 6, 8, eos_token_id=EOS, pad_token_id=PAD, return_logprobs=True, **SETTINGS["sampled"]
    )
    assert len(captures) == 1 and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    seed = seed_of(generator)
    graphed, _ = sync_checked(lambda: run(model, ids, mask, 8, "sampled", seed, True, device="cuda"))
    assert len(captures) == 1
    assert_same_output(graphed, run(model, ids, mask, 8, "sampled", seed, False, device="cuda")[0])
    clear_graphs()


@pytest.mark.cuda
def test_cuda_graphs_go_with_their_model(generator):
    clear_graphs()
    model = build_causal_lm("gpt2", seed_of(generator)).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([4, 6], generator))
    sample(model, ids, mask, 5, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    assert len(sampler._GRAPHS) == 1
    del model
    gc.collect()
    assert len(sampler._GRAPHS) == 0, "a captured graph keeps its model alive"
