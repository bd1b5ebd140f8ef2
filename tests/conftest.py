"""Test configuration: 8 emulated CPU devices, offline Hugging Face, shared fixtures.

The environment variables must be set before JAX (or transformers) is first imported, which is
why they sit at the top of this module rather than in a fixture.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Without these a hub name costs ~23 s of retries before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Compiles dominate the first example of a property test; a deadline would only measure that.
settings.register_profile("taskpgm", deadline=None, max_examples=25, print_blob=True)
settings.load_profile("taskpgm")


@pytest.fixture
def rng(request):
    """A fresh NumPy generator per test; the seed is printed on failure so a run can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("numpy_seed", seed))
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def cpu_mesh_devices():
    devices = jax.devices()
    assert len(devices) == 8, "conftest must run before JAX initialises (8 emulated CPU devices)"
    return devices
