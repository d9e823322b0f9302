"""Which integrator runs flowrl's fixed-grid Euler solves: diffrax (default) or a plain `lax.scan`.

Every flow ODE (`flowrl.flow.euler_ode_sample`), memoryless-SDE rollout and adjoint ODE
(`flowrl.sde`) is explicit Euler on the fixed grid t_i = i/K. Two backends compute it:

- ``"diffrax"`` (the default): `diffrax.diffeqsolve` with `Euler` + `StepTo` on the grid, the
  Brownian increments as a `LinearInterpolation` of the fixed path W(t_i).
- ``"scan"``: the same recursion written as one `jax.lax.scan` over the K steps. It computes the
  same numbers (tests/test_sde.py pins both backends to the same hand-written recursion, and the
  QAM loss and gradient agree to float rounding), with less to trace and compile: at the paper's
  sizes the QAM training step compiles in about half the time (docs/performance.md).

Select with gin (``flowrl.integrator.backend = 'scan'``), or in code with
``with use_integrator("scan"): ...``, which overrides gin. The choice is read when a function is
*traced*: set it before the first call of a jitted step, as `flowrl train` does through gin.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import gin

from flowrl.errors import ConfigError

INTEGRATORS: tuple[str, ...] = ("diffrax", "scan")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("flowrl_integrator", default=None)


def _check(backend: str) -> str:
    if backend not in INTEGRATORS:
        raise ConfigError(
            f"flowrl.integrator.backend = {backend!r} is not one of {', '.join(INTEGRATORS)}"
        )
    return backend


@gin.configurable("integrator", module="flowrl")
def configured_integrator(backend: str = "diffrax") -> str:
    """The gin-bound backend (``flowrl.integrator.backend``)."""
    return _check(backend)


def current_integrator() -> str:
    """The backend in force: a `use_integrator` override, else the gin binding, else diffrax."""
    override = _override.get()
    return override if override is not None else configured_integrator()


@contextlib.contextmanager
def use_integrator(backend: str) -> Iterator[None]:
    """Trace everything inside the block with `backend` (overrides the gin binding)."""
    token = _override.set(_check(backend))
    try:
        yield
    finally:
        _override.reset(token)
