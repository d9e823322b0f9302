"""What QAM and BAM share: a separately initialised fine-tuned flow v_θ, its sampler, and the
per-example noise of one memoryless rollout.

Both methods fine-tune v_θ against the critic while the behaviour flow v̄_β stays the reference;
v_θ has its *own* random initialisation, not a copy of v_β (METHODS.md §9 quirk 1, kept for parity).
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.extractor import Context
from flowrl.flow import euler_ode_sample
from flowrl.networks import VelocityField


def init_fine_flow(ctx: Context, hidden_dims: tuple[int, ...], *, key: PRNGKeyArray) -> VelocityField:
    return VelocityField(ctx.obs_dim, ctx.action_dim, hidden_dims, key=key)


def sample_fine_flow(
    fine: VelocityField, obs: Float[Array, " obs"], num_steps: int, action_dim: int, *, key: PRNGKeyArray
) -> Float[Array, " d"]:
    """a = clip(ODE_{v_θ}(s, z), −1, 1), z ~ N(0, I_D): the Euler ODE of the fine field (METHODS §4.2)."""
    noise = jax.random.normal(key, (action_dim,))
    return euler_ode_sample(fine, obs, noise, num_steps)


def rollout_noise(
    action_dim: int, num_steps: int, *, key: PRNGKeyArray
) -> tuple[Float[Array, " d"], Float[Array, "k1 d"]]:
    """x_0 ~ N(0, I_D) and ε_0 … ε_{K−2} ~ N(0, I_D) from two independent keys.

    (The reference draws x_0 with the key it then splits for the ε_i; we never reuse a key.)
    """
    start_key, noise_key = jax.random.split(key)
    x0 = jax.random.normal(start_key, (action_dim,))
    noises = jax.random.normal(noise_key, (num_steps - 1, action_dim))
    return x0, noises
