"""Test setup: 8 host CPU devices for the sharding tests, the `gpu` marker's skip, and
CGSPN_TEST_SHARD=i/n, which keeps every n-th collected test from the i-th (the GPU suite takes
longer than one device call allows: `CGSPN_TEST_SHARD=0/2 bash experiments/cuda_device_run.sh
test`, then 1/2)."""
import os

# Must precede the first import of jax anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402


def has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _shard(config, items):
    spec = os.environ.get("CGSPN_TEST_SHARD")
    if not spec:
        return
    try:
        index, count = (int(v) for v in spec.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(f"CGSPN_TEST_SHARD must be 'i/n' with 0 <= i < n, got {spec!r}")
    config.hook.pytest_deselected(items=[t for k, t in enumerate(items) if k % count != index])
    items[:] = [t for k, t in enumerate(items) if k % count == index]


def pytest_collection_modifyitems(config, items):
    _shard(config, items)
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
