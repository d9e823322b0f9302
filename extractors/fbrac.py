r"""FBRAC — a behaviour-cloned flow pushed up the critic by back-propagation through its ODE sampler.

The baseline "BC flow + Q-maximisation via direct BPTT" of Li & Levine (ICLR 2026), METHODS.md §5.2
(ColinQiyangLi/qam `agents/fbrac.py`). One flow v_φ, owned by this extractor, is trained by

    L = mean_b [ mean_d (v_φ(s, x_τ, τ) − (a − z))² · valid ]                       (BC flow matching)
        − (1/α) · mean_b mean_e Q_e(s, clip(ODE_{v_φ}(s, z′), −1, 1)),               (Q-maximisation)

x_τ = (1 − τ) z + τ a, z, z′ ~ N(0, I), τ ~ U[0, 1). The second term differentiates the *online*
critic's ensemble mean (no pessimism) through all K Euler steps of the sampler and through the
final clip (`flowrl.flow.euler_ode_sample` is differentiable); only v_φ receives gradients. Acting
and the TD target use a = clip(ODE_{v_φ}(s, z)).

Parity with the reference: the BC term is `valid`-weighted, the Q term is not; the Q term uses the
online critic; no gradient clipping (the gin files leave `grad_clip_norm` unset). Differences: v_φ
lives in the extractor while the trainer's shared behaviour flow v_β trains alongside it, unused
by the policy (in the reference v_φ *is* the only flow); `best_of_n` (default 1, never changed in
the paper runs) is not implemented.

??? cite "References"
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026 (arXiv 2601.14234), baseline "FBRAC".
    Park, Li & Levine, "Flow Q-Learning", ICML 2025 (the FBRAC baseline there).
    Wu, Tucker & Nachum, "Behavior Regularized Offline Reinforcement Learning", 2019 (BRAC).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.flow import VelocityFn, euler_ode_sample, flow_matching_loss
from flowrl.networks import VelocityField
from flowrl.registry import register_extractor


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


@register_extractor("fbrac")
class FBRAC(AbstractExtractor):
    """BC flow + (1/α)·Q by BPTT. Fields: paper defaults (METHODS §7); per-domain α in experiments/."""

    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=100.0)  # α: the Q term is divided by it
    flow_steps: int = eqx.field(static=True, default=10)  # K
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # v_φ MLP

    def __check_init__(self):
        if self.flow_steps < 1:
            raise ConfigError(f"fbrac.flow_steps must be >= 1, got {self.flow_steps}; bind e.g. fbrac.flow_steps = 10")
        if _is_concrete(self.alpha) and not bool(jnp.all(self.alpha > 0)):
            raise ConfigError(f"fbrac.alpha must be > 0 (the Q term is divided by it), got {self.alpha}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> VelocityField:
        """v_φ: its own randomly initialised velocity field (METHODS §3 `ActorVectorField`)."""
        return VelocityField(ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=key)

    def policy_actions(
        self, flow: VelocityFn, observations: Float[Array, "b obs"], noises: Float[Array, "b d"]
    ) -> Float[Array, "b d"]:
        """clip(ODE_{v_φ}(s_b, z_b), −1, 1) for a whole batch, differentiable in v_φ (BPTT).

        One batched Euler solve whose vector field vmaps v_φ over the batch, rather than a vmap of
        per-example solves: under an outer vmap, the VJP of diffrax's checkpointed loop carries a
        per-example copy of v_φ's parameter cotangent (~9x the CPU time at paper size).
        """
        batched_field = lambda obs, x, t: jax.vmap(flow, in_axes=(0, 0, None))(obs, x, t)  # noqa: E731
        return euler_ode_sample(batched_field, observations, noises, self.flow_steps)

    def loss(
        self, params: VelocityField, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """mean_b valid·L_BC − (1/α)·mean_b mean_e Q_e(s, clip(ODE_{v_φ}(s, z))), gradients through the ODE."""
        bc_key, noise_key = jax.random.split(key)
        actions = batch.chunked_actions
        bc_losses = jax.vmap(lambda o, a, k: flow_matching_loss(params, o, a, key=k))(
            batch.observations, actions, jax.random.split(bc_key, batch.batch_size)
        )
        bc_loss = jnp.mean(bc_losses * batch.valid)
        noises = jax.random.normal(noise_key, actions.shape, actions.dtype)
        policy_actions = self.policy_actions(params, batch.observations, noises)  # no stop-gradient: BPTT
        q = jnp.mean(jax.vmap(ctx.critic)(batch.observations, policy_actions))  # online critic, ensemble mean
        q_loss = -q / self.alpha
        loss = bc_loss + q_loss
        return loss, {"loss": loss, "bc_loss": bc_loss, "q_loss": q_loss, "q": q}

    def sample(
        self, params: VelocityField, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """a = clip(ODE_{v_φ}(s, z), −1, 1), z ~ N(0, I_D) (acting and TD targets)."""
        return euler_ode_sample(params, obs, jax.random.normal(key, (ctx.action_dim,)), self.flow_steps)
