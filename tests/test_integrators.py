"""The two integrator backends (`flowrl.integrate`: diffrax, lax.scan) compute the same thing.

tests/test_sde.py pins the SDE rollout and adjoints of both to a hand-written recursion; here the
flow ODE sampler and whole extractor losses and gradients (QAM: rollout + lean adjoint; BAM:
back-propagation through the rollout; FBRAC: back-propagation through the ODE) agree between
backends, and the selection itself (gin binding, override, bad name) behaves.
"""

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl.errors import ConfigError
from flowrl.flow import euler_ode_sample
from flowrl.integrate import current_integrator, use_integrator
from flowrl.networks import VelocityField
import extractors  # noqa: F401  (registers the strategies)
from flowrl.registry import REGISTRY
from tests.helpers import tiny_batch, tiny_context


def test_euler_ode_sample_agrees_and_is_the_hand_recursion():
    field = VelocityField(2, 3, (16, 16), key=jax.random.key(0))
    obs, noise = jnp.array([0.3, -0.2]), jnp.array([0.5, -1.0, 2.0])
    x = noise
    for i in range(5):
        x = x + 0.2 * field(obs, x, jnp.float32(i / 5))
    outputs = {}
    for backend in ("diffrax", "scan"):
        with use_integrator(backend):
            outputs[backend] = euler_ode_sample(field, obs, noise, 5, clip=False)
        np.testing.assert_allclose(outputs[backend], x, rtol=1e-6, atol=1e-6)
    with use_integrator("scan"):
        clipped = euler_ode_sample(field, obs, 10.0 * noise, 5)
    assert float(jnp.max(jnp.abs(clipped))) <= 1.0


@pytest.mark.parametrize("name", ["qam", "bam", "fbrac"])
def test_extractor_loss_and_gradient_agree_between_backends(name):
    key = jax.random.key(1)
    ctx = tiny_context(key)
    batch = tiny_batch(jax.random.fold_in(key, 1))
    extractor = REGISTRY[name](hidden_dims=(16, 16), flow_steps=4)
    params = extractor.init(ctx, key=jax.random.fold_in(key, 2))
    results = {}
    for backend in ("diffrax", "scan"):
        with use_integrator(backend):
            def loss_fn(p):
                loss, _ = extractor.loss(p, ctx, batch, key=jax.random.fold_in(key, 3))
                return loss

            results[backend] = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(params)
    (loss_d, grad_d), (loss_s, grad_s) = results["diffrax"], results["scan"]
    np.testing.assert_allclose(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_d)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_selection_by_gin_override_and_error():
    assert current_integrator() == "diffrax"
    gin.parse_config("flowrl.integrator.backend = 'scan'")
    assert current_integrator() == "scan"
    with use_integrator("diffrax"):
        assert current_integrator() == "diffrax"
    assert current_integrator() == "scan"
    gin.parse_config("flowrl.integrator.backend = 'rk4'")
    with pytest.raises(ConfigError, match="flowrl.integrator.backend = 'rk4'"):
        current_integrator()
    with pytest.raises(ConfigError, match="not one of diffrax, scan"):
        with use_integrator("euler"):
            pass


def test_cli_parse_records_the_backend_and_rejects_a_bad_one():
    from flowrl.cli import parse_gin

    parse_gin(["qam/cube-double-play.gin"], ["train.env_name='cube-double-play-singletask-task2-v0'",
                                              "flowrl.integrator.backend='scan'"])
    assert "integrator.backend = 'scan'" in gin.operative_config_str()
    gin.clear_config()
    with pytest.raises(ConfigError, match="not one of diffrax, scan"):
        parse_gin(["qam/cube-double-play.gin"], ["flowrl.integrator.backend='rk45'"])
