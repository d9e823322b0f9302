r"""What QSM and DAC share: the DDPM (VP) schedule, the ε-network, the DDPM sampler and the loss.

METHODS.md §5.5 (ColinQiyangLi/qam `agents/dcgql.py`, `utils/diffusion.py`). Both methods train
their *own* noise-prediction network ε_θ(s, x_t, t) on the dataset chunks (the shared behaviour
flow of the trainer trains alongside, unused by these policies).

**Schedule** (VP, T = `diffusion_steps`, t = 1 … T, then β_0 = 0 prepended):

    β_t = 1 − exp(−0.1/T − 0.5·(10 − 0.1)·(2t − 1)/T²),  α_t = 1 − β_t,  ᾱ_t = Π_{k≤t} α_k  (ᾱ_0 = 1).

Σ_t of the exponent telescopes, so ᾱ_T = exp(−0.1 − 4.95) = exp(−5.05) for every T.

**ε-network**: learnable Fourier features of the *integer* step t, [cos 2πtW, sin 2πtW] with
W ∈ R^{time_dim/2 × 1} ~ N(0, 0.2²), → a Mish "cond" MLP (last layer linear) → a time code; the
main Mish MLP maps concat(x, obs, code) to R^D (no LayerNorm).

**Loss** (one example; t ~ U{1…T}, ε ~ N(0, I), x_t = sqrt(ᾱ_t)·a + sqrt(1 − ᾱ_t)·ε,
g = ∇_x mean_e Q̄_e(s, x) at x = x_t, the critic's action gradient at the *noisy* action):

    L_bc = mean_d (ε − ε̂)²
    QSM:  L_q = mean_d (−λ·g − ε̂)²          DAC:  L_q = mean_d sqrt(1 − ᾱ_t)·g ⊙ ε̂
    L    = α·L_bc + L_q            (α: BC weight of both methods; DAC has no λ)

**Sampler** x_T ~ N(0, I); for t = T … 1: x̂_0 = (x_t − sqrt(1−ᾱ_t)·ε̂)/sqrt(ᾱ_t); then

- with `clip_before` (DAC): x̂_0 ← clip(x̂_0) and the DDPM posterior mean
  x ← [sqrt(ᾱ_{t−1})β_t x̂_0 + sqrt(α_t)(1−ᾱ_{t−1}) x_t]/(1−ᾱ_t);
- else (QSM): x ← x̂_0 (the reference *jumps* to the x̂_0 estimate);

then x ← x + 1[t > 1]·sqrt(β_t)·z, and with `clip_after` (QSM) x ← clip(x) after every step.

Parity quirk kept (METHODS §9.5): the reference masks invalid chunks with a *power*,
ℓ^valid, so an invalid example contributes a constant 1 with zero gradient. This is
gradient-equivalent to the product ℓ·valid; only the logged loss differs. `valid_as_power=True`
reproduces the logged values; False gives the product.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.networks import Dense

VP_BETA_MIN = 0.1
VP_BETA_MAX = 10.0
LOSS_TYPES = ("qsm", "dac")


def vp_beta_schedule(num_steps: int) -> Float[Array, " t"]:
    """β_1 … β_T of the discrete VP schedule (Song et al. 2021), as `utils/diffusion.py` of the reference."""
    t = jnp.arange(1, num_steps + 1, dtype=jnp.float32)
    exponent = -VP_BETA_MIN / num_steps - 0.5 * (VP_BETA_MAX - VP_BETA_MIN) * (2.0 * t - 1.0) / num_steps**2
    return 1.0 - jnp.exp(exponent)


class DDPMSchedule(eqx.Module):
    """β_t, α_t, ᾱ_t for t = 0 … T (index t; β_0 = 0, so α_0 = ᾱ_0 = 1)."""

    betas: Float[Array, " t1"]
    alphas: Float[Array, " t1"]
    alpha_bars: Float[Array, " t1"]

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0] - 1


def ddpm_schedule(num_steps: int) -> DDPMSchedule:
    """The VP schedule with β_0 = 0 prepended and the cumulative products ᾱ_t (METHODS §5.5)."""
    if num_steps < 1:
        raise ValueError(f"diffusion_steps must be >= 1, got {num_steps}")
    betas = jnp.concatenate([jnp.zeros((1,)), vp_beta_schedule(num_steps)])
    alphas = 1.0 - betas
    return DDPMSchedule(betas, alphas, jnp.cumprod(alphas))


def mish(x: Array) -> Array:
    """x·tanh(softplus(x)) (Misra 2019), the activation of the reference's diffusion networks."""
    return x * jnp.tanh(jax.nn.softplus(x))


class MishMLP(eqx.Module):
    """Dense → Mish per hidden layer, last layer linear, no LayerNorm (the reference `MLP(activations=mish)`)."""

    layers: tuple[Dense, ...]

    def __init__(self, in_size: int, hidden: Sequence[int], out_size: int, *, key: PRNGKeyArray):
        sizes = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(Dense(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))

    def __call__(self, x: Float[Array, " inp"]) -> Float[Array, " out"]:
        for layer in self.layers[:-1]:
            x = mish(layer(x))
        return self.layers[-1](x)


class NoiseNetwork(eqx.Module):
    """ε_θ(s, x_t, t): Fourier features of the integer step → Mish cond MLP → Mish MLP on concat(x, s, code).

    Sizes as the reference's `DDPM` with `actor_hidden_dims = hidden`: the cond MLP has the layer
    sizes `hidden` (its last one, linear, is the code), the main MLP hidden `hidden` and output D.
    """

    fourier_kernel: Float[Array, "half 1"]
    cond: MishMLP
    main: MishMLP
    obs_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (512, 512, 512, 512),
        time_dim: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        if time_dim < 2 or time_dim % 2:
            raise ValueError(f"time_dim must be an even number >= 2, got {time_dim}")
        if len(hidden) < 1:
            raise ValueError(f"the ε-network needs at least one hidden layer, got hidden_dims={tuple(hidden)}")
        fourier_key, cond_key, main_key = jax.random.split(key, 3)
        self.fourier_kernel = 0.2 * jax.random.normal(fourier_key, (time_dim // 2, 1))
        self.cond = MishMLP(time_dim, hidden[:-1], hidden[-1], key=cond_key)
        self.main = MishMLP(action_dim + obs_dim + hidden[-1], hidden, action_dim, key=main_key)
        self.obs_dim = obs_dim
        self.action_dim = action_dim

    def time_features(self, t: Int[Array, ""] | Float[Array, ""]) -> Float[Array, " time"]:
        """[cos(2π t W), sin(2π t W)] of the (integer) diffusion step t."""
        angles = 2.0 * math.pi * jnp.asarray(t, jnp.float32) * self.fourier_kernel[:, 0]
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)])

    def __call__(
        self, obs: Float[Array, " obs"], x: Float[Array, " d"], t: Int[Array, ""] | Float[Array, ""]
    ) -> Float[Array, " d"]:
        code = self.cond(self.time_features(t))
        return self.main(jnp.concatenate([x, obs, code]))


def denoised_estimate(
    schedule: DDPMSchedule, x_t: Float[Array, " d"], eps_pred: Float[Array, " d"], t: Int[Array, ""]
) -> Float[Array, " d"]:
    """x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε̂) / sqrt(ᾱ_t)."""
    alpha_bar = schedule.alpha_bars[t]
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps_pred) / jnp.sqrt(alpha_bar)


def posterior_mean(
    schedule: DDPMSchedule, x_t: Float[Array, " d"], x0: Float[Array, " d"], t: Int[Array, ""]
) -> Float[Array, " d"]:
    """μ̃_t(x_t, x̂_0) = [sqrt(ᾱ_{t−1})·β_t·x̂_0 + sqrt(α_t)·(1 − ᾱ_{t−1})·x_t] / (1 − ᾱ_t).

    The DDPM posterior mean (Ho et al. 2020, eq. 7).
    """
    alpha_bar, alpha_bar_prev = schedule.alpha_bars[t], schedule.alpha_bars[t - 1]
    return (
        jnp.sqrt(alpha_bar_prev) * schedule.betas[t] * x0 + jnp.sqrt(schedule.alphas[t]) * (1.0 - alpha_bar_prev) * x_t
    ) / (1.0 - alpha_bar)


def ddpm_sample(
    eps_net,
    schedule: DDPMSchedule,
    obs: Float[Array, " obs"],
    *,
    clip_before: bool,
    clip_after: bool,
    key: PRNGKeyArray,
) -> Float[Array, " d"]:
    """The reference DDPM sampler (METHODS §5.5), then a final clip to [−1, 1].

    The final clip is a no-op for both paper settings (QSM clips after every step; DAC's last
    step returns its clipped x̂_0 exactly, since ᾱ_0 = 1); it only guarantees bounded actions when
    both flags are off.
    """
    start_key, step_key = jax.random.split(key)
    x_final = jax.random.normal(start_key, (eps_net.action_dim,))
    steps = jnp.arange(schedule.num_steps, 0, -1)

    # All step noises are drawn up front: keys never enter the scan (the key-reuse checker
    # flags keys threaded through a scan that is partially evaluated under `jax.grad`).
    step_noises = jax.random.normal(step_key, (schedule.num_steps, eps_net.action_dim))

    def step(x, inputs):
        t, noise = inputs
        x0 = denoised_estimate(schedule, x, eps_net(obs, x, t), t)
        if clip_before:
            x = posterior_mean(schedule, x, jnp.clip(x0, -1.0, 1.0), t)
        else:
            x = x0  # parity: the reference jumps to x̂_0 here (METHODS §9.5)
        x = x + jnp.where(t > 1, jnp.sqrt(schedule.betas[t]), 0.0) * noise
        if clip_after:
            x = jnp.clip(x, -1.0, 1.0)
        return x, None

    x_final, _ = jax.lax.scan(step, x_final, (steps, step_noises))
    return jnp.clip(x_final, -1.0, 1.0)


def qsm_actor_loss(
    eps_pred: Float[Array, " d"], q_grad: Float[Array, " d"], inv_temp: Float[Array, ""]
) -> Float[Array, ""]:
    """QSM: mean_d (−λ·g − ε̂)², minimised by ε̂ = −λ·g: the implied score −ε̂/sqrt(1−ᾱ_t) ∝ +∇Q."""
    return jnp.mean(jnp.square(-inv_temp * q_grad - eps_pred))


def dac_actor_loss(
    eps_pred: Float[Array, " d"], q_grad: Float[Array, " d"], alpha_bar: Float[Array, ""]
) -> Float[Array, ""]:
    """DAC: mean_d sqrt(1 − ᾱ_t)·g ⊙ ε̂ (linear in ε̂: pushes ε̂ against ∇Q; α·L_bc bounds it)."""
    return jnp.mean(jnp.sqrt(1.0 - alpha_bar) * q_grad * eps_pred)


def mask_invalid(loss: Float[Array, ""], valid: Float[Array, ""], *, as_power: bool) -> Float[Array, ""]:
    """ℓ^valid (reference, METHODS §9.5) or ℓ·valid; the same gradient for valid ∈ {0, 1}.

    The power is written as `where(valid > 0, ℓ, 1)`: equal to ℓ^valid for the binary `valid`
    of `sample_sequence`, and free of the NaN that d(ℓ^v)/dℓ = v·ℓ^(v−1) gives at ℓ = 0, v = 0.
    """
    if as_power:
        return jnp.where(valid > 0.0, loss, 1.0)
    return loss * valid


def ddpm_example_loss(
    eps_net: NoiseNetwork,
    critic,
    schedule: DDPMSchedule,
    obs: Float[Array, " obs"],
    action: Float[Array, " d"],
    valid: Float[Array, ""],
    *,
    loss_type: str,
    inv_temp: Float[Array, ""],
    bc_weight: Float[Array, ""],
    valid_as_power: bool,
    key: PRNGKeyArray,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """α·L_bc + L_q for one example (METHODS §5.5); `critic(obs, x) -> (E,)` gives g at the noisy action."""
    step_key, noise_key = jax.random.split(key)
    t = jax.random.randint(step_key, (), 1, schedule.num_steps + 1)
    noise = jax.random.normal(noise_key, action.shape)
    alpha_bar = schedule.alpha_bars[t]
    x_t = jnp.sqrt(alpha_bar) * action + jnp.sqrt(1.0 - alpha_bar) * noise
    eps_pred = eps_net(obs, x_t, t)
    q_grad = jax.lax.stop_gradient(jax.grad(lambda x: jnp.mean(critic(obs, x)))(x_t))

    bc_loss = jnp.mean(jnp.square(noise - eps_pred))
    if loss_type == "qsm":
        q_loss = qsm_actor_loss(eps_pred, q_grad, inv_temp)
    elif loss_type == "dac":
        q_loss = dac_actor_loss(eps_pred, q_grad, alpha_bar)
    else:
        raise ValueError(f"DDPM loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    bc_loss = mask_invalid(bc_loss, valid, as_power=valid_as_power)
    q_loss = mask_invalid(q_loss, valid, as_power=valid_as_power)
    metrics = {"bc_loss": bc_loss, "q_loss": q_loss, "q_grad_norm": jnp.linalg.norm(q_grad)}
    return bc_weight * bc_loss + q_loss, metrics


def ddpm_batch_loss(
    eps_net: NoiseNetwork,
    critic,
    schedule: DDPMSchedule,
    batch: Batch,
    *,
    loss_type: str,
    inv_temp: Float[Array, ""],
    bc_weight: Float[Array, ""],
    valid_as_power: bool,
    key: PRNGKeyArray,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """Batch mean of `ddpm_example_loss`, with batch-mean metrics and "loss"."""
    keys = jax.random.split(key, batch.batch_size)

    def one(obs, action, valid, k):
        return ddpm_example_loss(
            eps_net, critic, schedule, obs, action, valid, loss_type=loss_type, inv_temp=inv_temp,
            bc_weight=bc_weight, valid_as_power=valid_as_power, key=k,
        )

    losses, metrics = jax.vmap(one)(batch.observations, batch.chunked_actions, batch.valid, keys)
    loss = jnp.mean(losses)
    return loss, {"loss": loss, **{name: jnp.mean(value) for name, value in metrics.items()}}


class AbstractDDPMExtractor(AbstractExtractor):
    """What QSM and DAC share: an ε-network (their params), its DDPM sampler and batch loss.

    Subclasses hold the fields below and differ only in the actor loss (`loss_type`), whether it
    has an inverse temperature (`q_inv_temp`), and their sampler flags' defaults.
    """

    loss_type: ClassVar[str]
    alpha: eqx.AbstractVar[Float[Array, ""]]
    diffusion_steps: eqx.AbstractVar[int]
    time_dim: eqx.AbstractVar[int]
    hidden_dims: eqx.AbstractVar[tuple[int, ...]]
    use_target_critic_grad: eqx.AbstractVar[bool]
    clip_sampler_before: eqx.AbstractVar[bool]
    clip_sampler_after: eqx.AbstractVar[bool]
    valid_as_power: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def q_inv_temp(self) -> Float[Array, ""]:
        """λ of the Q term (DAC has none)."""

    def __check_init__(self):
        if self.diffusion_steps < 1:
            raise ValueError(f"{self.loss_type}.diffusion_steps must be >= 1, got {self.diffusion_steps}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> NoiseNetwork:
        return NoiseNetwork(ctx.obs_dim, ctx.action_dim, self.hidden_dims, self.time_dim, key=key)

    def loss(
        self, params: NoiseNetwork, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        critic = ctx.target_critic if self.use_target_critic_grad else ctx.critic
        return ddpm_batch_loss(
            params, critic, ddpm_schedule(self.diffusion_steps), batch, loss_type=self.loss_type,
            inv_temp=self.q_inv_temp(), bc_weight=self.alpha, valid_as_power=self.valid_as_power, key=key,
        )

    def sample(
        self, params: NoiseNetwork, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        return ddpm_sample(
            params, ddpm_schedule(self.diffusion_steps), obs,
            clip_before=self.clip_sampler_before, clip_after=self.clip_sampler_after, key=key,
        )
