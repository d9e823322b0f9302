"""Core building blocks: import boundary, network conventions, critic maths, flow matching, EMA."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from flowrl.critic import chunked_td_target, ensemble_td_loss, pessimistic_value
from flowrl.flow import euler_ode_sample, flow_matching_loss
from flowrl.networks import MLP, CriticEnsemble, LayerNorm, VelocityField, ema_update

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_flowrl_never_imports_extractors():
    offenders = []
    for path in (ROOT / "flowrl").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "extractors"]
    assert not offenders, offenders


def test_mlp_conventions(getkey):
    mlp = MLP(5, (64, 64), 3, key=getkey(), layer_norm=True)
    for layer in mlp.layers:
        np.testing.assert_array_equal(layer.bias, 0.0)
        fan_out, fan_in = layer.weight.shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert float(jnp.max(jnp.abs(layer.weight))) <= limit
        assert float(jnp.max(jnp.abs(layer.weight))) > 0.8 * limit  # uniform, not normal-shrunk
    assert len(mlp.norms) == 2 and mlp.norms[0].eps == 1e-6
    # Order Dense → GELU(tanh) → LayerNorm, last layer linear.
    x = jax.random.normal(getkey(), (5,))
    h = x
    for i, layer in enumerate(mlp.layers):
        h = layer(h)
        if i < 2:
            h = jax.nn.gelu(h, approximate=True)
            mean, var = jnp.mean(h), jnp.var(h)
            h = (h - mean) / jnp.sqrt(var + 1e-6)
    np.testing.assert_allclose(mlp(x), h, atol=1e-5)


def test_layer_norm_normalises():
    y = LayerNorm(4)(jnp.array([1.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(jnp.mean(y), 0.0, atol=1e-6)
    np.testing.assert_allclose(jnp.var(y), 1.0, atol=1e-4)


def test_critic_ensemble_is_one_vectorised_call_of_independent_members(getkey):
    critic = CriticEnsemble(3, 2, (8, 8), num_members=5, key=getkey())
    assert critic.members.layers[0].weight.shape == (5, 8, 5)
    obs, action = jnp.ones(3), jnp.zeros(2)
    values = critic(obs, action)
    assert values.shape == (5,)
    assert len(set(np.asarray(values).round(6).tolist())) == 5  # independent initialisations
    # Member e equals the e-th slice evaluated on its own.
    member = jax.tree.map(lambda leaf: leaf[2] if isinstance(leaf, jax.Array) else leaf, critic.members)
    np.testing.assert_allclose(member(jnp.concatenate([obs, action]))[0], values[2], rtol=1e-6)


def test_velocity_field_takes_raw_time(getkey):
    field = VelocityField(2, 3, (8,), key=getkey())
    out0 = field(jnp.zeros(2), jnp.zeros(3), jnp.float32(0.0))
    out1 = field(jnp.zeros(2), jnp.zeros(3), jnp.float32(1.0))
    # With zero obs and x, the only input is t: v(0) = W2 gelu(b1) + b2 = b2 = 0 at init; v(1) ≠ 0.
    np.testing.assert_allclose(out0, 0.0, atol=1e-7)
    assert float(jnp.max(jnp.abs(out1))) > 0


def test_pessimistic_value_has_finite_gradient_when_members_agree():
    grad = jax.grad(lambda q: pessimistic_value(q, 0.5))(jnp.array([2.0, 2.0, 2.0]))
    np.testing.assert_allclose(grad, [1 / 3, 1 / 3, 1 / 3])
    grad_single = jax.grad(lambda q: pessimistic_value(q, 0.0))(jnp.array([5.0]))
    np.testing.assert_allclose(grad_single, [1.0])


def test_pessimistic_td_target_hand_computed():
    q_next = jnp.array([1.0, 3.0])  # mean 2, population std 1
    np.testing.assert_allclose(pessimistic_value(q_next, 0.5), 1.5)
    y = chunked_td_target(jnp.float32(-2.0), jnp.float32(1.0), q_next, 0.9, 3, 0.5)
    np.testing.assert_allclose(y, -2.0 + 0.9**3 * 1.5, rtol=1e-6)
    y_terminal = chunked_td_target(jnp.float32(-2.0), jnp.float32(0.0), q_next, 0.9, 3, 0.5)
    np.testing.assert_allclose(y_terminal, -2.0)
    loss = ensemble_td_loss(jnp.array([0.0, 2.0]), jnp.float32(1.0), jnp.float32(1.0))
    np.testing.assert_allclose(loss, 1.0)
    np.testing.assert_allclose(ensemble_td_loss(jnp.array([0.0, 2.0]), jnp.float32(1.0), jnp.float32(0.0)), 0.0)


def test_flow_matching_loss_is_zero_for_the_exact_field(getkey):
    """For a point mass at a, the rectified-flow target a − z is met by v(x, t) = (a − x)/(1 − t)."""
    action = jnp.array([0.3, -0.6])
    exact = lambda obs, x, t: (action - x) / (1.0 - t)  # noqa: E731
    losses = jax.vmap(lambda k: flow_matching_loss(exact, jnp.zeros(1), action, key=k))(
        jax.random.split(getkey(), 64)
    )
    np.testing.assert_allclose(losses, 0.0, atol=1e-6)
    # Euler with that field lands on a from any noise (exactly after the last step, t_{K−1} < 1).
    sample = euler_ode_sample(exact, jnp.zeros(1), jnp.array([2.0, -1.0]), 10)
    np.testing.assert_allclose(sample, action, atol=1e-5)


def test_ema_update_lags_by_one_step():
    online = {"w": jnp.array([1.0])}
    target = {"w": jnp.array([0.0])}
    np.testing.assert_allclose(ema_update(online, target, 0.005)["w"], [0.005])
