"""Test-wide settings. Imported by pytest before any test module, so before jax."""

import os

# CPU-only tests: unoptimised XLA backend code compiles several times faster, and the suite is compile-bound.
# Subprocesses started by the tests inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
