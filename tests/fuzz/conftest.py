"""Short seeded fuzz runs (the long ones: experiments/fuzz.py); each test file is one target's."""

import pytest
from hypothesis import HealthCheck, settings

#: Reproducible (derandomized) and small: the whole folder stays well under a minute on 2 loaded cores.
settings.register_profile(
    "fuzz",
    derandomize=True,
    deadline=None,  # the per-input limit is helpers.fuzz.TIME_LIMIT, enforced by run()
    database=None,
    max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Where a target writes the input file (one folder per module: hypothesis reuses it per example)."""
    return tmp_path_factory.mktemp("fuzz")
