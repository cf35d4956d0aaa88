"""Test-wide settings. Imported by pytest before any test module, so before jax.

The suite runs on CPU unless JAX_PLATFORMS says otherwise (bench/gpu_check.sh sets it to cuda for the
GPU-marked tests); tests marked `gpu` are skipped where no GPU is visible.
"""

import os

import pytest

# CPU-only tests: unoptimised XLA backend code compiles several times faster, and the suite is compile-bound.
# Subprocesses started by the tests inherit it.
if os.environ.setdefault("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def _gpu_visible() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except Exception:  # no CUDA plugin, or JAX_PLATFORMS names a platform this install lacks
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items and not _gpu_visible():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run bash bench/gpu_check.sh on one)"))
