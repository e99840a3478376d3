"""CPU benchmark of per-token log-probs from hidden states × LM head: N=4096 tokens, d=256, V=50257, fp32.

    flock -s /tmp/rlhf_fast_build.lock .venv/bin/python -m pytest bench/bench_logprob.py \
        --benchmark-group-by=group -s --benchmark-timer=time.process_time

On the shared development machines (2 cores, load average 5-8 from other jobs) wall-clock rounds of seconds
swing by 2x depending on what else runs; with one intra-op thread, process CPU time (`time.process_time`,
user + system, page faults included) measures the work itself, so that is the timer recorded in RESULTS.md.

Baseline (`naive`): what RLHF trainers do (TRL/OpenRLHF `logprobs_from_logits`): `logits = hidden @ W.T`, then
`log_softmax(logits).gather(targets)`, and for the entropy `-(softmax · log_softmax).sum()`. Contender
(`ours`): `rlhf_fast.ops.linear_token_logprobs` on its CPU default backend (`chunked`: cache-sized tiles of
hidden × LM head with online row statistics, recomputed in backward). Each benchmark first checks that the two
agree. Passes: "forward" (log-prob only, no autograd) and "forward+backward" (log-prob and entropy, gradients
to hidden and weight). A smaller from-logits case (N=1024, `token_logprobs` against log_softmax + gather +
entropy) is timed too.

Peak memory is measured, not estimated: each (implementation, pass) runs once in a fresh subprocess, and the
figure is the growth of the process's peak resident set (VmHWM in /proc/self/status) across that one call,
after the inputs
exist and after a warm-up call on 8 tokens and a 64-entry vocabulary (which takes the lazy imports and
one-time initialization, ~85 MB, out of the figure for both implementations). It therefore counts every temporary and the outputs (for the
backward, the 51 MB weight gradient too). For scale, the naive path's largest temporaries are analytic: the
fp32 logits and their log_softmax, 2 x N x V x 4 B = 1.65 GB.

One intra-op thread, as in the other CPU benchmarks (2 shared cores on the development machines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf_fast.ops import linear_token_logprobs, token_logprobs

TOKENS, WIDTH, VOCAB = 4096, 256, 50257
LOGITS_TOKENS = 1024


def linear_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(TOKENS, WIDTH, generator=generator)
    weight = torch.randn(VOCAB, WIDTH, generator=generator).div_(WIDTH**0.5)  # in place: no temporary
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=generator)
    return hidden, weight, targets


def logits_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(LOGITS_TOKENS, VOCAB, generator=generator).mul_(3)
    targets = torch.randint(0, VOCAB, (LOGITS_TOKENS,), generator=generator)
    return logits, targets


def naive_from_logits(logits, targets, want_entropy):
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if want_entropy else None
    return logp, entropy


def naive_linear(hidden, weight, targets, want_entropy):
    return naive_from_logits(hidden @ weight.T, targets, want_entropy)


def ours_linear(hidden, weight, targets, want_entropy):
    out = linear_token_logprobs(hidden, weight, targets, return_entropy=want_entropy)
    return out.logprobs, out.entropy


def ours_from_logits(logits, targets, want_entropy):
    out = token_logprobs(logits, targets, return_entropy=want_entropy)
    return out.logprobs, out.entropy


LINEAR = {"naive": naive_linear, "ours": ours_linear}
FROM_LOGITS = {"naive": naive_from_logits, "ours": ours_from_logits}
CASES = {  # case -> (implementations, inputs, number of differentiable inputs)
    "linear": (LINEAR, linear_inputs, 2),
    "logits": (FROM_LOGITS, logits_inputs, 1),
}


def run_forward(function, inputs, differentiable):
    with torch.no_grad():
        return function(*inputs, want_entropy=False)


def run_forward_backward(function, inputs, differentiable):
    """Log-prob and entropy, then gradients to the first `differentiable` inputs."""
    leaves = [tensor.detach().requires_grad_() for tensor in inputs[:differentiable]]
    logp, entropy = function(*leaves, *inputs[differentiable:], want_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    return (logp.detach(), entropy.detach(), *[leaf.grad for leaf in leaves])


PASSES = {"forward": run_forward, "forward+backward": run_forward_backward}


def peak_rss_growth_mib(case: str, implementation: str, pass_name: str) -> float:
    """Runs one call in a fresh interpreter; returns the growth of its peak RSS across that call (MiB)."""
    script = os.path.abspath(__file__)
    result = subprocess.run(
        [sys.executable, script, "--peak-rss", case, implementation, pass_name],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_growth_mib"]


def _measure_in_this_process(case: str, implementation: str, pass_name: str) -> None:
    torch.set_num_threads(1)
    implementations, make_inputs, differentiable = CASES[case]
    inputs = make_inputs()
    # A call on 8 tokens and 64 vocabulary entries first: lazy imports and one-time initialization (tens of
    # MB) are not the op's.
    small = (
        (inputs[0][:8, :64], inputs[1][:8] % 64)
        if case == "logits"
        else (inputs[0][:8], inputs[1][:64], inputs[2][:8] % 64)
    )
    PASSES[pass_name](implementations[implementation], small, differentiable)
    before = _reset_peak_rss()
    PASSES[pass_name](implementations[implementation], inputs, differentiable)
    print(json.dumps({"peak_rss_growth_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Resets this process's peak RSS to its current RSS where the kernel allows it; returns the baseline (KiB).

    ru_maxrss is no use here: it survives execve, so a child of a large pytest process starts at the parent's
    peak. VmHWM belongs to the process's own address space, which exec replaces."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _status_kib("VmRSS")
    except OSError:
        return _status_kib("VmHWM")


def check_agreement(got, want):
    for g, w in zip(got, want, strict=True):
        if g is not None:
            torch.testing.assert_close(g, w, atol=2e-4, rtol=2e-4)


_peaks: dict[tuple[str, str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_peaks():
    yield
    if _peaks:
        print("\n\npeak RSS growth during one call (MiB, fresh subprocess each):")
        for (case, implementation, pass_name), mib in sorted(_peaks.items()):
            print(f"  {case:12s} {pass_name:17s} {implementation:6s} {mib:9.1f}")


@pytest.mark.benchmark(min_rounds=3, warmup=True)
@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("implementation", list(LINEAR))
def test_linear_logprobs_cpu(benchmark, implementation, pass_name):
    torch.set_num_threads(1)
    benchmark.group = f"linear_token_logprobs N={TOKENS} d={WIDTH} V={VOCAB} fp32 {pass_name}"
    inputs = linear_inputs()
    check_agreement(
        PASSES[pass_name](LINEAR[implementation], inputs, 2), PASSES[pass_name](naive_linear, inputs, 2)
    )
    benchmark.pedantic(PASSES[pass_name], args=(LINEAR[implementation], inputs, 2), rounds=3, warmup_rounds=1)
    peak = peak_rss_growth_mib("linear", implementation, pass_name)
    _peaks[("linear", implementation, pass_name)] = peak
    benchmark.extra_info["peak_rss_growth_mib"] = peak


@pytest.mark.benchmark(min_rounds=5, warmup=True)
@pytest.mark.parametrize("pass_name", list(PASSES))
@pytest.mark.parametrize("implementation", list(FROM_LOGITS))
def test_token_logprobs_cpu(benchmark, implementation, pass_name):
    torch.set_num_threads(1)
    benchmark.group = f"token_logprobs N={LOGITS_TOKENS} V={VOCAB} fp32 {pass_name}"
    inputs = logits_inputs()
    check_agreement(
        PASSES[pass_name](FROM_LOGITS[implementation], inputs, 1),
        PASSES[pass_name](naive_from_logits, inputs, 1),
    )
    benchmark.pedantic(
        PASSES[pass_name], args=(FROM_LOGITS[implementation], inputs, 1), rounds=5, warmup_rounds=1
    )
    peak = peak_rss_growth_mib("logits", implementation, pass_name)
    _peaks[("logits", implementation, pass_name)] = peak
    benchmark.extra_info["peak_rss_growth_mib"] = peak


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--peak-rss":
    _measure_in_this_process(sys.argv[2], sys.argv[3], sys.argv[4])
