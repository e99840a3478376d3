"""rlhf_fast.ops._contract: the numbers every backend shares are defined once and reach every backend; the
value-check switch as a context manager."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import _extension
from rlhf_fast.data.records import MAX_COMPLETIONS
from rlhf_fast.ops import gae, set_value_checks, use_backend, value_checks
from rlhf_fast.ops._checks import value_checks_enabled
from rlhf_fast.ops._contract import MAX_GROUP
from rlhf_fast.ops.gae import IMPLEMENTED, whiten_masked
from tests.helpers import TOLERANCES, fresh_generator, kernel_backends, ragged_mask


def test_compiled_ranking_group_limit_is_pythons():
    if not _extension.has_cpp_kernels():
        pytest.skip("rlhf_fast._C is not built")
    assert _extension.compiled_module().ranking_max_group == MAX_GROUP


def test_data_ranking_limit_fits_the_kernels():
    # A ranking the data layer accepts must be one group the ranking kernels can hold.
    assert MAX_COMPLETIONS <= MAX_GROUP


@pytest.mark.parametrize("backend", ["reference", *kernel_backends(IMPLEMENTED)])
def test_whitening_epsilon_is_an_argument_of_every_backend(backend):
    # The op passes WHITEN_EPS to every kernel; a different epsilon must change the result the same way.
    generator = fresh_generator()
    rewards = torch.randn(5, 11, generator=generator) * 1e-3
    values = torch.randn(5, 11, generator=generator) * 1e-3
    mask = ragged_mask(5, 11, generator)
    with use_backend(backend):
        from rlhf_fast.ops.gae import _KERNELS

        raw, _ = gae(rewards, values, mask)
        for eps in (1e-8, 1.0):
            whitened, _ = _KERNELS[backend](rewards, values, mask, 1.0, 0.95, True, eps)
            want = whiten_masked(raw.double(), mask, eps)
            torch.testing.assert_close(whitened.double(), want, **TOLERANCES[torch.float32])


def test_value_checks_context_restores_the_setting():
    assert value_checks_enabled()
    with value_checks(False):
        assert not value_checks_enabled()
        with value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(RuntimeError), value_checks(False):
        raise RuntimeError("inside the block")
    assert value_checks_enabled()
    previous = set_value_checks(False)
    try:
        with value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    finally:
        set_value_checks(previous)
