"""Shared test setup: a fixed hypothesis profile, seeded numpy RNGs, and the `gpu` marker.

Randomness is always replayable:
- hypothesis runs derandomized (the same examples every run) with no example database, so a
  failure reproduces from the command line alone; failing examples are printed.
- the ``rng`` fixture gives each test a numpy Generator seeded from ``KVTIER_TEST_SEED``
  (default below) and the test's node id; the seed is printed (pytest shows it for failures) and
  a test can be replayed with the same ``KVTIER_TEST_SEED``.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from testenv import BASE_SEED, cuda_usable

settings.register_profile(
    "kvtier",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("kvtier-long", parent=settings.get_profile("kvtier"), max_examples=1000)
settings.load_profile(os.environ.get("KVTIER_HYPOTHESIS_PROFILE", "kvtier"))


def seed_for(nodeid: str) -> int:
    """The numpy seed of one test: stable across runs and machines (not Python's salted hash)."""
    return (BASE_SEED * 1_000_003 + zlib.crc32(nodeid.encode())) % (2**63)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    seed = seed_for(request.node.nodeid)
    print(f"numpy seed for {request.node.nodeid}: {seed} (KVTIER_TEST_SEED={BASE_SEED})")
    request.node.user_properties.append(("numpy_seed", seed))
    return np.random.default_rng(seed)


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"kvtier tests: KVTIER_TEST_SEED={BASE_SEED}, hypothesis profile "
        f"{os.environ.get('KVTIER_HYPOTHESIS_PROFILE', 'kvtier')} (derandomized)"
    )


# ---------------------------------------------------------------- gpu marker


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    usable, reason = cuda_usable()
    if usable:
        return
    skip = pytest.mark.skip(reason=f"no usable CUDA GPU: {reason}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
