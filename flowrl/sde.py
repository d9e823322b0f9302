r"""Memoryless SDE rollouts and adjoint ODEs for adjoint matching, through diffrax.

Adjoint matching (Domingo-Enrich et al., ICLR 2025) fine-tunes a flow v_θ so that its samples
follow p*(a|s) ∝ p_β(a|s)·exp(λ Q(s, a)). It rolls out the *memoryless* SDE of the flow,

    dX_t = [2 v(s, X_t, t) − X_t / t] dt + σ(t) dB_t,      σ(t)² = 2 (1 − t) / t,

and regresses v_θ onto targets built from the *adjoint* ã_t, the solution of

    dã/dt = −[∇_x b(X_t, t)ᵀ ã + ∇_x c(X_t, t)],   ã_1 = −λ ∇_x Q(s, X_1),

backwards in time. The *lean* adjoint (QAM, Li & Levine, ICLR 2026) takes b from the behaviour
flow v̄_β alone and drops c; the *basic* adjoint uses the fine-tuned drift and the running cost
c = ½‖u‖², u = (2/σ)(v_θ − v̄_β).

Discretisation on t_i = i/K, h = 1/K (METHODS.md §4.3), with an offset h in the schedule,

    σ_i = sqrt(2 (1 − t_i + h) / (t_i + h)),
    x_{i+1} = x_i + h [2 v_θ(s, x_i, t_i) − x_i / (t_i + h)] + sqrt(h) σ_i ε_i,    i = 0 … K − 2,
    x_K     = x_{K−1} + h v̄_β(s, x_{K−1}, t_{K−1})                               (last step: ODE, base).

Two schemes for the backward recursion ã_i = ã_{i+1} + h J_iᵀ ã_{i+1} are provided:

- `"reference"` (paper parity, the default): J_i = ∂_x[2 v̄_β(s, x, t_i + h) − x / (t_i + h)] at
  x_i for every i, including the last (ODE) step — the velocity is queried at t_{i+1} while the
  state is x_i, exactly as ColinQiyangLi/qam `adj_matching` does.
- `"consistent"`: J_i is the Jacobian of the forward step map actually taken — the offset SDE
  drift at t_i for i < K − 1 and the base velocity ∂_x v̄_β(s, x, t_{K−1}) for the last step. With
  v_θ = v̄_β this is *exactly* the pathwise gradient ∂(−λ Q(x_K)) / ∂x_i of the discretised SDE
  (tests/test_sde.py checks it against `jax.grad`). It differs from `"reference"` by O(h).

All functions here are per example (one observation); `vmap` over the batch outside. Both the
forward rollout and the backward adjoint are solved by `diffrax.diffeqsolve` with `diffrax.Euler`
and `diffrax.StepTo` on the exact grid; the Brownian increments are supplied as a
`diffrax.LinearInterpolation` of the fixed path W(t_i) = sqrt(h) Σ_{j<i} ε_j, so the noise is
held fixed and reproducible. Under the ``"scan"`` integrator (`flowrl.integrate`) the same
recursions run as plain `lax.scan`s (noise entering as sqrt(h)·σ_i·ε_i); tests/test_sde.py pins
both backends to a hand-written recursion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import diffrax
import jax
import jax.numpy as jnp
import lineax
from jaxtyping import Array, Float

from flowrl.flow import VelocityFn, time_grid
from flowrl.integrate import current_integrator

Scheme = Literal["reference", "consistent"]
SCHEMES: tuple[str, ...] = ("reference", "consistent")


def memoryless_sigma(t: Float[Array, "..."], step: float) -> Float[Array, "..."]:
    """σ(t) = sqrt(2 (1 − t + h) / (t + h)): the memoryless noise schedule with the h offset."""
    return jnp.sqrt(2.0 * (1.0 - t + step) / (t + step))


def sigma_schedule(num_steps: int) -> Float[Array, " k"]:
    """σ_0 … σ_{K−1} on the grid t_i = i/K (for K = 10: σ² = 22, 10, 6, 4, 2.8, 2, 1.43, 1, .67, .4)."""
    return memoryless_sigma(time_grid(num_steps)[:-1], 1.0 / num_steps)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown adjoint discretisation {scheme!r}; choose one of {SCHEMES}")


def _solve_fixed_grid(term, y0, ts, saveat_steps: bool = True):
    """Explicit Euler exactly on `ts` (increasing or decreasing); returns the states at every t in ts."""
    num_steps = ts.shape[0] - 1
    solution = diffrax.diffeqsolve(
        term,
        diffrax.Euler(),
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.StepTo(ts=ts),
        saveat=diffrax.SaveAt(t0=True, steps=True),
        max_steps=num_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=num_steps),
        # A fixed grid cannot fail a step: no runtime error checks (their host callback also
        # keeps programs out of JAX's persistent compilation cache).
        throw=False,
    )
    return solution.ys  # (num_steps + 1, d)


def memoryless_rollout(
    fine: VelocityFn,
    base: VelocityFn,
    obs: Float[Array, " obs"],
    x0: Float[Array, " d"],
    noises: Float[Array, "k1 d"],
) -> Float[Array, "k+1 d"]:
    """States x_0 … x_K of the memoryless SDE (K − 1 SDE steps with `fine`, one ODE step with `base`).

    `noises` holds ε_0 … ε_{K−2} (shape (K − 1, d)); K = noises.shape[0] + 1. Differentiable in
    `fine`, `base` and `x0` (BAM back-propagates through it).
    """
    if current_integrator() == "scan":
        return _memoryless_rollout_scan(fine, base, obs, x0, noises)
    num_steps = noises.shape[0] + 1
    step = 1.0 / num_steps
    grid = time_grid(num_steps)
    if num_steps > 1:
        sde_grid = grid[:-1]  # t_0 … t_{K−1}
        brownian = jnp.concatenate(
            [jnp.zeros_like(noises[:1]), jnp.sqrt(step) * jnp.cumsum(noises, axis=0)]
        )
        drift = diffrax.ODETerm(lambda t, x, args: 2.0 * fine(obs, x, t) - x / (t + step))
        diffusion = diffrax.ControlTerm(
            lambda t, x, args: lineax.DiagonalLinearOperator(
                memoryless_sigma(t, step) * jnp.ones_like(x)
            ),
            diffrax.LinearInterpolation(ts=sde_grid, ys=brownian),
        )
        sde_states = _solve_fixed_grid(diffrax.MultiTerm(drift, diffusion), x0, sde_grid)
    else:
        sde_states = x0[None]
    last_grid = grid[-2:]
    ode_states = _solve_fixed_grid(
        diffrax.ODETerm(lambda t, x, args: base(obs, x, t)), sde_states[-1], last_grid
    )
    return jnp.concatenate([sde_states, ode_states[1:]])


def _memoryless_rollout_scan(fine, base, obs, x0, noises):
    """`memoryless_rollout` as one `lax.scan` over the K − 1 SDE steps, then the base ODE step."""
    num_steps = noises.shape[0] + 1
    step = 1.0 / num_steps
    grid = time_grid(num_steps)

    def sde_step(x, t_and_noise):
        t, noise = t_and_noise
        drift = 2.0 * fine(obs, x, t) - x / (t + step)
        x_next = x + step * drift + jnp.sqrt(step) * memoryless_sigma(t, step) * noise
        return x_next, x_next

    x_last, sde_states = jax.lax.scan(sde_step, x0, (grid[: num_steps - 1], noises))
    x_final = x_last + step * base(obs, x_last, grid[num_steps - 1])
    return jnp.concatenate([x0[None], sde_states, x_final[None]])


def _state_index(t: Float[Array, ""], num_steps: int) -> Array:
    """Index i of the step t_i → t_{i+1} that ends at time t (the backward solve is at t = t_{i+1})."""
    return jnp.clip(jnp.round(t * num_steps).astype(jnp.int32) - 1, 0, num_steps - 1)


def _drift_jacobian_transpose_product(
    base: VelocityFn,
    obs: Array,
    x: Array,
    adjoint: Array,
    index: Array,
    num_steps: int,
    scheme: Scheme,
) -> Array:
    """J_iᵀ ã for the lean/basic adjoint recursion, with J_i as the chosen `scheme` defines it."""
    step = 1.0 / num_steps
    t_i = index.astype(jnp.float32) / num_steps
    if scheme == "reference":
        t_query = t_i + step  # velocity at t_i + h, divisor t_i + h (METHODS §4.3)

        def drift(y):
            return 2.0 * base(obs, y, t_query) - y / t_query

        _, vjp = jax.vjp(drift, x)
        return vjp(adjoint)[0]

    def sde_drift(y):
        return 2.0 * base(obs, y, t_i) - y / (t_i + step)

    def ode_drift(y):
        return base(obs, y, t_i)

    is_last = index == num_steps - 1
    # Both branches are cheap relative to the rest; lax.cond would become a select under vmap anyway.
    _, vjp_sde = jax.vjp(sde_drift, x)
    _, vjp_ode = jax.vjp(ode_drift, x)
    return jnp.where(is_last, vjp_ode(adjoint)[0], vjp_sde(adjoint)[0])


def _backward_adjoint(
    increment: Callable[[Array, Array, Array], Array],
    states: Float[Array, "k+1 d"],
    terminal: Float[Array, " d"],
) -> Float[Array, "k+1 d"]:
    """Solve dã/dt = −increment(i, x_i, ã) backwards from t = 1 to 0 with Euler on the grid.

    One Euler step of size −h from t_{i+1} gives ã_i = ã_{i+1} + h·increment(i, x_i, ã_{i+1}).
    Returns ã_0 … ã_K (time-ordered).
    """
    num_steps = states.shape[0] - 1
    if current_integrator() == "scan":
        step = 1.0 / num_steps

        def backward_step(adjoint, index):
            adjoint = adjoint + step * increment(index, states[index], adjoint)
            return adjoint, adjoint

        _, earlier = jax.lax.scan(backward_step, terminal, jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))
        return jnp.concatenate([earlier[::-1], terminal[None]])
    backward_grid = time_grid(num_steps)[::-1]

    def vector_field(t, adjoint, args):
        index = _state_index(t, num_steps)
        return -increment(index, states[index], adjoint)

    reversed_adjoints = _solve_fixed_grid(diffrax.ODETerm(vector_field), terminal, backward_grid)
    return reversed_adjoints[::-1]


def lean_adjoint(
    base: VelocityFn,
    obs: Float[Array, " obs"],
    states: Float[Array, "k+1 d"],
    terminal: Float[Array, " d"],
    scheme: Scheme = "reference",
) -> Float[Array, "k+1 d"]:
    """Lean adjoint ã_0 … ã_K (QAM, Li & Levine 2026, eq. for ã; METHODS §4.3).

    ã_K = `terminal` (= −λ ∇_x Q(s, x_K)); ã_i = ã_{i+1} + h J_iᵀ ã_{i+1} with J_i the Jacobian of
    the *base* drift only, so no fine-tuned network (and no gradient) enters the adjoint.
    """
    check_scheme(scheme)
    num_steps = states.shape[0] - 1

    def increment(index, x, adjoint):
        return _drift_jacobian_transpose_product(base, obs, x, adjoint, index, num_steps, scheme)

    return _backward_adjoint(increment, states, terminal)


def basic_adjoint(
    fine: VelocityFn,
    base: VelocityFn,
    obs: Float[Array, " obs"],
    states: Float[Array, "k+1 d"],
    terminal: Float[Array, " d"],
    scheme: Scheme = "consistent",
) -> Float[Array, "k+1 d"]:
    """Basic adjoint of adjoint matching (Domingo-Enrich et al. 2025, "basic adjoint" ODE).

    dã/dt = −[∇_x b_θ(X_t, t)ᵀ ã + ∇_x ½‖u(X_t, t)‖²],  u = (2/σ)(v_θ − v̄_β),  b_θ the drift of the
    fine SDE. Discretised with the same grid and `scheme` as `lean_adjoint`; the SDE steps use the
    fine drift's Jacobian, the last (ODE) step the base field's (it is the base field that takes
    that step). The running-cost gradient enters as h·∇_x ½‖u_i‖² on the SDE steps. With
    v_θ = v̄_β, u ≡ 0 and it coincides with the lean adjoint; under `"consistent"` it is the exact
    gradient of Σ_{i<K−1} h ½‖u_i(x_i)‖² − λ Q(x_K) with respect to x_i, noise held fixed.
    """
    check_scheme(scheme)
    num_steps = states.shape[0] - 1
    step = 1.0 / num_steps

    def increment(index, x, adjoint):
        t_i = index.astype(jnp.float32) / num_steps
        drift_time = t_i + step if scheme == "reference" else t_i
        is_last = index == num_steps - 1

        def fine_drift(y):
            return 2.0 * fine(obs, y, drift_time) - y / (t_i + step)

        def running_cost(y):
            sigma = memoryless_sigma(t_i, step)
            control = (2.0 / sigma) * (fine(obs, y, t_i) - base(obs, y, t_i))
            return 0.5 * jnp.sum(jnp.square(control))

        _, vjp_fine = jax.vjp(fine_drift, x)
        sde_increment = vjp_fine(adjoint)[0] + jax.grad(running_cost)(x)
        last_increment = _drift_jacobian_transpose_product(
            base, obs, x, adjoint, index, num_steps, scheme
        )
        return jnp.where(is_last, last_increment, sde_increment)

    return _backward_adjoint(increment, states, terminal)
