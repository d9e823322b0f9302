"""The closed forms of flowrl.analytic themselves (ANALYTIC-CHECK.md §1), independent of any extractor.

Velocity field (§1.2): boundary values, agreement with a direct (solve-based) formula, the
conditional-expectation property E[(u − v(x_t)) φ(x_t)] = 0, and Euler with many steps reproducing
the mixture. Tilted mixtures (§1.1): exact density ratio and importance-weighted Monte Carlo.
The single-Gaussian identity of §1.3, QAM's discrete fixed point (§1.4, the T1 numbers) and its
agreement with flowrl.sde.lean_adjoint, and the metrics. Budget: < 20 s of CPU.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal

from flowrl.analytic import (
    AnalyticError,
    GaussianMixture,
    LinearCritic,
    QuadraticCritic,
    bam_gaussian_linear_fixed_point,
    cell_fractions,
    effective_temperature,
    fit_extractor,
    gaussian_linear_fixed_point,
    make_problem,
    max_marginal_w1,
    mode_weight_error,
    moment_errors,
    sample_batch_unclipped,
    wasserstein1_marginal,
)
from flowrl.extractor import AbstractExtractor, Context
from flowrl.sde import lean_adjoint

NO_OBS = jnp.zeros((0,))


def direct_velocity(mixture: GaussianMixture, x: jax.Array, t: float) -> jax.Array:
    """§1.2 written with explicit covariances and solves (no eigendecomposition), for t in (0, 1)."""
    eye = jnp.eye(mixture.dim)
    path_covs = (1 - t) ** 2 * eye[None] + t**2 * mixture.covs
    log_dens = jnp.stack(
        [multivariate_normal.logpdf(x, t * mixture.means[k], path_covs[k]) for k in range(mixture.num_components)]
    )
    resp = jax.nn.softmax(jnp.log(mixture.weights) + log_dens)
    terms = [
        mixture.means[k]
        + (t * mixture.covs[k] - (1 - t) * eye) @ jnp.linalg.solve(path_covs[k], x - t * mixture.means[k])
        for k in range(mixture.num_components)
    ]
    return resp @ jnp.stack(terms)


@pytest.mark.parametrize("name", ["1d3", "2d-mild"])
def test_velocity_boundary_values(name):
    """v(x, 0) = E[a] − x (x_0 independent of x_1) and v(x, 1) = x (§1.2)."""
    mixture = make_problem(name).behaviour
    xs = jax.random.normal(jax.random.key(0), (16, mixture.dim)) * 1.5
    field = jax.jit(jax.vmap(lambda x, t: mixture(NO_OBS, x, t), in_axes=(0, None)))
    at_zero, at_one = field(xs, 0.0), field(xs, 1.0)
    np.testing.assert_allclose(at_zero, mixture.mean()[None, :] - xs, atol=1e-5)
    np.testing.assert_allclose(at_one, xs, atol=1e-5)


def test_velocity_matches_direct_formula():
    """The eigenbasis evaluation equals the explicit-solve formula of §1.2 at interior times."""
    mixture = make_problem("2d-mild").behaviour
    xs = jax.random.normal(jax.random.key(1), (8, 2))
    times = jnp.array([0.1, 0.5, 0.9, 0.99])
    on_grid = lambda f: jax.jit(jax.vmap(jax.vmap(f, in_axes=(0, None)), in_axes=(None, 0)))  # noqa: E731
    fast = on_grid(mixture.velocity)(xs, times)
    slow = on_grid(lambda x, t: direct_velocity(mixture, x, t))(xs, times)
    np.testing.assert_allclose(fast, slow, atol=2e-4, rtol=1e-4)


def test_velocity_is_conditional_expectation():
    """E[(u − v(x_t)) φ(x_t)] = 0 for test functions φ, u = x_1 − x_0 (v = E[u | x_t]); 200k samples."""
    mixture = make_problem("2d-mild").behaviour
    data_key, noise_key = jax.random.split(jax.random.key(2))
    num = 200_000
    x1 = mixture.sample(data_key, num)
    x0 = jax.random.normal(noise_key, (num, 2))

    @jax.jit
    def orthogonality_moments(t):
        xt = (1 - t) * x0 + t * x1
        residual = (x1 - x0) - jax.vmap(lambda x: mixture.velocity(x, t))(xt)
        tests = jnp.stack([jnp.ones(num), xt[:, 0], xt[:, 1], jnp.square(xt[:, 0]), jnp.sin(3 * xt[:, 1])], axis=1)
        return jnp.einsum("nd,nf->df", residual, tests) / num

    for t in (0.3, 0.7):
        moments = orthogonality_moments(t)
        # Monte Carlo std of each moment is <= ~0.003 here; a wrong field (e.g. r_k dropped) gives > 0.05.
        assert float(jnp.max(jnp.abs(moments))) < 0.012, moments


def test_euler_many_steps_reproduces_mixture():
    """Euler with 200 steps of the exact field from N(0, I) reproduces mean, covariance and weights."""
    mixture = make_problem("2d-mild").behaviour
    noise = jax.random.normal(jax.random.key(3), (8192, 2))
    samples = sample_batch_unclipped(mixture, noise, 200)
    mean_err, cov_err = moment_errors(samples, mixture)
    # Sampling error of the mean at n = 8192 is ~0.005 per coordinate; Euler-200 bias ~2e-3 (§1.2).
    assert float(mean_err) < 0.015 and float(cov_err) < 0.015, (mean_err, cov_err)
    assert float(mode_weight_error(samples, mixture)) < 0.02
    assert float(max_marginal_w1(samples, mixture)) < 0.03


CRITICS = {
    "linear": LinearCritic(jnp.array([1.0, 0.5])),
    "quadratic": QuadraticCritic(jnp.array([[2.0, 0.3], [0.3, 1.0]]), jnp.array([0.5, 0.0])),
}


@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_tilted_density_is_behaviour_times_exp_tau_q(kind):
    """log π*(a) − log π_β(a) − τQ(a) is the same constant at every a (§1.1, exact)."""
    behaviour = make_problem("2d-mild").behaviour
    critic = CRITICS[kind]
    tau = 1.7
    target = critic.tilt(behaviour, tau)
    points = jax.random.normal(jax.random.key(4), (64, 2))
    log_ratio = lambda a: target.log_prob(a) - behaviour.log_prob(a) - tau * critic(NO_OBS, a)[0]  # noqa: E731
    gap = jax.jit(jax.vmap(log_ratio))(points)
    assert float(jnp.max(gap) - jnp.min(gap)) < 1e-4


@pytest.mark.parametrize("kind", sorted(CRITICS))
def test_tilted_moments_match_importance_weighted_monte_carlo(kind):
    """Mean, covariance and component weights of π* against self-normalised importance weights."""
    behaviour = make_problem("2d-mild").behaviour
    critic = CRITICS[kind]
    tau = 2.0
    target = critic.tilt(behaviour, tau)

    @jax.jit
    def weighted_moments(samples):
        weights = jax.nn.softmax(tau * jax.vmap(lambda a: critic(NO_OBS, a)[0])(samples))
        mean = weights @ samples
        centred = samples - mean[None, :]
        cov = jnp.einsum("n,ni,nj->ij", weights, centred, centred)
        # π_k' = E_π*[p_β(k | a)]: the tilted mass of component k.
        return mean, cov, weights @ jax.vmap(behaviour.responsibilities)(samples)

    mean, cov, comp = weighted_moments(behaviour.sample(jax.random.key(5), 400_000))
    np.testing.assert_allclose(mean, target.mean(), atol=4e-3)
    np.testing.assert_allclose(cov, target.covariance(), atol=4e-3)
    np.testing.assert_allclose(comp, target.weights, atol=4e-3)


def test_problem_targets_match_analytic_check():
    """The §2 target weights and mean (1d3: (0.014, 0.146, 0.839), mean 0.934; 2d-mild weights)."""
    one_d = make_problem("1d3").target
    np.testing.assert_allclose(one_d.weights, [0.0144, 0.1462, 0.8394], atol=2e-4)
    np.testing.assert_allclose(one_d.mean(), [0.9341], atol=2e-4)
    two_d = make_problem("2d-mild").target
    np.testing.assert_allclose(two_d.weights, [0.084, 0.191, 0.290, 0.435], atol=1e-3)


def test_single_gaussian_identity():
    """§1.3: v* − v_β = (1 − t) S(t)⁻¹ τΣw = (σ²/2) ∇ log h_t, h_t(x) = E[exp(τwᵀX_1) | X_t = x]."""
    problem = make_problem("t1")
    behaviour, target, tau = problem.behaviour, problem.target, problem.tau
    mu, cov, w = behaviour.means[0], behaviour.covs[0], problem.critic.w
    eye = jnp.eye(2)
    x = jnp.array([0.3, -0.4])

    @jax.jit
    @jax.vmap
    def three_ways(t):
        path_cov = (1 - t) ** 2 * eye + t**2 * cov
        difference = target.velocity(x, t) - behaviour.velocity(x, t)
        closed_form = (1 - t) * jnp.linalg.solve(path_cov, tau * cov @ w)

        def log_h(y):
            # X_1 | X_t = y is Gaussian: mean μ + tΣS⁻¹(y − tμ), covariance independent of y.
            conditional_mean = mu + t * cov @ jnp.linalg.solve(path_cov, y - t * mu)
            return tau * w @ conditional_mean

        half_sigma_sq = (1 - t) / t
        return difference, closed_form, half_sigma_sq * jax.grad(log_h)(x)

    difference, closed_form, guidance = three_ways(jnp.array([0.2, 0.5, 0.8]))
    np.testing.assert_allclose(difference, closed_form, atol=1e-5)
    np.testing.assert_allclose(difference, guidance, atol=1e-5)
    # 1-D form of the note: τ s² w (1 − t) / S(t).
    s, t = 0.3, 0.4
    gauss = GaussianMixture(jnp.ones(1), jnp.zeros((1, 1)), jnp.full((1, 1, 1), s * s))
    tilted = LinearCritic(jnp.ones(1)).tilt(gauss, tau)
    expected = tau * s * s * (1 - t) / ((1 - t) ** 2 + t**2 * s * s)
    x1 = jnp.array([0.7])
    np.testing.assert_allclose(tilted.velocity(x1, t) - gauss.velocity(x1, t), [expected], atol=1e-6)


def test_t1_discrete_fixed_point_numbers():
    """The T1 instance of §1.4: m_K = (0.4756, 0.0686), P_K and D_i as tabulated."""
    problem = make_problem("t1")
    b = problem.behaviour
    fixed = gaussian_linear_fixed_point(b.means[0], b.covs[0], problem.critic.w, problem.tau, 10)
    np.testing.assert_allclose(fixed.final_mean, [0.4756, 0.0686], atol=6e-5)
    np.testing.assert_allclose(fixed.final_cov, [[0.0613, 0.0222], [0.0222, 0.0243]], atol=6e-5)
    table = [
        (-0.021, -0.011), (0.044, 0.022), (0.102, 0.051), (0.171, 0.085), (0.263, 0.131),
        (0.395, 0.198), (0.572, 0.292), (0.739, 0.402), (0.714, 0.488), (0.44, 0.44),
    ]  # fmt: skip
    np.testing.assert_allclose(fixed.offsets, table, atol=6e-4)
    # Continuous-time target μ + τΣw = (0.44, 0.04); the base sampler (D = 0) keeps the mean μ.
    np.testing.assert_allclose(problem.target.mean(), [0.44, 0.04], atol=1e-6)
    zero_tilt = gaussian_linear_fixed_point(b.means[0], b.covs[0], problem.critic.w, 0.0, 10)
    np.testing.assert_allclose(zero_tilt.final_mean, b.means[0], atol=1e-6)
    np.testing.assert_allclose(zero_tilt.final_cov, fixed.final_cov, atol=1e-7)


def test_discrete_shift_ratio_table():
    """§1.4 table: discrete/exact mean-shift ratio for N(0, s²), K = 10: 6.94 (s=.05), 1.98 (.1), 1.32 (.2)."""
    for s, ratio in ((0.05, 6.94), (0.1, 1.98), (0.2, 1.32), (0.5, 1.05)):
        fixed = gaussian_linear_fixed_point(jnp.zeros(1), jnp.full((1, 1), s * s), jnp.ones(1), 2.0, 10)
        assert abs(float(fixed.final_mean[0]) / (2.0 * s * s) - ratio) < 0.01


@pytest.mark.parametrize("scheme", ["reference", "consistent"])
def test_fixed_point_adjoint_matches_flowrl_sde(scheme):
    """With the exact Gaussian field the lean adjoint is state-independent and equals the closed form."""
    problem = make_problem("t1")
    b = problem.behaviour
    fixed = gaussian_linear_fixed_point(b.means[0], b.covs[0], problem.critic.w, problem.tau, 10, scheme)
    states = jax.random.normal(jax.random.key(6), (11, 2))  # any states: the Jacobians are constant
    adjoints = lean_adjoint(b, NO_OBS, states, -problem.tau * problem.critic.w, scheme)
    np.testing.assert_allclose(adjoints, fixed.adjoints, atol=1e-5, rtol=1e-5)


def test_bam_fixed_point_is_consistent_adjoint_at_h_lambda():
    """BAM's optimum (λ = Kτ) uses the consistent adjoint at τ = hλ, shifted one step; last offset 0."""
    problem = make_problem("t1")
    b = problem.behaviour
    bam = bam_gaussian_linear_fixed_point(b.means[0], b.covs[0], problem.critic.w, 20.0, 10)
    consistent = gaussian_linear_fixed_point(b.means[0], b.covs[0], problem.critic.w, 2.0, 10, "consistent")
    sigma_sq = 2.0 * (1.0 - jnp.arange(10) / 10 + 0.1) / (jnp.arange(10) / 10 + 0.1)
    np.testing.assert_allclose(bam.offsets[:-1], -0.5 * sigma_sq[:-1, None] * consistent.adjoints[1:-1], atol=1e-6)
    np.testing.assert_allclose(bam.offsets[-1], [0.0, 0.0])
    np.testing.assert_allclose(bam.final_mean, [0.4536, 0.0476], atol=1e-4)


def test_wasserstein_against_hand_computed_values():
    """W1(δ_0, N(0, 1)) = sqrt(2/π); W1 of a translate by δ is |δ|; a same-law sample is close."""
    gauss = GaussianMixture(jnp.ones(1), jnp.zeros((1, 1)), jnp.ones((1, 1, 1)))
    assert abs(float(wasserstein1_marginal(jnp.zeros(1), gauss, 0)) - math.sqrt(2 / math.pi)) < 1e-4
    samples = gauss.sample(jax.random.key(7), 4096)
    base = float(wasserstein1_marginal(samples[:, 0], gauss, 0))
    shifted = float(wasserstein1_marginal(samples[:, 0] + 0.4, gauss, 0))
    assert base < 0.04 and abs(shifted - 0.4) < base + 1e-3


def test_temperature_and_weight_metrics_recover_known_tilt():
    """Exact samples of the τ = 1.5 tilt give τ_eff ≈ 1.5 and small weight error; behaviour gives ≈ 0."""
    problem = make_problem("1d3")
    tilted = problem.critic.tilt(problem.behaviour, 1.5)
    samples = tilted.sample(jax.random.key(8), 16384)
    tau_eff = float(effective_temperature(samples, problem.behaviour, problem.critic, tilted))
    assert abs(tau_eff - 1.5) < 0.15
    assert float(mode_weight_error(samples, tilted)) < 0.02
    np.testing.assert_allclose(jnp.sum(cell_fractions(samples, tilted)), 1.0, atol=1e-6)
    behaviour_samples = problem.behaviour.sample(jax.random.key(9), 16384)
    behaviour_tau = effective_temperature(behaviour_samples, problem.behaviour, problem.critic, problem.target)
    assert abs(float(behaviour_tau)) < 0.15


def test_invalid_mixtures_raise_one_clear_error():
    with pytest.raises(AnalyticError, match="shapes disagree"):
        GaussianMixture(jnp.ones(2), jnp.zeros((3, 1)), jnp.ones((3, 1, 1)))
    with pytest.raises(AnalyticError, match="positive definite"):
        GaussianMixture(jnp.ones(1), jnp.zeros((1, 2)), jnp.array([[[1.0, 2.0], [2.0, 1.0]]]))
    with pytest.raises(AnalyticError, match="weights"):
        GaussianMixture(jnp.array([0.5, -0.5]), jnp.zeros((2, 1)), jnp.ones((2, 1, 1)))


class _Quadratic(AbstractExtractor):
    """A toy extractor with loss ‖θ − 1‖² (no network), to test the training loop cheaply."""

    def init(self, ctx, *, key):
        return jnp.zeros(3)

    def loss(self, params, ctx, batch, *, key):
        loss = jnp.sum(jnp.square(params - 1.0)) + 0.0 * jnp.sum(batch.observations)
        return loss, {"loss": loss}

    def sample(self, params, ctx, obs, *, key):
        return params


def test_fit_extractor_chunks_and_schedule():
    """Chunked scans give the same result as one scan (extra steps in the last chunk are no-ops)."""
    ctx = Context(None, None, None, None, obs_dim=0, action_dim=3)
    losses: list[float] = []
    chunked = fit_extractor(
        _Quadratic(), ctx, steps=7, chunk_size=3, lr=0.1, key=jax.random.key(10), losses=losses
    )
    whole = fit_extractor(_Quadratic(), ctx, steps=7, chunk_size=7, lr=0.1, key=jax.random.key(10))
    assert len(losses) == 7 and losses[-1] < losses[0]
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    # Adam's first steps move each coordinate by ≈ lr; 7 steps with cosine decay stay below 7·lr.
    assert 0.2 < float(chunked[0]) < 0.7
    with pytest.raises(AnalyticError, match="steps"):
        fit_extractor(_Quadratic(), ctx, steps=0, key=jax.random.key(11))


def test_gaussian_mixture_is_a_pytree_module():
    """The mixture can be closed over, vmapped and jitted like any equinox module."""
    mixture = make_problem("1d3").behaviour
    jitted = eqx.filter_jit(lambda m, x: m(NO_OBS, x, 0.5))
    x = jnp.array([0.2])
    np.testing.assert_allclose(jitted(mixture, x), mixture.velocity(x, 0.5), atol=1e-6)
