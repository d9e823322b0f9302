"""Policy parts several extractors share (METHODS.md §3).

- `TanhGaussian`: state-dependent diagonal Gaussian squashed by tanh (DSRL's latent policy, the
  FEdit / QAM-E edit policy, RLPD's actor). MLP trunk (GELU, activate_final) → mean and log-std
  heads; log-std clipped to [−20, 2]. The log-probability is computed from the *pre-tanh* sample
  (log N(u) − Σ log(1 − tanh(u)²)), which equals the reference's atanh-of-the-squashed-sample in
  exact arithmetic but cannot hit atanh(±1) in float32 (METHODS §9 quirk 14 deliberately fixed).
- `LogScalar`: α = exp(log α), the SAC-style temperature (log α initialised to log(init)).
- `temperature_loss`: α·(sg(−mean log π) − H_target), the automatic entropy-tuning loss.
- `behavior_sample`: clip(ODE_{v}(s, z)), z ~ N(0, I) — sampling a flow from the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.flow import VelocityFn, euler_ode_sample
from flowrl.networks import MLP, Dense

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class TanhGaussian(eqx.Module):
    """π(·|x) = tanh(N(μ(x), diag σ(x)²)); `sample_and_log_prob(x, key) -> (action, log π)`."""

    trunk: MLP
    mean_head: Dense
    log_std_head: Dense

    def __init__(self, in_size: int, out_size: int, hidden: Sequence[int], *, key: PRNGKeyArray):
        trunk_key, mean_key, std_key = jax.random.split(key, 3)
        self.trunk = MLP(in_size, hidden[:-1], hidden[-1], key=trunk_key, activate_final=True)
        self.mean_head = Dense(hidden[-1], out_size, key=mean_key)
        self.log_std_head = Dense(hidden[-1], out_size, key=std_key)

    def distribution(self, x: Float[Array, " n"]) -> tuple[Array, Array]:
        features = self.trunk(x)
        log_std = jnp.clip(self.log_std_head(features), LOG_STD_MIN, LOG_STD_MAX)
        return self.mean_head(features), log_std

    def sample_and_log_prob(self, x: Float[Array, " n"], *, key: PRNGKeyArray) -> tuple[Array, Array]:
        mean, log_std = self.distribution(x)
        noise = jax.random.normal(key, mean.shape, mean.dtype)
        pre_tanh = mean + jnp.exp(log_std) * noise
        gaussian_log_prob = jnp.sum(-0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi))
        # log(1 − tanh(u)²) = 2 (log 2 − u − softplus(−2u)), stable for large |u|.
        log_det = jnp.sum(2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh)))
        return jnp.tanh(pre_tanh), gaussian_log_prob - log_det

    def log_prob(self, x: Float[Array, " n"], action: Float[Array, " d"]) -> Float[Array, ""]:
        """log π(a|x) of a given squashed action (|a| < 1), via atanh (for BC terms on data)."""
        mean, log_std = self.distribution(x)
        pre_tanh = jnp.arctanh(action)
        noise = (pre_tanh - mean) * jnp.exp(-log_std)
        gaussian_log_prob = jnp.sum(-0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi))
        log_det = jnp.sum(2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh)))
        return gaussian_log_prob - log_det

    def mode(self, x: Float[Array, " n"]) -> Float[Array, " d"]:
        return jnp.tanh(self.distribution(x)[0])


class LogScalar(eqx.Module):
    """A positive scalar parameter α = exp(log α)."""

    log_value: Float[Array, ""]

    def __init__(self, init: float = 1.0):
        self.log_value = jnp.log(jnp.asarray(init, jnp.float32))

    def __call__(self) -> Float[Array, ""]:
        return jnp.exp(self.log_value)


def temperature_loss(alpha: Float[Array, ""], log_probs: Float[Array, " b"], target_entropy: float) -> Float[Array, ""]:
    """α·(sg(−mean log π) − H_target): raises α when the entropy is below target (SAC)."""
    return alpha * (jax.lax.stop_gradient(-jnp.mean(log_probs)) - target_entropy)


def behavior_sample(
    field: VelocityFn, obs: Float[Array, " obs"], action_dim: int, num_steps: int, *, key: PRNGKeyArray
) -> Float[Array, " d"]:
    """clip(ODE_v(s, z), −1, 1) with z ~ N(0, I_D): the Euler sampler of a (behaviour) flow."""
    return euler_ode_sample(field, obs, jax.random.normal(key, (action_dim,)), num_steps)
