"""The memoryless SDE rollout and the adjoints (flowrl/sde.py).

- Golden: the diffrax rollout and lean adjoint reproduce a plain hand-written scan of the
  reference recursion (METHODS.md §4.3) for both discretisation schemes.
- Agreement: with fine field = base field, the lean adjoint, the basic adjoint and `jax.grad`
  through the discretised SDE (noise held fixed) agree — exactly under the "consistent" scheme,
  and to O(h) under the "reference" scheme (which is therefore a different discretisation).
- Basic adjoint with fine ≠ base equals `jax.grad` of the discretised control cost.

Every test runs under both integrator backends (`flowrl.integrate`: diffrax and lax.scan), so
the two are pinned to the same hand-written recursion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl.integrate import INTEGRATORS, use_integrator
from flowrl.networks import VelocityField
from flowrl.sde import basic_adjoint, lean_adjoint, memoryless_rollout, sigma_schedule

OBS = 2
DIM = 3


@pytest.fixture(autouse=True, params=INTEGRATORS)
def integrator(request):
    with use_integrator(request.param):
        yield request.param


def _fields(key):
    fine_key, base_key = jax.random.split(key)
    return (
        VelocityField(OBS, DIM, (32, 32), key=fine_key),
        VelocityField(OBS, DIM, (32, 32), key=base_key),
    )


def _q(obs, action):
    """A smooth non-linear critic (so Jacobians matter): Q = Σ sin(a) + 0.5·(obs·a[:2])."""
    return jnp.sum(jnp.sin(2.0 * action)) + 0.5 * jnp.dot(obs, action[:OBS])


def _noise(key, num_steps):
    x0_key, eps_key = jax.random.split(key)
    return jax.random.normal(x0_key, (DIM,)), jax.random.normal(eps_key, (num_steps - 1, DIM))


def hand_rollout(fine, base, obs, x0, eps):
    """The reference forward recursion, written out step by step with Python floats for t."""
    num_steps = eps.shape[0] + 1
    h = 1.0 / num_steps
    states = [x0]
    x = x0
    for i in range(num_steps - 1):
        t = i / num_steps
        sigma = np.sqrt(2.0 * (1.0 - t + h) / (t + h))
        x = x + h * (2.0 * fine(obs, x, jnp.float32(t)) - x / (t + h)) + np.sqrt(h) * sigma * eps[i]
        states.append(x)
    x = x + h * base(obs, x, jnp.float32((num_steps - 1) / num_steps))
    states.append(x)
    return jnp.stack(states)


def hand_lean_adjoint(base, obs, states, terminal, scheme):
    num_steps = states.shape[0] - 1
    h = 1.0 / num_steps
    adjoint = terminal
    adjoints = [adjoint]
    for i in range(num_steps - 1, -1, -1):
        t = i / num_steps
        if scheme == "reference":
            drift = lambda y, tq=t + h: 2.0 * base(obs, y, jnp.float32(tq)) - y / tq  # noqa: E731
        elif i == num_steps - 1:
            drift = lambda y, tq=t: base(obs, y, jnp.float32(tq))  # noqa: E731
        else:
            drift = lambda y, tq=t: 2.0 * base(obs, y, jnp.float32(tq)) - y / (tq + h)  # noqa: E731
        _, vjp = jax.vjp(drift, states[i])
        adjoint = adjoint + h * vjp(adjoint)[0]
        adjoints.append(adjoint)
    return jnp.stack(adjoints[::-1])


def test_sigma_schedule_matches_reference_values():
    expected = np.array([22, 10, 6, 4, 2.8, 2, 10 / 7, 1, 2 / 3, 0.4])
    np.testing.assert_allclose(np.asarray(sigma_schedule(10)) ** 2, expected, rtol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 10])
def test_rollout_matches_hand_written_scan(num_steps):
    fine, base = _fields(jax.random.key(0))
    obs = jnp.array([0.3, -0.7])
    x0, eps = _noise(jax.random.key(1), num_steps)
    got = memoryless_rollout(fine, base, obs, x0, eps)
    want = hand_rollout(fine, base, obs, x0, eps)
    assert got.shape == (num_steps + 1, DIM)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # The last step is an ODE step with the *base* field: replacing base changes only x_K.
    other_base = VelocityField(OBS, DIM, (32, 32), key=jax.random.key(9))
    moved = memoryless_rollout(fine, other_base, obs, x0, eps)
    np.testing.assert_allclose(moved[:-1], got[:-1])
    assert not np.allclose(moved[-1], got[-1])


@pytest.mark.parametrize("scheme", ["reference", "consistent"])
def test_lean_adjoint_matches_hand_written_scan(scheme):
    fine, base = _fields(jax.random.key(2))
    obs = jnp.array([0.1, 0.5])
    x0, eps = _noise(jax.random.key(3), 10)
    states = memoryless_rollout(fine, base, obs, x0, eps)
    terminal = -2.0 * jax.grad(lambda a: _q(obs, a))(states[-1])
    got = lean_adjoint(base, obs, states, terminal, scheme)
    want = hand_lean_adjoint(base, obs, states, terminal, scheme)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[-1], terminal)


def test_reference_scheme_queries_velocity_at_t_plus_h():
    """The two schemes must differ (else the switch would be meaningless) — by O(h)."""
    fine, base = _fields(jax.random.key(4))
    obs = jnp.array([0.2, 0.2])
    x0, eps = _noise(jax.random.key(5), 10)
    states = memoryless_rollout(fine, base, obs, x0, eps)
    terminal = -jax.grad(lambda a: _q(obs, a))(states[-1])
    reference = lean_adjoint(base, obs, states, terminal, "reference")
    consistent = lean_adjoint(base, obs, states, terminal, "consistent")
    assert float(jnp.max(jnp.abs(reference - consistent))) > 1e-3


def _grad_through_sde(fine, base, obs, eps, states, index, inv_temp, running_cost: bool):
    """∂/∂x_i of [Σ_{j≥i, j<K−1} h·½‖u_j‖² − λ Q(x_K)] through the discretised SDE, noise fixed."""
    num_steps = states.shape[0] - 1
    h = 1.0 / num_steps

    def cost(x):
        total = 0.0
        for j in range(index, num_steps - 1):
            t = j / num_steps
            sigma = np.sqrt(2.0 * (1.0 - t + h) / (t + h))
            if running_cost:
                u = (2.0 / sigma) * (fine(obs, x, jnp.float32(t)) - base(obs, x, jnp.float32(t)))
                total = total + h * 0.5 * jnp.sum(u**2)
            x = x + h * (2.0 * fine(obs, x, jnp.float32(t)) - x / (t + h)) + np.sqrt(h) * sigma * eps[j]
        x = x + h * base(obs, x, jnp.float32((num_steps - 1) / num_steps))
        return total - inv_temp * _q(obs, x)

    return jax.grad(cost)(states[index])


def test_lean_basic_and_autodiff_agree_when_fine_equals_base():
    _, base = _fields(jax.random.key(6))
    obs = jnp.array([-0.4, 0.9])
    x0, eps = _noise(jax.random.key(7), 10)
    inv_temp = 1.5
    states = memoryless_rollout(base, base, obs, x0, eps)
    terminal = -inv_temp * jax.grad(lambda a: _q(obs, a))(states[-1])
    for scheme in ("consistent", "reference"):
        lean = lean_adjoint(base, obs, states, terminal, scheme)
        basic = basic_adjoint(base, base, obs, states, terminal, scheme)
        np.testing.assert_allclose(lean, basic, atol=1e-6)
    lean = lean_adjoint(base, obs, states, terminal, "consistent")
    reference = lean_adjoint(base, obs, states, terminal, "reference")
    for index in range(10):
        autodiff = _grad_through_sde(base, base, obs, eps, states, index, inv_temp, False)
        np.testing.assert_allclose(lean[index], autodiff, atol=1e-5, rtol=1e-4)
        # The paper's scheme is a different (O(h)) discretisation of the same adjoint ODE.
        scale = float(jnp.max(jnp.abs(autodiff))) + 1e-6
        assert float(jnp.max(jnp.abs(reference[index] - autodiff))) / scale < 0.5


def test_basic_adjoint_is_gradient_of_control_cost_when_fine_differs():
    fine, base = _fields(jax.random.key(8))
    obs = jnp.array([0.7, -0.2])
    x0, eps = _noise(jax.random.key(10), 6)
    inv_temp = 0.8
    states = memoryless_rollout(fine, base, obs, x0, eps)
    terminal = -inv_temp * jax.grad(lambda a: _q(obs, a))(states[-1])
    basic = basic_adjoint(fine, base, obs, states, terminal, "consistent")
    lean = lean_adjoint(base, obs, states, terminal, "consistent")
    for index in range(6):
        autodiff = _grad_through_sde(fine, base, obs, eps, states, index, inv_temp, True)
        np.testing.assert_allclose(basic[index], autodiff, atol=1e-5, rtol=1e-4)
    # …and it is not the lean adjoint when the fields differ.
    assert float(jnp.max(jnp.abs(basic[0] - lean[0]))) > 1e-3


def test_rollout_noise_enters_with_sqrt_h_sigma():
    """Zero fields: x_{i+1} = x_i (1 − h/(t_i+h)) + sqrt(h) σ_i ε_i, hand-computed for K = 2."""
    zero = lambda obs, x, t: jnp.zeros_like(x)  # noqa: E731
    x0 = jnp.array([1.0, 2.0, 3.0])
    eps = jnp.array([[1.0, 0.0, -1.0]])
    states = memoryless_rollout(zero, zero, jnp.zeros(OBS), x0, eps)
    # K = 2, h = 0.5, t_0 = 0: x_1 = x0·(1 − 0.5/0.5) + sqrt(0.5)·sqrt(2·1.5/0.5)·ε = sqrt(3)·ε
    np.testing.assert_allclose(states[1], np.sqrt(3.0) * np.array([1.0, 0.0, -1.0]), atol=1e-6)
    np.testing.assert_allclose(states[2], states[1], atol=1e-7)
