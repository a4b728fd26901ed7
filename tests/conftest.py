"""Shared fixtures: every test that takes `xp` runs on NumPy, and on CuPy where a GPU is present."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from numgpt.backend import cupy_available, get_xp

# train.py and sample.py live at the repository root, beside the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# CI runs the default profile on 2 cores; `HYPOTHESIS_PROFILE=thorough` draws many more examples.
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(not cupy_available(),
                                                                     reason="CuPy with a GPU is not available"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name, "numpy" or "cupy"."""
    return request.param


@pytest.fixture
def xp(backend):
    """The array module of the backend under test."""
    return get_xp(backend)
