"""Fixtures shared by the kernel tests."""

import pytest

from lowbit.kernels import native


@pytest.fixture
def amx_state():
    """Restores the AMX switch a test flips."""
    before = native.amx()
    yield
    native.amx(before)
