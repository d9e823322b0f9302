r"""DSRL — diffusion steering by RL in the latent-noise space of a frozen BC flow (METHODS.md §5.6).

The policy never changes the behaviour flow. It learns *which noise* to feed it: a latent policy
π_z(w | s) (tanh-Gaussian) picks w, the latent z = s_n·clip(w) is pushed through the Euler ODE of
the EMA behaviour flow, and the resulting action is what the agent executes and backs up:

    a = clip(ODE_{v̄_β}(s, z)),   z = s_n·clip(w, −1, 1),   w ~ π_z(·|s).

Three losses train the extractor's parts (π_z, the latent critic ensemble Q^z on (s, z), α):

    L_distill = mean_{e,b} ( Q^z_e(s, z) − sg Q_e(s, clip(ODE_{v̄_β}(s, z))) )²,   z ~ N(0, I_D)
    L_π       = mean_b ( sg(α)·log π_z(w|s) − mean_e sg Q^z_e(s, s_n·w) ),         w ~ π_z (reparam.)
    L_α       = α·( sg(−mean_b log π_z(w|s)) − H_tgt ),                             H_tgt = −0.5·D

Q^z learns the critic's value of the latent (one member per critic member, online critic, no
`valid` mask); π_z maximises Q^z with SAC-style entropy tuning. The trainer's shared critic (TD
with a′ from `sample`, i.e. the default `td_target`) and behaviour-flow BC loss complete the agent.
The reference adds L_distill to its critic loss; here Q^z belongs to the extractor, so it is in
the extractor's loss — with one optimiser over the summed loss the update is the same.

Parity (ColinQiyangLi/qam `agents/dsrl.py`): the latent critic has the shared critic's
architecture and ensemble size; the base flow is the EMA target (`use_target_latent`); best-of-n
(default 1, never changed in the paper) is not implemented. Quirk kept (METHODS §9.10): Q^z is
distilled on Gaussian latents z ~ N(0, I) while π_z only emits bounded latents in [−s_n, s_n]^D;
`latent_distill_source="policy"` instead distils on latents drawn from π_z (the latents the
policy actually visits). Deliberate difference: log π_z is computed from the pre-tanh sample
(`flowrl.policies.TanhGaussian`, METHODS §9.14).

??? cite "References"
    Wagenmaker, Nakamoto, Zhang, Park, Yagoub, Nagabandi, Gupta, Levine,
    "Steering Your Diffusion Policy with Latent Space Reinforcement Learning", 2025 (arXiv 2506.15799).
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baseline "DSRL".
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics, batch_mean_loss
from flowrl.flow import euler_ode_sample
from flowrl.networks import CriticEnsemble, stop_gradient_tree
from flowrl.policies import LogScalar, TanhGaussian
from flowrl.registry import register_extractor

LATENT_DISTILL_SOURCES = ("gaussian", "policy")


class DSRLParams(eqx.Module):
    """DSRL's trainable parts: latent policy π_z(w|s), latent critic Q^z_e(s, z), temperature α."""

    latent_policy: TanhGaussian
    latent_critic: CriticEnsemble
    alpha: LogScalar


@register_extractor("dsrl")
class DSRL(AbstractExtractor):
    """Latent-noise-space policy over the EMA behaviour flow. Defaults: METHODS §7; s_n per domain §8.2."""

    noise_scale: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # s_n
    target_entropy_multiplier: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # H_tgt = −m·D
    init_alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # α at init
    flow_steps: int = eqx.field(static=True, default=10)  # K of the base-flow ODE
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # π_z and Q^z
    latent_critic_members: int | None = eqx.field(static=True, default=None)  # None: the shared critic's E
    use_target_latent: bool = eqx.field(static=True, default=True)  # base flow = EMA v̄_β
    latent_distill_source: str = eqx.field(static=True, default="gaussian")  # §9.10: "gaussian" | "policy"

    def __check_init__(self):
        if self.latent_distill_source not in LATENT_DISTILL_SOURCES:
            raise ConfigError(
                f"dsrl.latent_distill_source = {self.latent_distill_source!r} is unknown; "
                f"choose one of {LATENT_DISTILL_SOURCES}"
            )
        if self.flow_steps < 1:
            raise ConfigError(f"dsrl.flow_steps must be >= 1, got {self.flow_steps}")
        if self.latent_critic_members is not None and self.latent_critic_members < 1:
            raise ConfigError(f"dsrl.latent_critic_members must be >= 1 or None, got {self.latent_critic_members}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> DSRLParams:
        policy_key, critic_key = jax.random.split(key)
        members = self.latent_critic_members or ctx.critic.num_members
        return DSRLParams(
            latent_policy=TanhGaussian(ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=policy_key),
            latent_critic=CriticEnsemble(ctx.obs_dim, ctx.action_dim, self.hidden_dims, members, key=critic_key),
            alpha=LogScalar(self.init_alpha),
        )

    def _base(self, ctx: Context):
        return ctx.target_behavior_flow if self.use_target_latent else ctx.behavior_flow

    def latent_to_action(self, ctx: Context, obs: Float[Array, " obs"], latent: Float[Array, " d"]) -> Array:
        """a = clip(ODE_{v̄_β}(s, z)): the frozen base flow's deterministic map from a latent to an action."""
        return euler_ode_sample(self._base(ctx), obs, latent, self.flow_steps)

    def policy_latent(self, params: DSRLParams, obs: Float[Array, " obs"], *, key: PRNGKeyArray) -> Array:
        """z = s_n·clip(w, −1, 1), w ~ π_z(·|s): the latent `sample` feeds the base flow."""
        w, _ = params.latent_policy.sample_and_log_prob(obs, key=key)
        return self.noise_scale * jnp.clip(w, -1.0, 1.0)

    def distillation_latent(self, params: DSRLParams, obs: Float[Array, " obs"], d: int, *, key: PRNGKeyArray):
        """The latent Q^z is distilled on: N(0, I_D) (reference, §9.10) or a sample of sg π_z."""
        if self.latent_distill_source == "gaussian":
            return jax.random.normal(key, (d,))
        return jax.lax.stop_gradient(self.policy_latent(params, obs, key=key))

    def example_loss(
        self, params: DSRLParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        distill_key, policy_key = jax.random.split(key)

        # Latent critic: regress Q^z_e(s, z) onto the (frozen) online critic's Q_e at the decoded action.
        latent = self.distillation_latent(params, obs, ctx.action_dim, key=distill_key)
        decoded_q = jax.lax.stop_gradient(ctx.critic(obs, self.latent_to_action(ctx, obs, latent)))
        distill_loss = jnp.mean(jnp.square(params.latent_critic(obs, latent) - decoded_q))

        # Latent actor: maximise the frozen Q^z with the entropy bonus of a frozen α.
        w, log_prob = params.latent_policy.sample_and_log_prob(obs, key=policy_key)
        frozen_latent_critic = stop_gradient_tree(params.latent_critic)
        latent_q = jnp.mean(frozen_latent_critic(obs, self.noise_scale * w))
        alpha = params.alpha()
        actor_loss = jax.lax.stop_gradient(alpha) * log_prob - latent_q

        # Temperature: α·(sg(−log π) − H_tgt); per example, so its batch mean is the SAC α-loss.
        target_entropy = -self.target_entropy_multiplier * ctx.action_dim
        alpha_loss = alpha * (jax.lax.stop_gradient(-log_prob) - target_entropy)

        metrics = {
            "distill_loss": distill_loss,
            "actor_loss": actor_loss,
            "alpha_loss": alpha_loss,
            "alpha": alpha,
            "entropy": -log_prob,
            "latent_q": latent_q,
        }
        return distill_loss + actor_loss + alpha_loss, metrics

    def loss(
        self, params: DSRLParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        return batch_mean_loss(
            lambda obs, key: self.example_loss(params, ctx, obs, key=key), batch.observations, key=key
        )

    def sample(
        self, params: DSRLParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        return self.latent_to_action(ctx, obs, self.policy_latent(params, obs, key=key))
