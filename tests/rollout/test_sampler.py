"""rlhf_fast.rollout.sample: against transformers' generate, batch/padding invariance, the sampled distribution,
EOS and length edges, log-probs against a teacher-forced pass, argument checks, and (on a GPU) CUDA graphs and
the absence of host synchronization in the decode loop.

Models are tiny random-weight GPT-2 / GPT-NeoX / Llama / Qwen2 (tests/models/archs.py) in float64, so that
greedy choices are never decided by rounding.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.models import PolicyModel, functional
from rlhf_fast.rollout import SampleOutput, TokenSelector, sample, sampler
from tests.helpers import fresh_generator
from tests.models.archs import ARCHITECTURES, EOS, MAX_POSITIONS, PAD, build_causal_lm, left_padded_prompts

# The decode paths: transformers' modules for every architecture, and the functional GPT-2 step.
PATHS = [(arch, "modules") for arch in ARCHITECTURES] + [("gpt2", "functional")]


@pytest.fixture
def generator():
    return fresh_generator()


def seed_of(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=generator))


@pytest.fixture
def decode_path(request, monkeypatch):
    """Parametrized indirectly with "modules" (functional steps disabled) or "functional" (must be used)."""
    if request.param == "modules":
        monkeypatch.setattr(functional, "ARCHITECTURES", {})
    return request.param


def hf_greedy(model, ids, mask, max_new_tokens, eos):
    """transformers' greedy generate, padded with PAD to exactly max_new_tokens columns."""
    output = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=PAD,
        min_new_tokens=0,
    )
    response = output[:, ids.shape[1] :]
    return torch.nn.functional.pad(response, (0, max_new_tokens - response.shape[1]), value=PAD)


def check_invariants(out: SampleOutput, prompt_ids, max_new_tokens, eos_ids):
    """sequences = prompt + response; the mask is a prefix ending at the first EOS; pad (and log-prob 0) after."""
    batch = prompt_ids.shape[0]
    assert out.sequences.shape == (batch, prompt_ids.shape[1] + max_new_tokens)
    assert torch.equal(out.sequences[:, : prompt_ids.shape[1]], prompt_ids)
    assert torch.equal(out.sequences[:, prompt_ids.shape[1] :], out.response_ids)
    assert out.response_mask.dtype == torch.bool
    is_eos = torch.zeros_like(out.response_mask)
    for eos in eos_ids:
        is_eos |= out.response_ids == eos
    is_eos &= out.response_mask
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # an EOS strictly earlier in the row
    assert torch.equal(out.response_mask, ~eos_before)
    assert (out.response_ids[~out.response_mask] == PAD).all()
    if out.logprobs is not None:
        assert out.logprobs.dtype == torch.float32
        assert (out.logprobs[~out.response_mask] == 0).all()
        assert (out.logprobs[out.response_mask] <= 0).all()


# --------------------------------------------------------------------------------------- against generate
@pytest.mark.parametrize(("arch", "decode_path"), PATHS, indirect=["decode_path"])
def test_greedy_matches_generate(arch, decode_path, generator, monkeypatch):
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    policy = PolicyModel(model)
    if decode_path == "functional":
        assert functional.functional_decode_step(policy.backbone) is not None
    ids, mask = left_padded_prompts([7, 3, 1, 5], generator)
    steps = 9
    free = sample(policy, ids, mask, steps, temperature=0.0, eos_token_id=None, pad_token_id=PAD)
    assert torch.equal(free.response_ids, hf_greedy(model, ids, mask, steps, eos=None))
    assert free.response_mask.all()
    # An EOS that row 0 produces mid-way: that row stops there, the others go on or stop by their own EOS.
    eos = int(free.response_ids[0, 3])
    first = int((free.response_ids[0] == eos).long().argmax())  # the EOS may appear before column 3 too
    stopped = sample(model, ids, mask, steps, temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(stopped.response_ids, hf_greedy(model, ids, mask, steps, eos=eos))
    assert not stopped.response_mask[0, first + 1 :].any() and stopped.response_mask[0, : first + 1].all()
    check_invariants(stopped, ids, steps, [eos])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_row_independent_of_batch_mates_and_padding(arch, generator):
    model = build_causal_lm(arch, seed_of(generator), dtype=torch.float64)
    ids, mask = left_padded_prompts([6, 2, 4], generator)
    steps = 8
    kwargs = {"temperature": 0.0, "eos_token_id": EOS, "pad_token_id": PAD, "return_logprobs": True}
    together = sample(model, ids, mask, steps, **kwargs)
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = sample(model, ids[row : row + 1, real], mask[row : row + 1, real], steps, **kwargs)
        extra_padding = torch.nn.functional.pad(ids[row : row + 1], (5, 0), value=PAD)
        extra_mask = torch.nn.functional.pad(mask[row : row + 1], (5, 0), value=0)
        padded = sample(model, extra_padding, extra_mask, steps, **kwargs)
        for other in (alone, padded):
            assert torch.equal(other.response_ids[0], together.response_ids[row])
            assert torch.equal(other.response_mask[0], together.response_mask[row])
            torch.testing.assert_close(other.logprobs[0], together.logprobs[row], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- the distribution
def reference_distribution(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The exact next-token distribution after temperature, top-k, then top-p, in float64, written plainly."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    kept = order[:top_k] if top_k else order
    total = sum(float(probs[i]) for i in kept)
    if top_p < 1:
        chosen, mass = [], 0.0
        for i in kept:
            if mass >= top_p:
                break
            chosen.append(i)
            mass += float(probs[i]) / total
        kept = chosen
    result = torch.zeros_like(probs)
    result[kept] = probs[kept] / probs[kept].sum()
    return result


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    support = expected_probs > 0
    expected = expected_probs[support] * counts.sum()
    statistic = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    if dof == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2.0))


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.6), (0.9, 6, 0.75)]
)
def test_sampled_distribution(temperature, top_k, top_p, generator):
    vocab, draws = 13, 3000
    model = build_causal_lm("gpt2", seed_of(generator), dtype=torch.float64, vocab=vocab)
    policy = PolicyModel(model)
    prompts, prompt_mask = left_padded_prompts([3, 5], generator, vocab=vocab)
    with torch.no_grad():
        logits = policy.logits(policy(prompts, prompt_mask))[:, -1]
    # Move top_p off any cumulative-mass boundary, where float32 and float64 could disagree about a token.
    probs = torch.softmax(logits / temperature, -1).sort(descending=True).values
    if top_k:
        probs = probs[:, :top_k] / probs[:, :top_k].sum(-1, keepdim=True)
    while top_p < 1 and (probs.cumsum(-1) - top_p).abs().min() < 1e-3:
        top_p += 0.01
    out = sample(
        policy,
        prompts.repeat_interleave(draws, 0),
        prompt_mask.repeat_interleave(draws, 0),
        1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=None,
        pad_token_id=PAD,
        generator=generator,
        return_logprobs=True,
    )
    tokens = out.response_ids[:, 0].view(2, draws)
    for row in range(2):
        expected = reference_distribution(logits[row], temperature, top_k, top_p)
        counts = torch.bincount(tokens[row], minlength=vocab).double()
        assert (counts[expected == 0] == 0).all(), "a filtered-out token was sampled"
        assert chi_square_p_value(counts, expected) > 1e-4, (counts, expected * draws)
        # Log-probs are under the temperature-scaled distribution before filtering.
        unfiltered = torch.log_softmax(logits[row] / temperature, -1)
        torch.testing.assert_close(out.logprobs.view(2, draws)[row], unfiltered[tokens[row]].float())


def test_selector_filters_match_reference(generator):
    logits = torch.randn(64, 29, generator=generator) * 2
    for temperature, top_k, top_p in [
        (1.0, 3, 1.0),
        (0.5, 0, 0.3),
        (2.0, 10, 0.9),
        (1.0, 0, 1.0),
        (1.0, 29, 1.0),
    ]:
        selector = TokenSelector(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        kept = torch.isfinite(selector.filtered(selector.scaled(logits)))
        for row in range(logits.shape[0]):
            expected = reference_distribution(logits[row], temperature, top_k, top_p) > 0
            assert torch.equal(kept[row], expected), (temperature, top_k, top_p, row)


@pytest.mark.parametrize("uniform", [0.0, 1.0])
def test_inverse_cdf_ends_pick_tokens_with_mass(uniform, generator, monkeypatch):
    """U = 0 picks the first token with mass and U·c_V rounded up to c_V the last: never a filtered one."""
    logits = torch.randn(16, 37, generator=generator) * 3
    selector = TokenSelector(temperature=1.0, top_k=5, top_p=1.0, generator=generator)
    filtered = selector.filtered(logits)
    monkeypatch.setattr(sampler.torch, "rand", lambda shape, **_: torch.full(shape, uniform))
    tokens = selector.inverse_cdf_sample(filtered)
    kept = torch.isfinite(filtered)
    positions = torch.arange(logits.shape[-1]).expand_as(logits)
    end = torch.where(kept, positions, -1).amax(-1) if uniform else torch.where(kept, positions, 99).amin(-1)
    assert torch.equal(tokens, end)


def test_sampled_logprobs_match_teacher_forcing(generator):
    """The sampler's log-probs are what the scoring pass recomputes over the finished sequences."""
    model = build_causal_lm("qwen2", seed_of(generator), dtype=torch.float64)
    policy = PolicyModel(model)
    ids, mask = left_padded_prompts([5, 2, 7], generator)
    steps, temperature = 10, 0.8
    out = sample(
        policy,
        ids,
        mask,
        steps,
        temperature=temperature,
        top_k=20,
        top_p=0.9,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=generator,
        return_logprobs=True,
    )
    check_invariants(out, ids, steps, [EOS])
    full_mask = torch.cat([mask.bool(), out.response_mask], dim=1)
    with torch.no_grad():
        logits = policy.logits(policy(out.sequences, full_mask))
    prompt_len = ids.shape[1]
    predicting = torch.log_softmax(logits[:, prompt_len - 1 : -1] / temperature, -1)
    expected = predicting.gather(-1, out.response_ids[..., None]).squeeze(-1)
    valid = out.response_mask
    torch.testing.assert_close(out.logprobs[valid], expected[valid].float(), atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_deterministic(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([4, 6, 2], generator)
    seed = seed_of(generator)
    runs = [
        sample(
            model,
            ids,
            mask,
            12,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
            return_logprobs=True,
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    other = sample(
        model,
        ids.repeat(8, 1),
        mask.repeat(8, 1),
        12,
        eos_token_id=None,
        pad_token_id=PAD,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    assert not (other.response_ids == other.response_ids[:1]).all(), "sampling ignored its noise"


# ----------------------------------------------------------------------------------------- EOS and length
def test_max_new_tokens_one(generator):
    model = build_causal_lm("llama", seed_of(generator), dtype=torch.float64)
    ids, mask = left_padded_prompts([3, 1], generator)
    out = sample(
        model, ids, mask, 1, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, return_logprobs=True
    )
    assert out.sequences.shape == (2, ids.shape[1] + 1) and out.response_mask.all()
    assert torch.equal(out.response_ids, hf_greedy(model, ids, mask, 1, eos=EOS))


@pytest.mark.parametrize(
    ("arch", "decode_path"), [("gpt2", "functional"), ("gpt_neox", "modules")], indirect=["decode_path"]
)
def test_every_row_ends_at_once(arch, decode_path, generator):
    model = build_causal_lm(arch, seed_of(generator))
    ids, mask = left_padded_prompts([4, 2, 5], generator)
    every_token = list(range(model.config.vocab_size))
    out = sample(
        model,
        ids,
        mask,
        6,
        eos_token_id=every_token,
        pad_token_id=PAD,
        generator=generator,
        return_logprobs=True,
    )
    assert out.response_mask[:, 0].all() and not out.response_mask[:, 1:].any()
    assert (out.response_ids[:, 1:] == PAD).all() and (out.logprobs[:, 1:] == 0).all()
    check_invariants(out, ids, 6, every_token)


def test_no_row_ends(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([4, 2], generator)
    out = sample(model, ids, mask, 7, eos_token_id=None, pad_token_id=PAD, generator=generator)
    assert out.response_mask.all() and out.logprobs is None


def test_rows_end_at_different_steps(generator):
    """A frequent EOS (several ids) under sampling: the invariants hold row by row."""
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([3, 5, 1, 4] * 4, generator)
    eos_ids = [3, 4, 5, 6, 7, 8]
    out = sample(
        model,
        ids,
        mask,
        10,
        temperature=1.5,
        eos_token_id=eos_ids,
        pad_token_id=PAD,
        generator=generator,
        return_logprobs=True,
    )
    check_invariants(out, ids, 10, eos_ids)


@pytest.mark.parametrize("statistics", [(True, True), (True, False), (False, False)])
def test_compiled_bookkeeping_records_what_the_torch_ops_record(statistics, generator, monkeypatch):
    """The C++ bookkeeping after each draw (CPU) against its torch form: rows ending at different steps on
    several EOS ids, with and without log-probs and entropy, and a pad id that is also an EOS id."""
    from rlhf_fast.rollout import decode

    if not decode._compiled_record_runs(torch.device("cpu")):
        pytest.skip("needs the compiled extension")
    return_logprobs, return_entropy = statistics
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([3, 5, 1, 4] * 3, generator)
    seed = seed_of(generator)
    options = {"temperature": 1.5, "pad_token_id": PAD}
    # EOS ids the rows draw: rows 0-2 draw them by step 3 (the same draws up to there), so they end early.
    probe = sample(model, ids, mask, 4, eos_token_id=None, generator=torch.Generator().manual_seed(seed), **options)
    eos_ids = probe.response_ids[:3, 3].tolist()
    outputs = []
    for compiled in (True, False):
        with monkeypatch.context() as patch:
            patch.setattr(decode, "_compiled_record_runs", lambda device, compiled=compiled: compiled)
            for ends in (eos_ids, eos_ids[:1] + [PAD]):
                outputs.append(sample(model, ids, mask, 10, eos_token_id=ends, **options,
                                      generator=torch.Generator().manual_seed(seed), return_logprobs=return_logprobs,
                                      return_entropy=return_entropy))  # fmt: skip
    for got, expected in zip(outputs[:2], outputs[2:]):
        assert (~got.response_mask).any() and got.response_mask[:, 0].all()  # rows end, at different steps
        for name in ("sequences", "response_ids", "response_mask", "logprobs", "entropy"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None and b is None) or torch.equal(a, b), name


def test_prompt_too_long_for_the_model(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    ids, mask = left_padded_prompts([MAX_POSITIONS - 4], generator)
    sample(model, ids, mask, 4, eos_token_id=EOS, pad_token_id=PAD)  # exactly fits
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64 positions"):
        sample(model, ids, mask, 5, eos_token_id=EOS, pad_token_id=PAD)


def test_restores_training_mode(generator):
    model = build_causal_lm("gpt2", seed_of(generator))
    model.config.resid_pdrop = 0.5
    model.train()
    ids, mask = left_padded_prompts([3], generator)
    sample(model, ids, mask, 2, eos_token_id=EOS, pad_token_id=PAD)
    assert model.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"eos_token_id": "x"}, "eos_token_id"),
        ({"pad_token_id": None}, "pad_token_id"),
        ({"prompt_mask": torch.ones(2, 3)}, "prompt_mask"),
        ({"prompt_mask": torch.ones(2, 4, dtype=torch.long)}, "prompt_mask"),
        ({"prompt_ids": torch.ones(2, 3)}, "prompt_ids"),
        ({"use_cuda_graph": True}, "use_cuda_graph"),
        ({"policy": torch.nn.Linear(2, 2)}, "policy"),
    ],
)
def test_bad_arguments(kwargs, match, generator):
    arguments = {
        "policy": build_causal_lm("gpt2", 0),
        "prompt_ids": torch.ones(2, 3, dtype=torch.long),
        "prompt_mask": torch.ones(2, 3, dtype=torch.long),
        "max_new_tokens": 2,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    arguments.update(kwargs)
    if kwargs.get("use_cuda_graph") and torch.cuda.is_available():
        pytest.skip("CUDA tensors can use graphs here")
    with pytest.raises(ValueError, match=match):
        sample(**arguments)


# ---------------------------------------------------------------------------------------------------- CUDA
def _sync_checked(method):
    def checked(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return method(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_matches_eager_and_generate(arch, dtype, generator):
    model = build_causal_lm(arch, seed_of(generator), dtype=dtype).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([9, 4, 6, 1], generator))
    eager = sample(
        model, ids, mask, 16, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD, use_cuda_graph=False
    )
    graphed = sample(model, ids, mask, 16, temperature=0.0, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(eager.response_ids, graphed.response_ids)
    if dtype == torch.float32:
        assert torch.equal(graphed.response_ids, hf_greedy(model, ids, mask, 16, eos=EOS))
    seed = seed_of(generator)
    runs = [
        sample(
            model,
            ids,
            mask,
            16,
            temperature=0.9,
            top_p=0.95,
            eos_token_id=EOS,
            pad_token_id=PAD,
            generator=torch.Generator("cuda").manual_seed(seed),
            use_cuda_graph=use_graph,
            return_logprobs=True,
        )
        for use_graph in (True, True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].sequences, runs[2].sequences)
    check_invariants(runs[0], ids, 16, [EOS])


@pytest.mark.cuda
@pytest.mark.parametrize("use_cuda_graph", [False, True])
@pytest.mark.parametrize(
    ("arch", "decode_path"), [("gpt2", "functional"), ("qwen2", "modules")], indirect=["decode_path"]
)
def test_decode_loop_never_synchronizes(use_cuda_graph, arch, decode_path, generator, monkeypatch):
    """The eager loop and the graph replays run under sync-debug mode "error": any .item(), .cpu(), nonzero()
    or blocking copy inside them raises. (tests/rollout/test_graph_cache.py checks whole calls that replay a
    cached graph.)"""
    monkeypatch.setattr(sampler, "_run_eager", _sync_checked(sampler._run_eager))
    monkeypatch.setattr(sampler, "_replay", _sync_checked(sampler._replay))
    model = build_causal_lm(arch, seed_of(generator)).cuda()
    ids, mask = (t.cuda() for t in left_padded_prompts([5, 3, 8], generator))
    out = sample(
        model,
        ids,
        mask,
        12,
        temperature=0.8,
        top_k=10,
        top_p=0.9,
        eos_token_id=EOS,
        pad_token_id=PAD,
        generator=torch.Generator("cuda").manual_seed(seed_of(generator)),
        return_logprobs=True,
        use_cuda_graph=use_cuda_graph,
    )
    check_invariants(out, ids, 12, [EOS])
