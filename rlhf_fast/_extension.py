"""Loads the compiled core (`rlhf_fast._C`) once and says which compiled backends it holds.

The `.so` registers its kernels as `torch.ops.rlhf_fast_C.*` when it is imported. It carries no rpath to
torch's libraries of its own, so torch is imported first.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch


@functools.cache
def compiled_module():
    """The imported `rlhf_fast._C`, or None when the package was not built (a source checkout)."""
    if os.environ.get("RLHF_FAST_NO_EXTENSION"):
        return None
    try:
        return importlib.import_module("rlhf_fast._C")
    except ImportError as error:
        warnings.warn(
            f"rlhf_fast._C is not built ({error}); every op falls back to its plain-torch reference. "
            "Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=2,
        )
        return None


def has_cpp_kernels() -> bool:
    return compiled_module() is not None


def has_cuda_kernels() -> bool:
    module = compiled_module()
    return module is not None and bool(module.built_with_cuda) and torch.cuda.is_available()


def kernels():
    """The namespace of compiled kernels: `kernels().gae_forward(...)`."""
    if compiled_module() is None:
        raise RuntimeError("rlhf_fast._C is not built: build it with `pip install --no-build-isolation -e .`")
    return torch.ops.rlhf_fast_C
