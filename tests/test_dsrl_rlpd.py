"""DSRL (METHODS.md §5.6) and RLPD (§5.10): loss pieces against hand-computed values, gradient
routing of the stop-gradients, the parity quirks and their switches (§9.9, §9.10), and the
per-domain paper settings of their gin configs (§8.2).

Hand-made critics and flows are plain callables in the `Context` (the extractors only call them),
so expected values can be worked out on paper: a constant ensemble Q_e = c_e has mean and std
known exactly, and the field v(s, x, t) = −x sends z to z·(1 − 1/K)^K under K Euler steps.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from extractors.dsrl import DSRL
from extractors.rlpd import RLPD
from flowrl.cli import parse_gin
from flowrl.errors import ConfigError
from flowrl.extractor import Context, frozen_context_loss
from flowrl.flow import euler_ode_sample
from flowrl.train import train
from tests.helpers import CHUNK_DIM, HIDDEN, HORIZON, OBS_DIM, tiny_batch, tiny_context

MEMBER_VALUES = jnp.array([1.0, 3.0])  # mean 2, population std 1


def constant_critic(obs, action):
    return MEMBER_VALUES + 0.0 * jnp.sum(action) + 0.0 * jnp.sum(obs)


def hand_context(key, *, critic=constant_critic) -> Context:
    """Online flow v = +x, EMA flow v̄ = −x (so the two are told apart), a hand-made critic."""
    real = tiny_context(key)
    return Context(
        behavior_flow=lambda s, x, t: x,
        target_behavior_flow=lambda s, x, t: -x,
        critic=critic,
        target_critic=critic,
        obs_dim=real.obs_dim,
        action_dim=real.action_dim,
    )


def grads_of_metric(extractor, params, ctx, batch, key, metric):
    """∂ metrics[metric] / ∂ params (context frozen), as a params-shaped tree; `key` is not consumed."""
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    key = jax.random.clone(key)  # the same draws for every metric of one test

    def value(p):
        return frozen_context_loss(extractor, eqx.combine(p, static), ctx, batch, key=key)[1][metric]

    return jax.grad(value)(arrays)


def is_zero(tree) -> bool:
    return all(bool(jnp.all(leaf == 0.0)) for leaf in jax.tree.leaves(tree))


# ---- DSRL ---------------------------------------------------------------------------------------


def test_dsrl_sample_decodes_the_bounded_latent_with_the_ema_flow(getkey):
    extractor = DSRL(hidden_dims=HIDDEN, noise_scale=0.7)
    ctx = hand_context(getkey())
    params = extractor.init(tiny_context(getkey()), key=getkey())
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    key = getkey()
    w, _ = params.latent_policy.sample_and_log_prob(obs, key=jax.random.clone(key))
    action = extractor.sample(params, ctx, obs, key=key)
    # v̄ = −x: x_K = z·(1 − 1/K)^K with z = s_n·clip(w); the online field (+x) would grow z instead.
    expected = jnp.clip(0.7 * jnp.clip(w, -1.0, 1.0) * 0.9**10, -1.0, 1.0)
    np.testing.assert_allclose(action, expected, rtol=1e-5, atol=1e-6)


def test_dsrl_zero_noise_scale_gives_the_flow_of_zero(getkey):
    extractor = DSRL(hidden_dims=HIDDEN, noise_scale=0.0)
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    first, second = (extractor.sample(params, ctx, obs, key=getkey()) for _ in range(2))
    expected = euler_ode_sample(ctx.target_behavior_flow, obs, jnp.zeros(CHUNK_DIM), 10)
    np.testing.assert_allclose(first, expected, atol=1e-6)
    np.testing.assert_allclose(second, expected, atol=1e-6)


def test_dsrl_distillation_regresses_each_latent_member_on_each_critic_member(getkey):
    extractor = DSRL(hidden_dims=HIDDEN, latent_critic_members=2)
    ctx = hand_context(getkey())
    params = extractor.init(tiny_context(getkey()), key=getkey())
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    key = getkey()
    distill_key, _ = jax.random.split(jax.random.clone(key))
    latent = jax.random.normal(distill_key, (CHUNK_DIM,))  # quirk §9.10: z ~ N(0, I)
    expected = jnp.mean(jnp.square(params.latent_critic(obs, latent) - MEMBER_VALUES))
    _, metrics = extractor.example_loss(params, ctx, obs, key=key)
    np.testing.assert_allclose(metrics["distill_loss"], expected, rtol=1e-6)


def test_dsrl_temperature_loss_is_alpha_times_entropy_gap(getkey):
    extractor = DSRL(hidden_dims=HIDDEN, init_alpha=2.0)
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    _, metrics = extractor.loss(params, ctx, tiny_batch(getkey()), key=getkey())
    np.testing.assert_allclose(metrics["alpha"], 2.0, rtol=1e-6)
    # H_tgt = −0.5·D, so L_α = α·(entropy + 0.5·D).
    np.testing.assert_allclose(metrics["alpha_loss"], 2.0 * (metrics["entropy"] + 0.5 * CHUNK_DIM), rtol=1e-5)


@pytest.mark.parametrize("source", ["gaussian", "policy"])
def test_dsrl_stop_gradients_route_each_loss_to_its_own_part(source, getkey):
    extractor = DSRL(hidden_dims=HIDDEN, latent_distill_source=source)
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    batch, key = tiny_batch(getkey()), getkey()
    distill = grads_of_metric(extractor, params, ctx, batch, key, "distill_loss")
    actor = grads_of_metric(extractor, params, ctx, batch, key, "actor_loss")
    alpha = grads_of_metric(extractor, params, ctx, batch, key, "alpha_loss")
    # Q^z learns only from the distillation; π_z only from the actor loss (Q^z and α frozen
    # there); α only from its own loss.
    assert not is_zero(distill.latent_critic)
    assert is_zero(distill.latent_policy) and is_zero(distill.alpha)
    assert not is_zero(actor.latent_policy)
    assert is_zero(actor.latent_critic) and is_zero(actor.alpha)
    assert not is_zero(alpha.alpha)
    assert is_zero(alpha.latent_policy) and is_zero(alpha.latent_critic)


def test_dsrl_latent_sources_differ_gaussian_unbounded_policy_bounded(getkey):
    """Quirk §9.10: Q^z is fitted on N(0, I) latents, but π_z only ever emits s_n·[−1, 1]^D."""
    gaussian = DSRL(hidden_dims=HIDDEN, noise_scale=0.5)
    policy = dataclasses.replace(gaussian, latent_distill_source="policy")
    ctx = tiny_context(getkey())
    params = gaussian.init(ctx, key=getkey())
    obs = jax.random.normal(getkey(), (OBS_DIM,))
    keys = jax.random.split(getkey(), 256)
    draw = lambda ex, k: ex.distillation_latent(params, obs, CHUNK_DIM, key=k)  # noqa: E731
    gaussian_latents = jax.vmap(lambda k: draw(gaussian, k))(jax.random.clone(keys))
    policy_latents = jax.vmap(lambda k: draw(policy, k))(jax.random.clone(keys))
    assert float(jnp.max(jnp.abs(gaussian_latents))) > 0.5  # P(all 1024 draws within ±0.5) ≈ 0
    assert float(jnp.max(jnp.abs(policy_latents))) <= 0.5
    # The policy source draws exactly the latent the policy acts with.
    acted = jax.vmap(lambda k: policy.policy_latent(params, obs, key=k))(keys)
    np.testing.assert_array_equal(policy_latents, acted)

    batch, key = tiny_batch(getkey()), getkey()
    loss_gaussian = gaussian.loss(params, ctx, batch, key=jax.random.clone(key))[1]["distill_loss"]
    loss_policy = policy.loss(params, ctx, batch, key=key)[1]["distill_loss"]
    assert not np.isclose(float(loss_gaussian), float(loss_policy))


def test_dsrl_latent_critic_defaults_to_the_shared_ensemble_size(getkey):
    ctx = tiny_context(getkey())  # 3 critic members
    assert DSRL(hidden_dims=HIDDEN).init(ctx, key=getkey()).latent_critic.num_members == 3
    assert DSRL(hidden_dims=HIDDEN, latent_critic_members=5).init(ctx, key=getkey()).latent_critic.num_members == 5


def test_dsrl_bad_latent_source_is_a_config_error():
    with pytest.raises(ConfigError, match="latent_distill_source"):
        DSRL(latent_distill_source="uniform")


# ---- RLPD ---------------------------------------------------------------------------------------


def test_rlpd_td_target_is_the_pessimistic_backup_without_entropy(getkey):
    extractor = RLPD(hidden_dims=HIDDEN)
    ctx = hand_context(getkey())
    params = extractor.init(tiny_context(getkey()), key=getkey())
    batch = tiny_batch(getkey())
    targets = extractor.td_target(params, ctx, batch, discount=jnp.asarray(0.99), horizon=HORIZON,
                                  rho=jnp.asarray(0.5), key=getkey())
    # y = R + γ^H·M·(mean − ρ·std) = −1 + 0.99²·(2 − 0.5·1), whatever a′ is.
    np.testing.assert_allclose(targets, np.full(8, -1.0 + 0.9801 * 1.5), rtol=1e-6)


def test_rlpd_entropy_bonus_switch_subtracts_alpha_log_prob(getkey):
    plain = RLPD(hidden_dims=HIDDEN, init_alpha=0.3)
    soft = dataclasses.replace(plain, td_entropy_bonus=True)
    ctx = hand_context(getkey())
    params = plain.init(tiny_context(getkey()), key=getkey())
    batch = tiny_batch(getkey())
    batch = eqx.tree_at(lambda b: b.masks, batch, jnp.array([1.0, 0.0] * 4))
    key = getkey()
    kwargs = dict(discount=jnp.asarray(0.99), horizon=HORIZON, rho=jnp.asarray(0.5))
    y_plain = plain.td_target(params, ctx, batch, key=jax.random.clone(key), **kwargs)
    y_soft = soft.td_target(params, ctx, batch, key=jax.random.clone(key), **kwargs)
    keys = jax.random.split(key, 8)
    _, next_log_probs = jax.vmap(lambda o, k: params.actor.sample_and_log_prob(o, key=k))(
        batch.next_observations, keys
    )
    expected = y_plain - 0.9801 * batch.masks * 0.3 * next_log_probs
    np.testing.assert_allclose(y_soft, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y_soft, y_plain)  # the switch changes the backup where M = 1
    np.testing.assert_array_equal(y_soft[1::2], y_plain[1::2])  # and nothing where M = 0


def test_rlpd_bc_term_is_the_clipped_data_log_likelihood(getkey):
    extractor = RLPD(hidden_dims=HIDDEN, bc_alpha=0.3)
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    batch = tiny_batch(getkey())
    # Put data actions exactly on the boundary: the clip to ±(1 − 1e−5) keeps atanh finite.
    batch = eqx.tree_at(lambda b: b.actions, batch, jnp.sign(batch.actions))
    _, metrics = extractor.loss(params, ctx, batch, key=getkey())
    clipped = jnp.clip(batch.chunked_actions, -(1 - 1e-5), 1 - 1e-5)
    log_likelihood = jax.vmap(params.actor.log_prob)(batch.observations, clipped)
    expected = -0.3 * jnp.mean(log_likelihood * batch.valid)
    assert bool(jnp.isfinite(expected))
    np.testing.assert_allclose(metrics["bc_loss"], expected, rtol=1e-5)
    off = dataclasses.replace(extractor, bc_alpha=0.0)
    assert float(off.loss(params, ctx, batch, key=getkey())[1]["bc_loss"]) == 0.0


def test_rlpd_actor_maximises_the_pessimistic_online_q(getkey):
    extractor = RLPD(hidden_dims=HIDDEN, rho=0.5, init_alpha=2.0)
    ctx = hand_context(getkey())
    params = extractor.init(tiny_context(getkey()), key=getkey())
    _, metrics = extractor.loss(params, ctx, tiny_batch(getkey()), key=getkey())
    np.testing.assert_allclose(metrics["q"], 2.0 - 0.5 * 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics["actor_loss"], 2.0 * -metrics["entropy"] - 1.5, rtol=1e-5)
    np.testing.assert_allclose(metrics["alpha_loss"], 2.0 * (metrics["entropy"] + 0.5 * CHUNK_DIM), rtol=1e-5)


def test_rlpd_stop_gradients_route_each_loss_to_its_own_part(getkey):
    extractor = RLPD(hidden_dims=HIDDEN, bc_alpha=0.1)
    ctx = tiny_context(getkey())
    params = extractor.init(ctx, key=getkey())
    batch, key = tiny_batch(getkey()), getkey()
    actor = grads_of_metric(extractor, params, ctx, batch, key, "actor_loss")
    alpha = grads_of_metric(extractor, params, ctx, batch, key, "alpha_loss")
    bc = grads_of_metric(extractor, params, ctx, batch, key, "bc_loss")
    assert not is_zero(actor.actor) and is_zero(actor.alpha)
    assert not is_zero(alpha.alpha) and is_zero(alpha.actor)
    assert not is_zero(bc.actor) and is_zero(bc.alpha)


# ---- gin configs (METHODS §8.2) -----------------------------------------------------------------

PAPER_DSRL_NOISE_SCALE = {
    "antmaze-large-navigate": 0.8, "antmaze-giant-navigate": 1.2, "humanoidmaze-medium-navigate": 0.6,
    "humanoidmaze-large-navigate": 0.8, "cube-double-play": 1.0, "cube-triple-play": 1.4,
    "cube-quadruple-play": 1.4, "scene-play": 0.4, "puzzle-3x3-play": 1.0, "puzzle-4x4-play": 1.0,
}
PAPER_RLPD_BC_ALPHA = {
    "antmaze-large-navigate": 0.0, "antmaze-giant-navigate": 0.01, "humanoidmaze-medium-navigate": 0.03,
    "humanoidmaze-large-navigate": 0.0, "cube-double-play": 0.1, "cube-triple-play": 0.0,
    "cube-quadruple-play": 0.0, "scene-play": 0.3, "puzzle-3x3-play": 0.01, "puzzle-4x4-play": 0.0,
}


def build(config: str) -> dict:
    parse_gin([config], [])
    return train(None, dry_run=True)


@pytest.mark.parametrize("domain", sorted(PAPER_DSRL_NOISE_SCALE))
def test_dsrl_configs_carry_the_paper_settings(domain):
    built = build(f"dsrl/{domain}.gin")
    extractor, agent = built["extractor"], built["agent"]
    assert isinstance(extractor, DSRL)
    assert float(extractor.noise_scale) == pytest.approx(PAPER_DSRL_NOISE_SCALE[domain])
    assert extractor.flow_steps == 10 and extractor.use_target_latent
    assert extractor.latent_distill_source == "gaussian"
    assert agent.grad_clip_norm is None and agent.num_critics == 10
    assert built["env_name"].startswith(domain + "-singletask-task")


@pytest.mark.parametrize("domain", sorted(PAPER_RLPD_BC_ALPHA))
def test_rlpd_configs_carry_the_paper_settings(domain):
    built = build(f"rlpd/{domain}.gin")
    extractor, agent = built["extractor"], built["agent"]
    assert isinstance(extractor, RLPD)
    assert float(extractor.bc_alpha) == pytest.approx(PAPER_RLPD_BC_ALPHA[domain])
    assert float(extractor.rho) == float(agent.rho) == (0.0 if "humanoid" in domain else 0.5)
    assert not extractor.td_entropy_bonus
    assert agent.grad_clip_norm is None and agent.num_critics == 10
