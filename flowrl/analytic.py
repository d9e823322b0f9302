r"""Closed forms for checking policy extractors against an exact answer (ANALYTIC-CHECK.md).

With a Gaussian-mixture behaviour policy and an analytic critic, everything an extractor such as
QAM needs — and the distribution it should produce — is known in closed form:

- `GaussianMixture`: π_β(a) = Σ_k π_k N(a; μ_k, Σ_k), its moments, marginal CDFs, sampler, and the
  *exact* marginal velocity field of the linear-interpolation flow x_t = (1 − t) x_0 + t x_1,
  x_0 ~ N(0, I) (ANALYTIC-CHECK §1.2). The module is callable as `(obs, x, t) -> v`, so it can be
  the behaviour flow of a `flowrl.extractor.Context`.
- `LinearCritic` Q(a) = wᵀa and `QuadraticCritic` Q(a) = −½(a − c)ᵀA(a − c), callable as
  `(obs, a) -> (1,)`, and the tilted mixtures π* ∝ π_β·exp(τQ) they induce (§1.1).
- `gaussian_linear_fixed_point`: QAM's exact *discrete* fixed point at K steps for a Gaussian
  behaviour and a linear Q, with the Euler-K mean and covariance it samples (§1.4, test T1);
  `bam_gaussian_linear_fixed_point`: the same for BAM's objective (METHODS §5.1, derived in
  docs/closed-form.md), sampled with `LastStepBase` (BAM never trains its last step).
- `SpreadEnsemble`: a two-member critic with constant spread, for extractors that differentiate
  mean − ρ·std over the ensemble (BAM; `jnp.std` has a NaN gradient when all members agree).
- Metrics against the closed form: exact per-dimension W1 against the mixture CDF, the effective
  temperature τ_eff, mode-weight error, mean and covariance errors (§2).
- `fit_extractor`: a plain Adam loop over `frozen_context_loss` (§6 "common setup"), and
  `sample_unclipped`: Euler-K samples of a fine field without the [−1, 1] clip (§6).

Everything is per example and pure JAX; batch with `vmap` outside (helpers that do are named so).
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree

from flowrl.batch import Batch
from flowrl.errors import FlowRLError
from flowrl.extractor import AbstractExtractor, Context, frozen_context_loss
from flowrl.flow import euler_ode_sample

__all__ = [
    "AnalyticError",
    "GaussianMixture",
    "LinearCritic",
    "QuadraticCritic",
    "SpreadEnsemble",
    "tilt_linear",
    "tilt_quadratic",
    "DiscreteFixedPoint",
    "gaussian_linear_fixed_point",
    "bam_gaussian_linear_fixed_point",
    "LastStepBase",
    "closed_form_context",
    "ClosedFormProblem",
    "make_problem",
    "PROBLEMS",
    "cell_fractions",
    "mode_weight_error",
    "effective_temperature",
    "wasserstein1_marginal",
    "max_marginal_w1",
    "moment_errors",
    "closed_form_metrics",
    "fit_extractor",
    "zero_observation_batch",
    "sample_unclipped",
    "sample_batch_unclipped",
]


class AnalyticError(FlowRLError):
    """A closed-form problem specified with inconsistent shapes or invalid values."""


def _is_concrete(*arrays: Array) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


# ------------------------------------------------------------------------------------------------
# Gaussian mixture and its exact flow-matching velocity (ANALYTIC-CHECK §1.2)
# ------------------------------------------------------------------------------------------------


@jax.jit
def _decompose(weights: Array, means: Array, covs: Array):
    """Normalised weights, symmetrised covariances, their eigendecomposition and validity checks.

    One compiled call instead of a dozen eager ops (mixtures are built often in tests and metrics).
    """
    covs = 0.5 * (covs + jnp.swapaxes(covs, -1, -2))
    eigvals, eigvecs = jnp.linalg.eigh(covs)
    total = jnp.sum(weights)
    weights_ok = jnp.all(jnp.isfinite(weights)) & jnp.all(weights >= 0) & (total > 0)
    means_ok = jnp.all(jnp.isfinite(means))
    return weights / total, covs, eigvals, eigvecs, (weights_ok, means_ok, jnp.min(eigvals, axis=-1))


class GaussianMixture(eqx.Module):
    r"""π(a) = Σ_k π_k N(a; μ_k, Σ_k) and the exact marginal velocity of its linear-interpolation flow.

    Calling the module, `mixture(obs, x, t)`, returns (obs ignored; ANALYTIC-CHECK §1.2)

        v(x, t) = Σ_k r_k(x, t) [μ_k + (t Σ_k − (1 − t) I) S_k(t)^{-1} (x − t μ_k)],
        S_k(t)  = (1 − t)² I + t² Σ_k,   r_k ∝ π_k N(x; t μ_k, S_k(t)),

    i.e. E[x_1 − x_0 | x_t = x] for x_t = (1 − t) x_0 + t x_1, x_0 ~ N(0, I), x_1 ~ π. Each Σ_k is
    diagonalised once (Σ_k = U_k diag(λ_k) U_kᵀ), so S_k and the gain are diagonal in that basis:
    no solves, smooth on t ∈ [0, 1], and v(x, 0) = E[a] − x, v(x, 1) = x.

    Fields: `weights` (k,) (normalised on construction), `means` (k, d), `covs` (k, d, d)
    symmetric positive definite; `eigvals` (k, d) and `eigvecs` (k, d, d) are derived.
    """

    weights: Float[Array, " k"]
    means: Float[Array, "k d"]
    covs: Float[Array, "k d d"]
    eigvals: Float[Array, "k d"]
    eigvecs: Float[Array, "k d d"]

    def __init__(self, weights: ArrayLike, means: ArrayLike, covs: ArrayLike):
        weights = jnp.asarray(weights, jnp.float32)
        means = jnp.asarray(means, jnp.float32)
        covs = jnp.asarray(covs, jnp.float32)
        if weights.ndim != 1 or means.ndim != 2 or covs.ndim != 3:
            raise AnalyticError(
                f"GaussianMixture needs weights (k,), means (k, d), covs (k, d, d); got shapes "
                f"{weights.shape}, {means.shape}, {covs.shape}: pass one row per component"
            )
        k, d = means.shape
        if weights.shape != (k,) or covs.shape != (k, d, d):
            raise AnalyticError(
                f"GaussianMixture shapes disagree: weights {weights.shape}, means {means.shape}, covs "
                f"{covs.shape}; expected ({k},), ({k}, {d}), ({k}, {d}, {d})"
            )
        self.weights, self.covs, self.eigvals, self.eigvecs, checks = _decompose(weights, means, covs)
        self.means = means
        if _is_concrete(weights, means, covs):
            weights_ok, means_ok, smallest_eigvals = checks
            if not bool(weights_ok):
                raise AnalyticError(
                    f"GaussianMixture weights must be finite, >= 0 and not all zero; got {weights.tolist()}"
                )
            if not bool(means_ok):
                raise AnalyticError("GaussianMixture means contain NaN/inf; pass finite component means")
            if not bool(jnp.all(smallest_eigvals > 0)):
                raise AnalyticError(
                    f"GaussianMixture covs must be positive definite; smallest eigenvalue per component "
                    f"{smallest_eigvals.tolist()}"
                )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> Float[Array, " d"]:
        """m = Σ_k π_k μ_k."""
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "d d"]:
        """C = Σ_k π_k (Σ_k + (μ_k − m)(μ_k − m)ᵀ)."""
        centred = self.means - self.mean()[None, :]
        spread = jnp.einsum("k,ki,kj->ij", self.weights, centred, centred)
        return jnp.einsum("k,kij->ij", self.weights, self.covs) + spread

    def component_log_probs(self, a: Float[Array, " d"]) -> Float[Array, " k"]:
        """log π_k + log N(a; μ_k, Σ_k) for every k."""
        projected = jnp.einsum("kji,kj->ki", self.eigvecs, a[None, :] - self.means)
        quad = jnp.sum(jnp.square(projected) / self.eigvals, axis=-1)
        log_det = jnp.sum(jnp.log(self.eigvals), axis=-1)
        return jnp.log(self.weights) - 0.5 * (quad + log_det + self.dim * math.log(2.0 * math.pi))

    def log_prob(self, a: Float[Array, " d"]) -> Float[Array, ""]:
        return logsumexp(self.component_log_probs(a))

    def responsibilities(self, a: Float[Array, " d"]) -> Float[Array, " k"]:
        """Posterior component probabilities p(k | a)."""
        return jax.nn.softmax(self.component_log_probs(a))

    def marginal_cdf(self, x: Float[Array, ""], dim: int) -> Float[Array, ""]:
        """F_j(x) = Σ_k π_k Φ((x − μ_kj) / sqrt(Σ_k,jj)), the exact CDF of coordinate j."""
        stds = jnp.sqrt(self.covs[:, dim, dim])
        return jnp.sum(self.weights * norm.cdf((x - self.means[:, dim]) / stds))

    def sample(self, key: PRNGKeyArray, num: int) -> Float[Array, "n d"]:
        """`num` exact samples (component by categorical draw, then μ_k + U_k sqrt(λ_k) ε)."""
        component_key, noise_key = jax.random.split(key)
        components = jax.random.categorical(component_key, jnp.log(self.weights), shape=(num,))
        noise = jax.random.normal(noise_key, (num, self.dim))
        scaled = noise * jnp.sqrt(self.eigvals[components])
        return self.means[components] + jnp.einsum("nij,nj->ni", self.eigvecs[components], scaled)

    def velocity(self, x: Float[Array, " d"], t: Float[Array, ""]) -> Float[Array, " d"]:
        """The exact marginal velocity v(x, t) (class docstring; ANALYTIC-CHECK §1.2)."""
        t = jnp.asarray(t, x.dtype)
        path_vars = jnp.square(1.0 - t) + jnp.square(t) * self.eigvals  # eigenvalues of S_k(t)
        gains = t * self.eigvals - (1.0 - t)  # eigenvalues of t Σ_k − (1 − t) I
        projected = jnp.einsum("kji,kj->ki", self.eigvecs, x[None, :] - t * self.means)
        log_dens = -0.5 * jnp.sum(jnp.square(projected) / path_vars + jnp.log(path_vars), axis=-1)
        resp = jax.nn.softmax(jnp.log(self.weights) + log_dens)
        corrections = jnp.einsum("kij,kj->ki", self.eigvecs, gains / path_vars * projected)
        return resp @ (self.means + corrections)

    def __call__(self, obs: Array, x: Float[Array, " d"], t: Float[Array, ""]) -> Float[Array, " d"]:
        del obs  # the closed-form behaviour policy is the same in every state
        return self.velocity(x, t)


# ------------------------------------------------------------------------------------------------
# Analytic critics and tilted mixtures π* ∝ π_β exp(τ Q) (ANALYTIC-CHECK §1.1)
# ------------------------------------------------------------------------------------------------


@jax.jit
def tilt_linear(mixture: GaussianMixture, w: Float[Array, " d"], tau: Float[Array, ""] | float) -> GaussianMixture:
    """π* ∝ π_β exp(τ wᵀa) (§1.1, completing the square):

    μ_k' = μ_k + τΣ_k w,  Σ_k' = Σ_k,  π_k' ∝ π_k exp(τ wᵀμ_k + ½τ² wᵀΣ_k w).
    """
    w = jnp.asarray(w, jnp.float32)
    cov_w = jnp.einsum("kij,j->ki", mixture.covs, w)
    log_weights = jnp.log(mixture.weights) + tau * (mixture.means @ w) + 0.5 * tau**2 * (cov_w @ w)
    return GaussianMixture(jax.nn.softmax(log_weights), mixture.means + tau * cov_w, mixture.covs)


@jax.jit
def tilt_quadratic(
    mixture: GaussianMixture,
    curvature: Float[Array, "d d"],
    centre: Float[Array, " d"],
    tau: Float[Array, ""] | float,
) -> GaussianMixture:
    """π* ∝ π_β exp(−½τ(a − c)ᵀA(a − c)), A ⪰ 0 (§1.1, product of Gaussians):

    Σ_k' = (Σ_k⁻¹ + τA)⁻¹, μ_k' = Σ_k'(Σ_k⁻¹μ_k + τAc),
    log π_k' = log π_k + ½ log|Σ_k'| − ½ log|Σ_k|
               − ½(μ_kᵀΣ_k⁻¹μ_k + τcᵀAc − μ_k'ᵀΣ_k'⁻¹μ_k') + const.
    """
    curvature = jnp.asarray(curvature, jnp.float32)
    centre = jnp.asarray(centre, jnp.float32)
    precisions = jnp.einsum("kij,kj,klj->kil", mixture.eigvecs, 1.0 / mixture.eigvals, mixture.eigvecs)
    new_precisions = precisions + tau * curvature[None]
    new_covs = jnp.linalg.inv(new_precisions)
    info = jnp.einsum("kij,kj->ki", precisions, mixture.means) + tau * (curvature @ centre)[None, :]
    new_means = jnp.einsum("kij,kj->ki", new_covs, info)
    _, new_log_det = jnp.linalg.slogdet(new_covs)
    old_log_det = jnp.sum(jnp.log(mixture.eigvals), axis=-1)
    old_quad = jnp.einsum("ki,kij,kj->k", mixture.means, precisions, mixture.means)
    new_quad = jnp.einsum("ki,kij,kj->k", new_means, new_precisions, new_means)
    log_weights = (
        jnp.log(mixture.weights)
        + 0.5 * (new_log_det - old_log_det)
        - 0.5 * (old_quad + tau * (centre @ curvature @ centre) - new_quad)
    )
    return GaussianMixture(jax.nn.softmax(log_weights), new_means, new_covs)


class LinearCritic(eqx.Module):
    """Q(s, a) = wᵀa for every s, as a one-member ensemble: `(obs, a) -> (1,)`."""

    w: Float[Array, " d"] = eqx.field(converter=lambda x: jnp.asarray(x, jnp.float32))

    def __call__(self, obs: Array, action: Float[Array, " d"]) -> Float[Array, " 1"]:
        del obs
        return jnp.reshape(self.w @ action, (1,))

    def tilt(self, mixture: GaussianMixture, tau: Float[Array, ""] | float) -> GaussianMixture:
        """The closed-form π_β exp(τQ) (`tilt_linear`)."""
        return tilt_linear(mixture, self.w, tau)


class QuadraticCritic(eqx.Module):
    """Q(s, a) = −½(a − c)ᵀA(a − c) for every s (A symmetric ⪰ 0), as `(obs, a) -> (1,)`."""

    curvature: Float[Array, "d d"] = eqx.field(converter=lambda x: jnp.asarray(x, jnp.float32))
    centre: Float[Array, " d"] = eqx.field(converter=lambda x: jnp.asarray(x, jnp.float32))

    def __call__(self, obs: Array, action: Float[Array, " d"]) -> Float[Array, " 1"]:
        del obs
        offset = action - self.centre
        return jnp.reshape(-0.5 * offset @ self.curvature @ offset, (1,))

    def tilt(self, mixture: GaussianMixture, tau: Float[Array, ""] | float) -> GaussianMixture:
        """The closed-form π_β exp(τQ) (`tilt_quadratic`)."""
        return tilt_quadratic(mixture, self.curvature, self.centre, tau)


class SpreadEnsemble(eqx.Module):
    """A two-member ensemble Q_e(s, a) = Q(s, a) ∓ `spread`: same mean, constant std = `spread`.

    Needed for extractors that differentiate a pessimistic value mean_e Q_e − ρ std_e Q_e (BAM,
    METHODS §5.1): the gradient of `jnp.std` is NaN when every member agrees (a one-member critic),
    even at ρ = 0. With a constant spread the std is constant, so ∇_a(mean − ρ std) = ∇_a Q exactly.
    """

    critic: eqx.Module
    spread: float = eqx.field(static=True, default=0.1)

    def __call__(self, obs: Array, action: Float[Array, " d"]) -> Float[Array, " 2"]:
        value = jnp.mean(self.critic(obs, action))
        return value + self.spread * jnp.array([-1.0, 1.0])


# ------------------------------------------------------------------------------------------------
# QAM's exact discrete fixed point: Gaussian behaviour, linear Q (ANALYTIC-CHECK §1.4, test T1)
# ------------------------------------------------------------------------------------------------


class DiscreteFixedPoint(eqx.Module):
    """QAM's K-step fixed point f*(x, t_i) = f_β(x, t_i) + D_i and the Euler-K law it samples.

    `offsets` D_0 … D_{K−1} (K, d); `adjoints` ã_0 … ã_K (K + 1, d) (deterministic for linear Q);
    `final_mean` m_K (d,) and `final_cov` P_K (d, d) of x_K for x_{i+1} = x_i + h f*(x_i, t_i),
    x_0 ~ N(0, I).
    """

    offsets: Float[Array, "k d"]
    adjoints: Float[Array, "k1 d"]
    final_mean: Float[Array, " d"]
    final_cov: Float[Array, "d d"]


def _gaussian_gain(eigvals: Array, eigvecs: Array, t: float) -> Array:
    """C(t) = (tΣ − (1 − t)I) S(t)⁻¹, S(t) = (1 − t)²I + t²Σ (the Jacobian of f_β in x)."""
    gains = (t * eigvals - (1.0 - t)) / ((1.0 - t) ** 2 + t**2 * eigvals)
    return (eigvecs * gains[None, :]) @ eigvecs.T


def gaussian_linear_fixed_point(
    mean: Float[Array, " d"],
    cov: Float[Array, "d d"],
    w: Float[Array, " d"],
    tau: float,
    num_steps: int,
    scheme: str = "reference",
) -> DiscreteFixedPoint:
    r"""Exact discrete fixed point of QAM's lean adjoint matching for π_β = N(μ, Σ), Q = wᵀa (§1.4).

    f_β(x, t) = μ + C(t)(x − tμ) is affine, so the drift Jacobian is constant and the lean adjoint
    is deterministic:

        ã_K = −τw,  ã_i = (I + h J_iᵀ) ã_{i+1},
        D_i = −σ_i² ã_i / 2,  σ_i² = 2(1 − t_i + h)/(t_i + h),

    with J_i = 2C(t_i + h) − I/(t_i + h) under `scheme="reference"` (METHODS §4.3, QAM parity) or,
    under `"consistent"` (`flowrl.sde`), J_i = 2C(t_i) − I/(t_i + h) for i < K − 1 and
    J_{K−1} = C(t_{K−1}). The Euler-K sampler of f* is affine: m_{i+1} = A_i m_i + h(μ − t_iC(t_i)μ + D_i),
    P_{i+1} = A_i P_i A_iᵀ, A_i = I + hC(t_i), m_0 = 0, P_0 = I.
    """
    if scheme not in ("reference", "consistent"):
        raise AnalyticError(f"unknown scheme {scheme!r}; choose 'reference' or 'consistent'")
    if num_steps < 1:
        raise AnalyticError(f"num_steps must be >= 1, got {num_steps}")
    mean = jnp.asarray(mean, jnp.float32)
    cov = jnp.asarray(cov, jnp.float32)
    w = jnp.asarray(w, jnp.float32)
    dim = mean.shape[0]
    if cov.shape != (dim, dim) or w.shape != (dim,):
        raise AnalyticError(
            f"gaussian_linear_fixed_point needs mean (d,), cov (d, d), w (d,); "
            f"got {mean.shape}, {cov.shape}, {w.shape}"
        )
    return _gaussian_linear_fixed_point(mean, cov, w, jnp.asarray(tau, jnp.float32), num_steps, scheme)


@functools.partial(jax.jit, static_argnames=("num_steps", "scheme"))
def _gaussian_linear_fixed_point(mean, cov, w, tau, num_steps: int, scheme: str) -> DiscreteFixedPoint:
    dim = mean.shape[0]
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
    step = 1.0 / num_steps
    eye = jnp.eye(dim)

    adjoint = -tau * w
    adjoints = [adjoint]
    for i in reversed(range(num_steps)):
        t_i = i * step
        if scheme == "reference":
            jac = 2.0 * _gaussian_gain(eigvals, eigvecs, t_i + step) - eye / (t_i + step)
        elif i < num_steps - 1:
            jac = 2.0 * _gaussian_gain(eigvals, eigvecs, t_i) - eye / (t_i + step)
        else:
            jac = _gaussian_gain(eigvals, eigvecs, t_i)
        adjoint = adjoint + step * (jac.T @ adjoint)
        adjoints.append(adjoint)
    adjoints = jnp.stack(adjoints[::-1])  # ã_0 … ã_K
    times = jnp.arange(num_steps, dtype=jnp.float32) * step
    sigma_sq = 2.0 * (1.0 - times + step) / (times + step)
    offsets = -0.5 * sigma_sq[:, None] * adjoints[:-1]

    final_mean, final_cov = _euler_affine_law(mean, eigvals, eigvecs, offsets, num_steps)
    return DiscreteFixedPoint(offsets, adjoints, final_mean, final_cov)


def _euler_affine_law(mean, eigvals, eigvecs, offsets, num_steps):
    """Mean and covariance of x_K for x_{i+1} = x_i + h(f_β(x_i, t_i) + D_i), x_0 ~ N(0, I)."""
    dim = mean.shape[0]
    step = 1.0 / num_steps
    eye = jnp.eye(dim)
    final_mean = jnp.zeros(dim)
    final_cov = eye
    for i in range(num_steps):
        gain = _gaussian_gain(eigvals, eigvecs, i * step)
        transition = eye + step * gain
        final_mean = transition @ final_mean + step * (mean - i * step * (gain @ mean) + offsets[i])
        final_cov = transition @ final_cov @ transition.T
    return final_mean, final_cov


def bam_gaussian_linear_fixed_point(
    mean: Float[Array, " d"],
    cov: Float[Array, "d d"],
    w: Float[Array, " d"],
    inv_temp: float,
    num_steps: int,
) -> DiscreteFixedPoint:
    r"""Exact discrete optimum of BAM (METHODS §5.1) for π_β = N(μ, Σ), Q = wᵀa, at K steps.

    BAM minimises E[Σ_{i≤K−2} (2/σ_i²)‖u_i(x_i)‖² − λ wᵀx_K] over the SDE rollout with
    v_θ = f_β + u_i. The dynamics are affine and u_i enters x_{i+1} additively as 2h·u_i, so
    E[wᵀx_K] is linear in E[u_i(x_i)] and the problem separates per step: the optimum is the
    constant u_i = D_i = (σ_i²/2)·hλ·Φ_{i+1→K}ᵀw, with Φ_{i+1→K} the Jacobian of x_K in x_{i+1}
    along the *forward* steps (the `"consistent"` adjoint with τ = hλ: D_i = −σ_i² ã_{i+1}/2).
    This is the exp(hλQ) tilt of METHODS §9.3 in discrete form.

    BAM never trains v_θ at t_{K−1} (its last rollout step uses the base), so the law predicted
    here is that of the sampler that takes the last step with f_β: `offsets[K−1] = 0`.
    """
    consistent = gaussian_linear_fixed_point(mean, cov, w, inv_temp / num_steps, num_steps, scheme="consistent")
    return _bam_law(jnp.asarray(mean, jnp.float32), jnp.asarray(cov, jnp.float32), consistent.adjoints, num_steps)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _bam_law(mean, cov, adjoints, num_steps: int) -> DiscreteFixedPoint:
    step = 1.0 / num_steps
    times = jnp.arange(num_steps, dtype=jnp.float32) * step
    sigma_sq = 2.0 * (1.0 - times + step) / (times + step)
    offsets = (-0.5 * sigma_sq[:, None] * adjoints[1:]).at[-1].set(0.0)
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (cov + cov.T))
    final_mean, final_cov = _euler_affine_law(mean, eigvals, eigvecs, offsets, num_steps)
    return DiscreteFixedPoint(offsets, adjoints, final_mean, final_cov)


# ------------------------------------------------------------------------------------------------
# Problems of ANALYTIC-CHECK §2 as Contexts
# ------------------------------------------------------------------------------------------------


def closed_form_context(behaviour: GaussianMixture, critic: eqx.Module, obs_dim: int = 0) -> Context:
    """A Context whose behaviour flow (online and EMA) is the exact field and whose critic is analytic."""
    return Context(
        behavior_flow=behaviour,
        target_behavior_flow=behaviour,
        critic=critic,
        target_critic=critic,
        obs_dim=obs_dim,
        action_dim=behaviour.dim,
    )


class ClosedFormProblem(eqx.Module):
    """A behaviour mixture, an analytic critic, a temperature τ and the closed-form target π_β exp(τQ)."""

    behaviour: GaussianMixture
    critic: eqx.Module
    tau: float = eqx.field(static=True)

    @property
    def target(self) -> GaussianMixture:
        return self.critic.tilt(self.behaviour, self.tau)

    def context(self, obs_dim: int = 0, ensemble_spread: float | None = None) -> Context:
        """The problem as a Context; `ensemble_spread` wraps the critic in a `SpreadEnsemble` (BAM)."""
        critic = self.critic if ensemble_spread is None else SpreadEnsemble(self.critic, ensemble_spread)
        return closed_form_context(self.behaviour, critic, obs_dim)


def _mixture_1d3() -> GaussianMixture:
    stds = 0.2 * jnp.array([0.8, 1.0, 1.2])
    means = jnp.array([[-1.0], [0.0], [1.0]])
    return GaussianMixture(jnp.array([0.3, 0.4, 0.3]), means, jnp.square(stds)[:, None, None])


def _mixture_2d_mild() -> GaussianMixture:
    shapes = jnp.array(
        [[[1.0, 0.0], [0.0, 1.0]], [[1.4, 0.5], [0.5, 0.8]], [[0.8, -0.4], [-0.4, 1.2]], [[1.2, 0.0], [0.0, 1.2]]]
    )
    means = jnp.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    return GaussianMixture(jnp.array([0.4, 0.3, 0.2, 0.1]), means, 0.0625 * shapes)


def make_problem(name: str) -> ClosedFormProblem:
    """The closed-form problems of ANALYTIC-CHECK §1.4 / §2 (all τ = 2):

    - `"t1"`: N((0.2, −0.1), [[.09, .03], [.03, .04]]), Q = a₁ + a₂ (exact discrete target, §1.4);
    - `"1d3"`: weights (.3, .4, .3), means (−1, 0, 1), stds 0.2·(.8, 1, 1.2), Q = a;
    - `"1d3-quad"`: the same mixture, Q = −½(a − 0.5)² (a quadratic well between two modes);
    - `"2d-mild"`: 4 modes at (±.5, ±.5), weights (.4, .3, .2, .1), Q = a₁ + ½a₂;
    - `"2d-mild-quad"`: the same mixture, Q = −½(a − c)ᵀA(a − c), A = diag(2, 1), c = (0.5, 0).
    """
    if name == "t1":
        cov = jnp.array([[[0.09, 0.03], [0.03, 0.04]]])
        behaviour = GaussianMixture(jnp.ones(1), jnp.array([[0.2, -0.1]]), cov)
        return ClosedFormProblem(behaviour, LinearCritic(jnp.array([1.0, 1.0])), 2.0)
    if name == "1d3":
        return ClosedFormProblem(_mixture_1d3(), LinearCritic(jnp.array([1.0])), 2.0)
    if name == "1d3-quad":
        return ClosedFormProblem(_mixture_1d3(), QuadraticCritic(jnp.eye(1), jnp.array([0.5])), 2.0)
    if name == "2d-mild":
        return ClosedFormProblem(_mixture_2d_mild(), LinearCritic(jnp.array([1.0, 0.5])), 2.0)
    if name == "2d-mild-quad":
        critic = QuadraticCritic(jnp.diag(jnp.array([2.0, 1.0])), jnp.array([0.5, 0.0]))
        return ClosedFormProblem(_mixture_2d_mild(), critic, 2.0)
    raise AnalyticError(f"unknown closed-form problem {name!r}; choose one of {PROBLEMS}")


PROBLEMS: tuple[str, ...] = ("t1", "1d3", "1d3-quad", "2d-mild", "2d-mild-quad")


# ------------------------------------------------------------------------------------------------
# Metrics against the closed form (ANALYTIC-CHECK §2)
# ------------------------------------------------------------------------------------------------


@eqx.filter_jit
def cell_fractions(samples: Float[Array, "n d"], target: GaussianMixture) -> Float[Array, " k"]:
    """Fraction of samples in each cell {a : argmax_k p(k | a) under `target`}."""
    cells = jnp.argmax(jax.vmap(target.component_log_probs)(samples), axis=-1)
    return jnp.mean(jax.nn.one_hot(cells, target.num_components), axis=0)


@eqx.filter_jit
def mode_weight_error(samples: Float[Array, "n d"], target: GaussianMixture) -> Float[Array, ""]:
    """w_err = max_k |cell fraction − π_k'| (cells by argmax responsibility of the target)."""
    return jnp.max(jnp.abs(cell_fractions(samples, target) - target.weights))


@eqx.filter_jit
def effective_temperature(
    samples: Float[Array, "n d"],
    behaviour: GaussianMixture,
    critic: LinearCritic | QuadraticCritic,
    target: GaussianMixture,
    taus: Float[Array, " g"] | None = None,
) -> Float[Array, ""]:
    """τ_eff = argmin_τ' Σ_k (cell fraction_k − π_k(τ'))² over a grid (default −6 … 10, step 0.01).

    π_k(τ') are the closed-form weights of `critic.tilt(behaviour, τ')`; cells as in `cell_fractions`.
    """
    taus = jnp.linspace(-6.0, 10.0, 1601) if taus is None else jnp.asarray(taus, jnp.float32)
    fractions = cell_fractions(samples, target)
    grid_weights = jax.vmap(lambda tau: critic.tilt(behaviour, tau).weights)(taus)
    return taus[jnp.argmin(jnp.sum(jnp.square(grid_weights - fractions[None, :]), axis=-1))]


@eqx.filter_jit
def wasserstein1_marginal(
    samples: Float[Array, " n"], mixture: GaussianMixture, dim: int, grid_points: int = 8001
) -> Float[Array, ""]:
    """W1 = ∫|F_n(x) − F_j(x)| dx between the empirical CDF and the mixture's exact marginal CDF.

    The integral runs over the merged sorted samples and a uniform grid covering ±9 std of every
    component: F_n is constant between consecutive points and F_j is integrated by the trapezoid
    rule, so the quadrature error is O(Δx²) (< 1e-5 here), far below sampling noise.
    """
    sorted_samples = jnp.sort(samples)
    stds = jnp.sqrt(mixture.covs[:, dim, dim])
    low = jnp.minimum(sorted_samples[0], jnp.min(mixture.means[:, dim] - 9.0 * stds))
    high = jnp.maximum(sorted_samples[-1], jnp.max(mixture.means[:, dim] + 9.0 * stds))
    points = jnp.sort(jnp.concatenate([sorted_samples, jnp.linspace(low, high, grid_points)]))
    empirical = jnp.searchsorted(sorted_samples, points[:-1], side="right") / samples.shape[0]
    exact = jax.vmap(lambda x: mixture.marginal_cdf(x, dim))(points)
    gaps = jnp.abs(empirical - exact[:-1]) + jnp.abs(empirical - exact[1:])
    return jnp.sum(0.5 * gaps * jnp.diff(points))


@eqx.filter_jit
def max_marginal_w1(samples: Float[Array, "n d"], mixture: GaussianMixture) -> Float[Array, ""]:
    """max_j W1 of coordinate j against the exact marginal CDF (`wasserstein1_marginal`)."""
    return jnp.max(jnp.stack([wasserstein1_marginal(samples[:, j], mixture, j) for j in range(mixture.dim)]))


@eqx.filter_jit
def moment_errors(
    samples: Float[Array, "n d"], mixture: GaussianMixture
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(‖sample mean − m‖₂, ‖sample covariance − C‖_F) against the mixture's exact moments."""
    centred = samples - jnp.mean(samples, axis=0)[None, :]
    sample_cov = centred.T @ centred / samples.shape[0]
    mean_err = jnp.linalg.norm(jnp.mean(samples, axis=0) - mixture.mean())
    cov_err = jnp.linalg.norm(sample_cov - mixture.covariance())
    return mean_err, cov_err


def closed_form_metrics(samples: Float[Array, "n d"], problem: ClosedFormProblem) -> dict[str, float]:
    """All §2 metrics of `samples` against the problem's target: W1, mean_err, cov_err, w_err,
    tau_eff and tau_ratio = tau_eff / τ (the sample mean is reported too, per coordinate)."""
    target = problem.target
    mean_err, cov_err = moment_errors(samples, target)
    tau_eff = effective_temperature(samples, problem.behaviour, problem.critic, target)
    metrics = {
        "W1": float(max_marginal_w1(samples, target)),
        "mean_err": float(mean_err),
        "cov_err": float(cov_err),
        "w_err": float(mode_weight_error(samples, target)),
        "tau_eff": float(tau_eff),
        "tau_ratio": float(tau_eff) / problem.tau if problem.tau != 0 else float("nan"),
    }
    for j, value in enumerate(jnp.mean(samples, axis=0).tolist()):
        metrics[f"mean_{j}"] = value
    return metrics


# ------------------------------------------------------------------------------------------------
# Training loop and unclipped sampler (ANALYTIC-CHECK §6 "common setup")
# ------------------------------------------------------------------------------------------------

_ADAM = optax.scale_by_adam()  # one module-level instance so the jitted chunk is cached across calls


def _cosine_lr(step: Array, total: Array, lr: Array, final_lr: Array) -> Array:
    """optax.cosine_decay_schedule(lr, total, final_lr / lr) evaluated at `step`."""
    progress = jnp.minimum(step, total) / total
    return final_lr + (lr - final_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


@eqx.filter_jit
def _train_chunk(
    extractor: AbstractExtractor,
    ctx: Context,
    params: PyTree,
    opt_state: PyTree,
    batch: Batch,
    first_step: Int[Array, ""],
    keys: PRNGKeyArray,
    hyper: Float[Array, " 4"],
):
    """`keys.shape[0]` Adam steps of `frozen_context_loss` in one `lax.scan`; steps ≥ total are no-ops."""
    total, lr, final_lr, clip = hyper[0], hyper[1], hyper[2], hyper[3]
    arrays, static = eqx.partition(params, eqx.is_inexact_array)

    def loss_of(trainable, key):
        loss, _ = frozen_context_loss(extractor, eqx.combine(trainable, static), ctx, batch, key=key)
        return loss

    def one_step(carry, inputs):
        arrays, opt_state = carry
        offset, key = inputs
        step = first_step + offset
        loss, grads = jax.value_and_grad(loss_of)(arrays, key)
        grad_norm = optax.tree.norm(grads)
        # Global-norm clipping as optax.clip_by_global_norm, with `clip` a traced value.
        scale = jnp.where(grad_norm < clip, 1.0, clip / jnp.maximum(grad_norm, 1e-12))
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, new_opt_state = _ADAM.update(grads, opt_state)
        step_lr = _cosine_lr(step.astype(jnp.float32), total, lr, final_lr)
        new_arrays = jax.tree.map(lambda p, u: p - step_lr * u, arrays, updates)
        active = step < total
        keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731
        carry = (jax.tree.map(keep, new_arrays, arrays), jax.tree.map(keep, new_opt_state, opt_state))
        return carry, loss

    offsets = jnp.arange(keys.shape[0])
    (arrays, opt_state), losses = jax.lax.scan(one_step, (arrays, opt_state), (offsets, keys))
    return eqx.combine(arrays, static), opt_state, losses


def zero_observation_batch(batch_size: int, obs_dim: int, action_dim: int) -> Batch:
    """A Batch of `batch_size` zero observations (closed-form problems are stateless; obs_dim 0 works).

    Extractor losses read only `observations`; the other fields are zeros/ones of the right shapes.
    """
    return Batch(
        observations=jnp.zeros((batch_size, obs_dim)),
        actions=jnp.zeros((batch_size, 1, action_dim)),
        rewards=jnp.zeros((batch_size,)),
        masks=jnp.ones((batch_size,)),
        next_observations=jnp.zeros((batch_size, obs_dim)),
        valid=jnp.ones((batch_size,)),
    )


def fit_extractor(
    extractor: AbstractExtractor,
    ctx: Context,
    *,
    steps: int,
    key: PRNGKeyArray,
    batch_size: int = 256,
    lr: float = 1e-3,
    final_lr: float = 1e-5,
    clip: float = 1.0,
    chunk_size: int = 250,
    losses: list[float] | None = None,
) -> PyTree:
    """Train `extractor.init(ctx)` for `steps` Adam steps on `frozen_context_loss` and return the params.

    The plain loop of ANALYTIC-CHECK §6: Adam, global-norm clip `clip`, cosine decay `lr` → `final_lr`,
    batches of `batch_size` zero observations (obs_dim = ctx.obs_dim; 0 works). Steps run jitted in
    `lax.scan` chunks of `chunk_size` (the compiled chunk is reused across calls with the same shapes,
    extractor structure and context types). If `losses` is a list, each step's loss is appended.
    """
    if steps < 1 or batch_size < 1 or chunk_size < 1:
        raise AnalyticError(
            f"fit_extractor needs steps, batch_size, chunk_size >= 1; got {steps}, {batch_size}, {chunk_size}"
        )
    if not (lr > 0 and final_lr > 0 and clip > 0):
        raise AnalyticError(f"fit_extractor needs lr, final_lr, clip > 0; got {lr}, {final_lr}, {clip}")
    init_key, train_key = jax.random.split(key)
    params = extractor.init(ctx, key=init_key)
    opt_state = _ADAM.init(eqx.filter(params, eqx.is_inexact_array))
    batch = zero_observation_batch(batch_size, ctx.obs_dim, ctx.action_dim)
    hyper = jnp.array([steps, lr, final_lr, clip], jnp.float32)
    num_chunks = -(-steps // chunk_size)
    chunk_keys = jax.random.split(train_key, num_chunks)
    for chunk in range(num_chunks):
        step_keys = jax.random.split(chunk_keys[chunk], chunk_size)
        first_step = jnp.asarray(chunk * chunk_size, jnp.int32)
        params, opt_state, chunk_losses = _train_chunk(
            extractor, ctx, params, opt_state, batch, first_step, step_keys, hyper
        )
        if losses is not None:
            valid = min(chunk_size, steps - chunk * chunk_size)
            losses.extend(chunk_losses[:valid].tolist())
    return params


class LastStepBase(eqx.Module):
    """The field `fine` for t < t_{K−1} and `base` on the last Euler step (t = t_{K−1} = 1 − 1/K).

    BAM's rollout takes its last step with the base field, so BAM never trains v_θ(·, t_{K−1});
    sampling this hybrid is the sampler whose law `bam_gaussian_linear_fixed_point` predicts.
    """

    fine: eqx.Module
    base: eqx.Module
    num_steps: int = eqx.field(static=True)

    def __call__(self, obs: Array, x: Float[Array, " d"], t: Float[Array, ""]) -> Float[Array, " d"]:
        on_last_step = t > 1.0 - 1.5 / self.num_steps  # the Euler grid hits t_{K−1} exactly
        return jnp.where(on_last_step, self.base(obs, x, t), self.fine(obs, x, t))


def sample_unclipped(
    params: PyTree, obs: Float[Array, " obs"], noise: Float[Array, " d"], num_steps: int
) -> Float[Array, " d"]:
    """ODE_{v_θ}(s, z): the K-step Euler sample of a fine field (QAM/BAM) *without* the [−1, 1] clip.

    The closed-form check must not clip (ANALYTIC-CHECK §6: the 1d3 modes reach ±1.2).
    """
    return euler_ode_sample(params, obs, noise, num_steps, clip=False)


@eqx.filter_jit
def _batched_samples(field: PyTree, obs: Array, noises: Array, num_steps: int) -> Array:
    return jax.vmap(lambda z: sample_unclipped(field, obs, z, num_steps))(noises)


def sample_batch_unclipped(
    field: PyTree, noises: Float[Array, "n d"], num_steps: int, obs: Float[Array, " obs"] | None = None
) -> Float[Array, "n d"]:
    """`sample_unclipped` for every row of `noises` (obs defaults to a zero-length observation)."""
    obs = jnp.zeros((0,)) if obs is None else obs
    return _batched_samples(field, obs, noises, num_steps)
