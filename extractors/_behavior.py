"""The behaviour-cloned flow as a policy: the inner policy of FQL and FEdit (METHODS.md §5.8, §5.9).

FQL and FEdit have no policy of their own besides their head: the one-step head distils, and the
edit head edits, samples of the *online* BC flow v_β, which the trainer already trains by flow
matching (METHODS §3). `BehaviorFlowPolicy` exposes that flow through the extractor interface so
the heads can compose over it exactly as they compose over QAM:

    sample(s; key) = clip(ODE_{v_β}(s, z)),  z ~ N(0, I_D) drawn from `key`,
    noise_to_action(s, z) = clip(ODE_{v_β}(s, z))  (K-step Euler, METHODS §3),

with no parameters and a zero loss. It is private (not a registry name): used alone it is plain
behaviour cloning, which is no method of the paper.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.flow import euler_ode_sample
from flowrl.policies import behavior_sample


class BehaviorFlowPolicy(AbstractExtractor):
    """π(a|s) = law of clip(ODE_{v_β}(s, z)) with the online behaviour flow of the context."""

    flow_steps: int = eqx.field(static=True, default=10)  # K

    def __check_init__(self):
        if self.flow_steps < 1:
            raise ConfigError(f"BehaviorFlowPolicy.flow_steps must be >= 1, got {self.flow_steps}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> None:
        del ctx, key
        return None

    def loss(self, params: None, ctx: Context, batch: Batch, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], Metrics]:
        del params, ctx, batch, key  # v_β is trained by the trainer's BC loss, not here
        zero = jnp.zeros(())
        return zero, {"loss": zero}

    def sample(self, params: None, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray) -> Float[Array, " d"]:
        return behavior_sample(ctx.behavior_flow, obs, ctx.action_dim, self.flow_steps, key=key)

    def noise_to_action(
        self, params: None, ctx: Context, obs: Float[Array, " obs"], noise: Float[Array, " d"]
    ) -> Float[Array, " d"]:
        """z ↦ clip(ODE_{v_β}(s, z)): the map `sample` draws z ~ N(0, I) for."""
        return euler_ode_sample(ctx.behavior_flow, obs, noise, self.flow_steps)
