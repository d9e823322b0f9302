"""CGQL (guided flow + time-conditioned critic) and QSM / DAC (DDPM policies): hand-computed pieces.

METHODS.md §5.4 and §5.5. The contract and smoke suites cover the generic behaviour; this file
checks the maths specific to these methods, and that every gin config carries the §8.2 values.
"""

import math

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extractors  # noqa: F401  (registers the strategies)
from extractors._ddpm import (
    NoiseNetwork,
    dac_actor_loss,
    ddpm_example_loss,
    ddpm_sample,
    ddpm_schedule,
    denoised_estimate,
    mask_invalid,
    posterior_mean,
    qsm_actor_loss,
)
from extractors.cgql import (
    CGQL,
    CGQLMSE,
    CGQLLinex,
    TimeConditionedCriticEnsemble,
    guided_velocity,
    linex_loss,
)
from extractors.dac import DAC
from extractors.qsm import QSM
from flowrl.agent import AgentConfig, init_agent
from flowrl.analytic import GaussianMixture
from flowrl.cli import parse_gin
from flowrl.extractor import Context
from flowrl.flow import euler_ode_sample
from flowrl.networks import VelocityField
from flowrl.train import train
from tests.helpers import CHUNK_DIM, HIDDEN, OBS_DIM, tiny_batch, tiny_context

# ---- toy modules with known values ------------------------------------------------------------


class LinearCritic(eqx.Module):
    """Q_e(s, a, t) = w·a + e + k·t (E = 2 members), so ∇_a mean_e Q = w at every t."""

    weight: jax.Array
    time_slope: float = 0.0

    def at_time(self, obs, action, t):
        return jnp.dot(self.weight, action) + jnp.arange(2.0) + self.time_slope * t

    def __call__(self, obs, action):
        return self.at_time(obs, action, 1.0)


class ConstantCritic(eqx.Module):
    """Q_e(s, a, t) = value for every member, input and time."""

    value: jax.Array

    def at_time(self, obs, action, t):
        return jnp.full((2,), self.value) + 0.0 * jnp.sum(action) + 0.0 * t

    def __call__(self, obs, action):
        return self.at_time(obs, action, 1.0)


class LinearNoise(eqx.Module):
    """ε̂(s, x, t) = 0.3·x + 0.05·t: a stand-in ε-network with a known output."""

    action_dim: int = eqx.field(static=True)

    def __call__(self, obs, x, t):
        return 0.3 * x + 0.05 * jnp.asarray(t, x.dtype)


# ---- DDPM schedule, sampler and losses (QSM / DAC, METHODS §5.5) -----------------------------


def test_vp_schedule_hand_values():
    schedule = ddpm_schedule(10)
    # β_1 = 1 − exp(−0.1/10 − 0.5·9.9·1/100) = 1 − exp(−0.0595)
    np.testing.assert_allclose(schedule.betas[1], 1.0 - math.exp(-0.0595), rtol=1e-6)
    # β_10 = 1 − exp(−0.01 − 4.95·19/100)
    np.testing.assert_allclose(schedule.betas[10], 1.0 - math.exp(-0.01 - 4.95 * 0.19), rtol=1e-6)
    assert float(schedule.betas[0]) == 0.0 and float(schedule.alpha_bars[0]) == 1.0
    # The exponents telescope: ᾱ_T = exp(−0.1 − 4.95) for every T.
    for steps in (1, 5, 10):
        np.testing.assert_allclose(ddpm_schedule(steps).alpha_bars[-1], math.exp(-5.05), rtol=1e-5)
    assert schedule.betas.shape == (11,) and schedule.num_steps == 10


def test_posterior_mean_of_a_noise_free_state_is_the_previous_clean_state():
    """μ̃_t(sqrt(ᾱ_t)·x_0, x_0) = sqrt(ᾱ_{t−1})·x_0 (the DDPM posterior mean algebra), and μ̃_1 = x̂_0."""
    schedule = ddpm_schedule(10)
    x0 = jnp.array([0.3, -0.7, 0.9])
    for t in (1, 2, 5, 10):
        x_t = jnp.sqrt(schedule.alpha_bars[t]) * x0
        np.testing.assert_allclose(
            posterior_mean(schedule, x_t, x0, jnp.asarray(t)), jnp.sqrt(schedule.alpha_bars[t - 1]) * x0, rtol=1e-5
        )
    np.testing.assert_allclose(posterior_mean(schedule, jnp.array([5.0, 1.0, 2.0]), x0, jnp.asarray(1)), x0, rtol=1e-6)
    # x̂_0 inverts the forward noising when ε̂ is the true noise.
    eps = jnp.array([1.0, -2.0, 0.5])
    x_t = jnp.sqrt(schedule.alpha_bars[4]) * x0 + jnp.sqrt(1.0 - schedule.alpha_bars[4]) * eps
    np.testing.assert_allclose(denoised_estimate(schedule, x_t, eps, jnp.asarray(4)), x0, rtol=1e-5, atol=1e-6)


def _reference_sampler(noise_fn, start, step_noises, steps, clip_before, clip_after):
    """The reference recursion written out in float64 numpy with an independent schedule."""
    t_grid = np.arange(1, steps + 1)
    betas = np.concatenate([[0.0], 1.0 - np.exp(-0.1 / steps - 0.5 * 9.9 * (2 * t_grid - 1) / steps**2)])
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)
    x = np.asarray(start, np.float64)
    for index, t in enumerate(range(steps, 0, -1)):
        x0 = (x - np.sqrt(1 - alpha_bars[t]) * noise_fn(x, t)) / np.sqrt(alpha_bars[t])
        if clip_before:
            x0 = np.clip(x0, -1, 1)
            x = (np.sqrt(alpha_bars[t - 1]) * betas[t] * x0 + np.sqrt(alphas[t]) * (1 - alpha_bars[t - 1]) * x) / (
                1 - alpha_bars[t]
            )
        else:
            x = x0
        if t > 1:
            x = x + np.sqrt(betas[t]) * np.asarray(step_noises[index], np.float64)
        if clip_after:
            x = np.clip(x, -1, 1)
    return np.clip(x, -1, 1)


@pytest.mark.parametrize("clip_before,clip_after", [(False, True), (True, False), (False, False)])
def test_ddpm_sampler_matches_the_written_out_recursion(clip_before, clip_after, getkey):
    steps, dim = 5, 3
    key = getkey()
    start_key, step_key = jax.random.split(jax.random.clone(key))
    start = jax.random.normal(start_key, (dim,))
    step_noises = jax.random.normal(step_key, (steps, dim))
    got = ddpm_sample(
        LinearNoise(dim), ddpm_schedule(steps), jnp.zeros(OBS_DIM), clip_before=clip_before,
        clip_after=clip_after, key=key,
    )
    want = _reference_sampler(lambda x, t: 0.3 * x + 0.05 * t, start, step_noises, steps, clip_before, clip_after)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_qsm_target_is_minus_lambda_times_the_q_gradient(getkey):
    """QSM regresses ε̂ onto −λ∇Q: the implied score −ε̂/sqrt(1 − ᾱ) points *up* the critic."""
    grad = jnp.array([1.0, -2.0, 0.5])
    assert float(qsm_actor_loss(-3.0 * grad, grad, jnp.asarray(3.0))) == 0.0
    np.testing.assert_allclose(qsm_actor_loss(3.0 * grad, grad, jnp.asarray(3.0)), 4 * 9 * jnp.mean(grad**2))
    # End to end, with a linear critic (∇_x Q = w at the noisy action): an ε-network that outputs
    # exactly −λw has zero Q-loss, and the denoised estimate moves along +w.
    weight = jnp.array([0.5, -1.0, 2.0, 0.0])
    inv_temp = jnp.asarray(2.0)

    class Predicts(eqx.Module):
        def __call__(self, obs, x, t):
            return -inv_temp * weight + 0.0 * x

    schedule = ddpm_schedule(10)
    loss, metrics = ddpm_example_loss(
        Predicts(), LinearCritic(weight), schedule, jnp.zeros(OBS_DIM), jnp.zeros(4), jnp.asarray(1.0),
        loss_type="qsm", inv_temp=inv_temp, bc_weight=jnp.asarray(0.0), valid_as_power=False, key=getkey(),
    )
    assert float(metrics["q_loss"]) == 0.0 and float(loss) == 0.0
    x_t = jnp.zeros(4)
    shift = denoised_estimate(schedule, x_t, Predicts()(None, x_t, 3), jnp.asarray(3))
    assert float(jnp.dot(weight, shift)) > 0.0


def test_dac_loss_hand_value():
    grad, eps_pred = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    alpha_bar = jnp.asarray(0.64)  # sqrt(1 − ᾱ) = 0.6
    np.testing.assert_allclose(dac_actor_loss(eps_pred, grad, alpha_bar), 0.6 * (0.5 - 0.5) / 2, atol=1e-7)
    np.testing.assert_allclose(dac_actor_loss(jnp.array([1.0, 1.0]), grad, alpha_bar), 0.6 * (-1.0) / 2, rtol=1e-6)


def test_valid_power_quirk_changes_the_value_not_the_gradient():
    """METHODS §9.5: ℓ^valid vs ℓ·valid — invalid rows log 1 instead of 0, with the same (zero) gradient."""
    losses = jnp.array([0.5, 2.0, -0.3, 0.0])  # DAC's loss can be negative; 0 must not give NaN
    valid = jnp.array([1.0, 0.0, 1.0, 0.0])

    def batch(ls, as_power):
        return jnp.mean(jax.vmap(lambda l, v: mask_invalid(l, v, as_power=as_power))(ls, valid))

    np.testing.assert_allclose(batch(losses, True), (0.5 + 1.0 - 0.3 + 1.0) / 4, rtol=1e-6)
    np.testing.assert_allclose(batch(losses, False), (0.5 - 0.3) / 4, rtol=1e-6)
    grad_power, grad_product = jax.grad(batch)(losses, True), jax.grad(batch)(losses, False)
    np.testing.assert_array_equal(grad_power, grad_product)
    np.testing.assert_array_equal(grad_power, valid / 4)


def test_noise_network_shapes_and_time_dependence(getkey):
    net = NoiseNetwork(OBS_DIM, CHUNK_DIM, HIDDEN, 8, key=getkey())
    assert net.fourier_kernel.shape == (4, 1) and net.time_features(jnp.asarray(3)).shape == (8,)
    obs, x = jnp.ones(OBS_DIM), jnp.ones(CHUNK_DIM)
    assert net(obs, x, jnp.asarray(1)).shape == (CHUNK_DIM,)
    assert not np.allclose(net(obs, x, jnp.asarray(1)), net(obs, x, jnp.asarray(7)))
    # Features of the integer step: cos/sin of 2π t W.
    np.testing.assert_allclose(net.time_features(jnp.asarray(0)), jnp.concatenate([jnp.ones(4), jnp.zeros(4)]))


def test_qsm_and_dac_defaults_are_the_paper_sampler_settings():
    assert QSM().clip_sampler_after and not QSM().clip_sampler_before
    assert DAC().clip_sampler_before and not DAC().clip_sampler_after
    assert not hasattr(DAC(), "inv_temp")  # the reference's DAC ignores λ


# ---- CGQL (METHODS §5.4) ----------------------------------------------------------------------


def test_time_conditioned_critic_at_one_is_its_call(getkey):
    critic = TimeConditionedCriticEnsemble(OBS_DIM, CHUNK_DIM, HIDDEN, 3, key=getkey())
    obs, action = jax.random.normal(getkey(), (OBS_DIM,)), jax.random.normal(getkey(), (CHUNK_DIM,))
    assert critic(obs, action).shape == (3,)
    np.testing.assert_array_equal(critic(obs, action), critic.at_time(obs, action, jnp.asarray(1.0)))
    assert not np.allclose(critic.at_time(obs, action, 0.3), critic(obs, action))  # t is an input
    assert len(set(np.asarray(critic(obs, action)).round(6).tolist())) == 3  # independent members


def test_cgql_builds_the_time_conditioned_shared_critic(getkey):
    config = AgentConfig(horizon=2, batch_size=8, num_critics=3, actor_hidden_dims=HIDDEN, critic_hidden_dims=HIDDEN)
    state = init_agent(CGQLMSE(), config, OBS_DIM, CHUNK_DIM, key=getkey())
    assert isinstance(state.online.critic, TimeConditionedCriticEnsemble)
    assert isinstance(state.target_critic, TimeConditionedCriticEnsemble)
    assert state.online.extractor is None


def _context_with_time_critic(key) -> Context:
    context_key, critic_key = jax.random.split(key)
    ctx = tiny_context(context_key)
    critic = TimeConditionedCriticEnsemble(OBS_DIM, CHUNK_DIM, HIDDEN, 3, key=critic_key)
    return Context(ctx.behavior_flow, ctx.target_behavior_flow, critic, critic, OBS_DIM, CHUNK_DIM)


@eqx.filter_jit
def _guided(extractor, ctx, obs, noise):
    return extractor.noise_to_action(None, ctx, obs, noise)


@eqx.filter_jit
def _plain(field, obs, noise):
    return euler_ode_sample(field, obs, noise, 10)


@pytest.mark.parametrize("cls", [CGQL, CGQLMSE, CGQLLinex])
def test_guidance_off_is_the_plain_euler_sampler_of_the_base(cls, getkey):
    ctx = _context_with_time_critic(getkey())
    obs, noise = jax.random.normal(getkey(), (OBS_DIM,)), jax.random.normal(getkey(), (CHUNK_DIM,))
    off = cls(inv_temp=0.0)
    np.testing.assert_allclose(
        _guided(off, ctx, obs, noise), _plain(ctx.target_behavior_flow, obs, noise), rtol=1e-6, atol=1e-6
    )
    online = cls(inv_temp=0.0, target_guidance=False)
    np.testing.assert_allclose(
        _guided(online, ctx, obs, noise), _plain(ctx.behavior_flow, obs, noise), rtol=1e-6, atol=1e-6
    )
    on = cls(inv_temp=10.0, guidance_coef=0.1)
    assert not np.allclose(_guided(on, ctx, obs, noise), _guided(off, ctx, obs, noise))


def test_guided_velocity_hand_value_and_dilation_switch(getkey):
    base = VelocityField(OBS_DIM, CHUNK_DIM, HIDDEN, key=getkey())
    weight = jnp.array([1.0, -1.0, 0.5, 2.0])
    critic = LinearCritic(weight)
    obs, x = jnp.ones(OBS_DIM), jnp.array([0.2, -0.4, 0.6, 0.0])
    lam, eta, t = jnp.asarray(3.0), jnp.asarray(0.1), jnp.asarray(0.25)
    v = base(obs, x, t)

    def velocity(time, dilation):
        return guided_velocity(base, critic, obs, x, time, inv_temp=lam, guidance_coef=eta,
                               critic_time_is_one=False, dilation=dilation)

    np.testing.assert_allclose(velocity(t, True), v + (0.1 / 0.25) * (3.0 * 0.75 * weight + x), rtol=1e-5)
    np.testing.assert_allclose(velocity(t, False), v + (0.1 / 0.25) * (3.0 * 0.75 * weight), rtol=1e-5)
    assert not np.allclose(velocity(t, True), velocity(t, False))
    # The first Euler step (t = 0) is never guided.
    np.testing.assert_array_equal(velocity(jnp.asarray(0.0), True), base(obs, x, jnp.asarray(0.0)))


class GaussianSoftCritic(eqx.Module):
    """The exact noisy soft critic of a linear Q under a Gaussian behaviour N(μ, s²I) (closed form).

    Q_t(x) = (1/λ) log E[exp(λ w·a) | x_t = x] = k(t)·w·x + const, k(t) = t s² / (t² s² + (1 − t)²),
    since a | x_t is Gaussian with mean μ + k(t)(x − tμ). k(1) = 1: Q_1 = Q.
    """

    weight: jax.Array
    var: float

    def at_time(self, obs, action, t):
        gain = t * self.var / (t * t * self.var + (1.0 - t) ** 2)
        return jnp.full((2,), gain * jnp.dot(self.weight, action))

    def __call__(self, obs, action):
        return self.at_time(obs, action, 1.0)


def test_exact_noisy_critic_guidance_samples_the_tilted_gaussian(getkey):
    """Closed-form check: with the exact noisy critic, η = 1 and no dilation, guidance is exact.

    ṽ = v + ((1 − t)/t)·λ∇Q_t is the velocity of π_β·exp(λQ) = N(μ + λs²w, s²I); Euler with K = 100
    steps (the unguided first step included) lands within sampling error. The parity dilation
    term (+x/t) changes the law completely at η = 1.
    """
    var, weight, lam = 0.0625, jnp.array([1.0, -1.0]), 4.0
    behaviour = GaussianMixture([1.0], [[0.0, 0.0]], [var * jnp.eye(2)])
    critic = GaussianSoftCritic(weight, var)
    ctx = Context(behaviour, behaviour, critic, critic, 0, 2)
    noise = jax.random.normal(getkey(), (2000, 2))

    def samples(dilation):
        extractor = CGQLLinex(inv_temp=lam, guidance_coef=1.0, guidance_dilation=dilation, flow_steps=100)
        return eqx.filter_jit(jax.vmap(lambda z: extractor.noise_to_action(None, ctx, jnp.zeros(0), z)))(noise)

    exact = samples(False)
    np.testing.assert_allclose(jnp.mean(exact, axis=0), lam * var * weight, atol=0.02)  # (0.25, −0.25)
    np.testing.assert_allclose(jnp.std(exact, axis=0), math.sqrt(var), atol=0.02)
    assert float(jnp.min(jnp.std(samples(True), axis=0))) > 0.5


def test_simple_mode_guides_with_the_clean_critic_and_mse_with_the_noisy_one():
    """t′ = 1 (simple) vs t′ = t (mse/linex): a critic whose time input scales its gradient tells them apart."""

    class TimeScaledCritic(eqx.Module):
        def at_time(self, obs, action, t):
            return jnp.full((2,), t * jnp.sum(action))

        def __call__(self, obs, action):
            return self.at_time(obs, action, 1.0)

    base = lambda obs, x, t: jnp.zeros_like(x)  # noqa: E731
    x, t = jnp.zeros(3), jnp.asarray(0.5)
    kwargs = dict(inv_temp=jnp.asarray(1.0), guidance_coef=jnp.asarray(1.0), dilation=False)
    simple = guided_velocity(base, TimeScaledCritic(), None, x, t, critic_time_is_one=True, **kwargs)
    noisy = guided_velocity(base, TimeScaledCritic(), None, x, t, critic_time_is_one=False, **kwargs)
    np.testing.assert_allclose(simple, jnp.full(3, 1.0), rtol=1e-6)  # (1/t)·(1−t)·1
    np.testing.assert_allclose(noisy, jnp.full(3, 0.5), rtol=1e-6)  # (1/t)·(1−t)·t


def test_linex_piecewise_hand_values():
    lam, clip = jnp.asarray(2.0), jnp.asarray(5.0)
    # δ = 2·(1 − 0.5) = 1 ≤ 5: exp(1) + 2·0.5
    np.testing.assert_allclose(linex_loss(jnp.asarray(0.5), jnp.asarray(1.0), lam, clip), math.e + 1.0, rtol=1e-6)
    # δ = 2·(0 − (−3)) = 6 > 5: linear branch, value δ
    np.testing.assert_allclose(linex_loss(jnp.asarray(-3.0), jnp.asarray(0.0), lam, clip), 6.0, rtol=1e-6)
    # In the linear branch the gradient in Q is −λ and nothing overflows far out.
    g = jax.grad(lambda q: linex_loss(q, jnp.asarray(0.0), lam, clip))(jnp.asarray(-500.0))
    np.testing.assert_allclose(g, -2.0)


def test_linex_minimiser_is_the_soft_maximum():
    """E_T[ℓ(Q, T)] is minimised at Q* = (1/λ) log E[exp(λT)] (above the mean for λ > 0)."""
    lam, clip = jnp.asarray(2.0), jnp.asarray(5.0)
    targets, probs = jnp.array([0.0, 1.0]), jnp.array([0.7, 0.3])

    def expected(q):
        return jnp.sum(probs * linex_loss(q, targets, lam, clip))

    q_star = math.log(0.7 + 0.3 * math.exp(2.0)) / 2.0
    np.testing.assert_allclose(jax.grad(expected)(jnp.asarray(q_star)), 0.0, atol=1e-5)
    assert float(expected(jnp.asarray(q_star))) < min(float(expected(jnp.asarray(q_star + d))) for d in (-0.05, 0.05))
    assert q_star > 0.3  # risk-seeking: above E[T]


@pytest.mark.parametrize("cls,per_member", [
    (CGQLMSE, lambda q, target, lam: (q - target) ** 2),
    (CGQLLinex, lambda q, target, lam: math.exp(lam * (target - q)) + lam * q),
])
def test_noisy_critic_loss_weighting_hand_value(cls, per_member, getkey):
    """c · mean_b[ mean_e ℓ(Q_e(s, ã, τ), Q̄_e(s, a, 1)) · valid_b ] with constant critics."""
    ctx = tiny_context(getkey())
    ctx = Context(ctx.behavior_flow, ctx.target_behavior_flow, ConstantCritic(jnp.asarray(0.5)),
                  ConstantCritic(jnp.asarray(1.5)), OBS_DIM, CHUNK_DIM)
    extractor = cls(inv_temp=0.5, noisy_coef=0.1)
    batch = tiny_batch(getkey())
    loss, metrics = extractor.auxiliary_critic_loss(None, ctx.critic, ctx, batch, key=getkey())
    raw = per_member(0.5, 1.5, 0.5) * float(jnp.mean(batch.valid))
    np.testing.assert_allclose(metrics["noisy_loss"], raw, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.1 * raw, rtol=1e-5)


def test_noisy_critic_loss_trains_the_shared_critic_and_simple_has_none(getkey):
    ctx = _context_with_time_critic(getkey())
    batch = tiny_batch(getkey())
    arrays, static = eqx.partition(ctx.critic, eqx.is_inexact_array)

    def aux(critic_arrays, extractor, key):
        critic = eqx.combine(critic_arrays, static)
        return extractor.auxiliary_critic_loss(None, critic, ctx, batch, key=key)[0]

    grads = eqx.filter_jit(jax.grad(aux))(arrays, CGQLLinex(), getkey())
    assert any(bool(jnp.any(g != 0.0)) for g in jax.tree.leaves(grads))
    assert float(aux(arrays, CGQL(), getkey())) == 0.0


# ---- gin configs carry the paper values (METHODS §8.2) ---------------------------------------

DOMAINS = (
    "antmaze-large-navigate", "antmaze-giant-navigate", "humanoidmaze-medium-navigate",
    "humanoidmaze-large-navigate", "cube-double-play", "cube-triple-play", "cube-quadruple-play",
    "scene-play", "puzzle-3x3-play", "puzzle-4x4-play",
)
PAPER = {  # name -> per-domain {field: value}, in DOMAINS order (METHODS §8.2)
    "cgql": dict(inv_temp=[10] * 10, guidance_coef=[0.1, 0.1, 0.01, 0.01, 0.01, 0.1, 0.1, 0.1, 0.1, 0.1]),
    "cgql-mse": dict(
        inv_temp=[10] * 10,
        guidance_coef=[0.1, 0.1, 0.1, 0.1, 0.01, 0.1, 0.01, 0.1, 0.1, 1.0],
        noisy_coef=[0.1, 0.001, 0.1, 0.1, 0.001, 0.001, 0.1, 0.1, 0.1, 0.001],
    ),
    "cgql-linex": dict(
        inv_temp=[10] * 10,
        guidance_coef=[0.1, 0.1, 0.1, 0.1, 0.01, 0.1, 0.01, 0.1, 0.1, 1.0],
        noisy_coef=[0.001, 0.001, 0.1, 0.1, 0.001, 0.001, 0.1, 0.1, 0.001, 0.001],
    ),
    "qsm": dict(inv_temp=[10, 10, 10, 10, 1, 10, 1, 3, 10, 10], alpha=[10, 10, 30, 30, 10, 10, 10, 30, 30, 1]),
    "dac": dict(alpha=[0.3, 0.3, 1, 0.3, 3, 0.3, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_configs_carry_the_paper_settings(name):
    for index, domain in enumerate(DOMAINS):
        parse_gin([f"{name}/{domain}.gin"], [])
        built = train(None, dry_run=True)
        extractor, agent = built["extractor"], built["agent"]
        for field, values in PAPER[name].items():
            assert float(getattr(extractor, field)) == pytest.approx(values[index]), (name, domain, field)
        assert agent.grad_clip_norm == (1.0 if name in ("qsm", "dac") else None), (name, domain)
        if name in ("qsm", "dac"):
            assert extractor.diffusion_steps == 10
            assert extractor.clip_sampler_after == (name == "qsm")
            assert extractor.clip_sampler_before == (name == "dac")
        else:
            assert extractor.flow_steps == 10 and extractor.target_guidance and extractor.guidance_dilation
        gin.clear_config()
