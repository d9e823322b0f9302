"""The contract every registered extractor satisfies, with no per-extractor code.

Parametrised over `flowrl.registry.REGISTRY`, so a new extractor is tested as soon as it is
registered. Extractors are built with their defaults; a `hidden_dims` field, where present, is
shrunk so the suite stays fast on a CPU.
"""

import dataclasses

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extractors  # noqa: F401  (registers the strategies)
from flowrl.agent import AgentConfig, init_agent, update
from flowrl.extractor import AbstractExtractor, frozen_context_loss
from flowrl.registry import REGISTRY
from tests.helpers import CHUNK_DIM, HIDDEN, HORIZON, OBS_DIM, tiny_batch, tiny_context


FLOW_STEPS = 3  # enough to exercise every loop; keeps compile and run times small


def shrink(module):
    """Shrink `hidden_dims` (and the number of flow / diffusion steps), also in nested extractors."""
    if not dataclasses.is_dataclass(module) or isinstance(module, type):
        return module
    changes = {}
    for field in dataclasses.fields(module):
        value = getattr(module, field.name)
        if field.name == "hidden_dims":
            changes[field.name] = HIDDEN
        elif field.name in ("flow_steps", "diffusion_steps") and isinstance(value, int):
            changes[field.name] = min(value, FLOW_STEPS)
        elif isinstance(value, eqx.Module):
            changes[field.name] = shrink(value)
    return dataclasses.replace(module, **changes) if changes else module


def build(name: str) -> AbstractExtractor:
    return shrink(REGISTRY[name]())


@pytest.fixture(params=sorted(REGISTRY))
def extractor(request) -> AbstractExtractor:
    return build(request.param)


def _inexact(tree):
    return eqx.filter(tree, eqx.is_inexact_array)


def test_registry_holds_abstract_extractors():
    assert {"qam", "bam"} <= set(REGISTRY)
    for name, cls in REGISTRY.items():
        assert issubclass(cls, AbstractExtractor), name
        assert not getattr(cls, "__abstractmethods__", None), f"{name} leaves methods abstract"


def test_init_is_pure(extractor, getkey):
    ctx = tiny_context(getkey())
    key = getkey()
    first = extractor.init(ctx, key=jax.random.clone(key))
    second = extractor.init(ctx, key=key)
    assert bool(eqx.tree_equal(first, second))
    chex.assert_tree_all_finite(_inexact(first))


def test_loss_is_finite_and_gradients_reach_only_the_extractor(extractor, getkey):
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    batch = tiny_batch(getkey())
    params_arrays, params_static = eqx.partition(params, eqx.is_inexact_array)
    ctx_arrays, ctx_static = eqx.partition(ctx, eqx.is_inexact_array)

    @eqx.filter_jit
    def loss_and_grads(p, c, key):
        def loss_of_arrays(p, c):
            return frozen_context_loss(
                extractor, eqx.combine(p, params_static), eqx.combine(c, ctx_static), batch, key=key
            )

        return jax.value_and_grad(loss_of_arrays, argnums=(0, 1), has_aux=True)(p, c)

    (loss, metrics), (param_grads, ctx_grads) = loss_and_grads(params_arrays, ctx_arrays, getkey())
    assert loss.shape == () and bool(jnp.isfinite(loss))
    assert "loss" in metrics
    for name, value in metrics.items():
        assert jnp.shape(value) == (), name
        assert bool(jnp.isfinite(value)), name
    for leaf in jax.tree.leaves(ctx_grads):
        assert bool(jnp.all(leaf == 0.0)), "a gradient leaked into the context"
    param_leaves = jax.tree.leaves(param_grads)
    if param_leaves:
        chex.assert_tree_all_finite(param_grads)
        assert any(bool(jnp.any(leaf != 0.0)) for leaf in param_leaves), "no gradient reaches params"


def test_sample_shape_bounds_and_determinism(extractor, getkey):
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    key = getkey()
    sample = jax.jit(lambda o, k: extractor.sample(params, ctx, o, key=k))
    first = sample(obs, jax.random.clone(key))
    again = sample(obs, key)
    assert first.shape == (CHUNK_DIM,)
    np.testing.assert_array_equal(first, again)
    assert bool(jnp.all((first >= -1.0) & (first <= 1.0)))
    others = [sample(obs, getkey()) for _ in range(3)]
    assert any(not np.array_equal(first, other) for other in others), "sampling ignores the key"


def _config() -> AgentConfig:
    return AgentConfig(
        horizon=HORIZON,
        batch_size=8,
        num_critics=3,
        actor_hidden_dims=HIDDEN,
        critic_hidden_dims=HIDDEN,
        grad_clip_norm=1.0,
    )


def test_jitted_update_traces_once(extractor, getkey):
    config = _config()
    state = init_agent(extractor, config, OBS_DIM, CHUNK_DIM, key=getkey())
    traces = []

    @eqx.filter_jit
    def step(state, batch, extractor, config, key):
        traces.append(None)
        return update(state, batch, extractor, config, key=key)

    for _ in range(3):
        state, metrics = step(state, tiny_batch(getkey()), extractor, config, getkey())
    # A different continuous hyperparameter value must not recompile either.
    config = dataclasses.replace(config, discount=jnp.asarray(0.9), rho=jnp.asarray(0.1))
    state, metrics = step(state, tiny_batch(getkey()), extractor, config, getkey())
    assert len(traces) == 1
    assert int(state.step) == 4
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())


def test_update_vmaps_over_three_seeds(extractor, getkey):
    config = _config()
    seed_keys = jax.random.split(getkey(), 3)
    states = eqx.filter_vmap(lambda k: init_agent(extractor, config, OBS_DIM, CHUNK_DIM, key=k))(seed_keys)
    batches = jax.vmap(lambda k: tiny_batch(k))(jax.random.split(getkey(), 3))
    update_keys = jax.random.split(getkey(), 3)
    new_states, metrics = eqx.filter_jit(
        eqx.filter_vmap(lambda s, b, k: update(s, b, extractor, config, key=k))
    )(states, batches, update_keys)
    assert metrics["loss/total"].shape == (3,)
    assert bool(jnp.all(jnp.isfinite(metrics["loss/total"])))
    # Seeds are independent: different initial parameters give different losses.
    assert len(set(np.asarray(metrics["loss/total"]).round(6).tolist())) == 3
    np.testing.assert_array_equal(new_states.step, np.ones(3))
