"""Test-suite configuration: strict JAX numerics and fresh gin state for every test.

- `jax_numpy_rank_promotion="raise"`: (B,) + (B, 1) is an error, not a silent (B, B).
- dtype promotion stays "standard": optax's Adam bias correction (float ** int32 count) fails
  under "strict" (optax 0.2.8), so strict dtype promotion would test optax, not flowrl.
- `jax_debug_key_reuse=True`: using a PRNG key twice raises `KeyReuseError`.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported (OGBENCH-DATA.md §7)

import gin
import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_debug_key_reuse", True)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: an xdist worker runs hundreds of
    tests, and keeping every executable it ever compiled grows its memory by gigabytes."""
    yield
    jax.clear_caches()


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def getkey():
    """A fresh, never-reused PRNG key per call."""
    counter = iter(range(10**9))
    base = jax.random.key(1234)

    def _getkey():
        return jax.random.fold_in(base, next(counter))

    return _getkey
