"""Fixtures shared by every test directory."""

from collections.abc import Iterator

import pytest

from lowbit.kernels import dispatch


@pytest.fixture
def auto_mode() -> Iterator[None]:
    """Measure-and-decide dispatch (``auto``, the default) for a test of it, whatever ``LOWBIT_KERNELS`` says.

    ``LOWBIT_KERNELS=portable`` runs the suite in ``native`` mode on the library built without SIMD (what a CPU
    without AVX2, or an ARM one, builds), for parity; the tests of auto dispatch ask for this fixture, so that run
    checks them on that build too, as such a CPU runs them. `dispatch.environment_mode`, not `use_mode`: the decided
    calls' short paths run only in the environment's ``auto`` mode with no override.
    """
    with dispatch.environment_mode("auto"):
        yield
