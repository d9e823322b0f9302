"""What QAM and BAM share: a separately initialised fine-tuned flow v_θ, its sampler, and the
per-example noise of one memoryless rollout.

Both methods fine-tune v_θ against the critic while the behaviour flow v̄_β stays the reference;
v_θ has its *own* random initialisation, not a copy of v_β (METHODS.md §9 quirk 1, kept for parity).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.extractor import AbstractExtractor, Context, Metrics, batch_mean_loss
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


class AbstractFineFlowExtractor(AbstractExtractor):
    """An extractor whose policy is a fine-tuned flow v_θ (its params), trained per example.

    Subclasses (QAM, BAM) hold `flow_steps` and `hidden_dims` fields and implement
    `example_loss(fine, ctx, obs, key=...) -> (scalar, metrics)`; batching, sampling and the
    noise-to-action map are shared here.
    """

    flow_steps: eqx.AbstractVar[int]
    hidden_dims: eqx.AbstractVar[tuple[int, ...]]

    @abc.abstractmethod
    def example_loss(
        self, fine: VelocityField, ctx: Context, obs: Array, *, key: PRNGKeyArray
    ) -> tuple[Array, Metrics]:
        """The per-example objective of v_θ."""

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> VelocityField:
        return init_fine_flow(ctx, self.hidden_dims, key=key)

    def loss(
        self, params: VelocityField, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        return batch_mean_loss(
            lambda obs, key: self.example_loss(params, ctx, obs, key=key), batch.observations, key=key
        )

    def sample(
        self, params: VelocityField, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        return sample_fine_flow(params, obs, self.flow_steps, ctx.action_dim, key=key)

    def noise_to_action(
        self, params: VelocityField, ctx: Context, obs: Float[Array, " obs"], noise: Float[Array, " d"]
    ) -> Float[Array, " d"]:
        """The deterministic policy map z ↦ clip(ODE_{v_θ}(s, z)) that `sample` draws z for.

        Heads that distil or edit this policy (`extractors/one_step.py`, `extractors/edit.py`) need
        the action for a *given* noise z.
        """
        return euler_ode_sample(params, obs, noise, self.flow_steps)
