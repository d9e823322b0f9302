r"""RLPD — SAC with an action-chunked tanh-Gaussian actor (METHODS.md §5.10).

No flow is used by the policy: the actor π(a|s) is a tanh-Gaussian over the whole chunk (D = H·A),
trained SAC-style against the shared critic ensemble, with an optional behaviour-cloning term:

    L_π = mean_b ( sg(α)·log π(a|s) − [mean_e Q_e − ρ·std_e Q_e](s, a) )          a ~ π(·|s) (reparam.)
          − α_bc · mean_b ( log π(clip(a_data, ±(1 − 1e−5)) | s) · valid )
    L_α = α·( sg(−mean_b log π(a|s)) − H_tgt ),                                       H_tgt = −0.5·D

The critic's backup is overridden (`td_target`): a′ ~ π(·|s′) from the *online* actor and

    y = R + γ^H·M·( mean_e Q̄_e(s′, a′) − ρ·std_e Q̄_e(s′, a′) )      (no entropy bonus),

the pessimistic ensemble backup of every other method. Acting samples π and clips to [−1, 1].

Parity (ColinQiyangLi/qam `agents/rlpd.py`): quirk kept (METHODS §9.9) — the backup has no
entropy term, and the ensemble of E members is reduced by mean − ρ·std, not by the min over a
random subset as in the RLPD paper; `td_entropy_bonus=True` restores SAC's soft backup
y = R + γ^H·M·(mean_e Q̄_e − ρ·std_e Q̄_e − α·log π(a′|s′)). The paper runs RLPD online-only with
50/50 offline/online batches (§1.3); that schedule is the trainer's online phase
(`flowrl.online`), bound in experiments/rlpd/*.gin. The shared behaviour flow trains
alongside (the trainer always does) but the policy never uses it. Deliberate difference:
log π of sampled actions is computed from the pre-tanh sample (METHODS §9.14).

??? cite "References"
    Ball, Smith, Kostrikov, Levine, "Efficient Online Reinforcement Learning with Offline Data"
    (RLPD), ICML 2023. Haarnoja et al., "Soft Actor-Critic Algorithms and Applications", 2018.
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baseline "RLPD".
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.critic import chunked_td_target, pessimistic_value
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.policies import LogScalar, TanhGaussian
from flowrl.registry import register_extractor

DATA_ACTION_BOUND = 1.0 - 1e-5  # dataset actions are clipped inside (−1, 1) before atanh


class RLPDParams(eqx.Module):
    """RLPD's trainable parts: the chunk actor π(a|s) and the temperature α."""

    actor: TanhGaussian
    alpha: LogScalar


@register_extractor("rlpd")
class RLPD(AbstractExtractor):
    """SAC-style chunked tanh-Gaussian actor. Defaults: METHODS §7; α_bc per domain §8.2."""

    bc_alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.0)  # α_bc
    rho: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # pessimism of the actor's Q
    target_entropy_multiplier: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # H_tgt = −m·D
    init_alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # α at init (`init_temp`)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    td_entropy_bonus: bool = eqx.field(static=True, default=False)  # §9.9: False = reference backup

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> RLPDParams:
        return RLPDParams(
            actor=TanhGaussian(ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=key),
            alpha=LogScalar(self.init_alpha),
        )

    def example_loss(
        self,
        params: RLPDParams,
        ctx: Context,
        obs: Float[Array, " obs"],
        data_action: Float[Array, " d"],
        valid: Float[Array, ""],
        *,
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], Metrics]:
        action, log_prob = params.actor.sample_and_log_prob(obs, key=key)
        q = pessimistic_value(ctx.critic(obs, action), self.rho)
        alpha = params.alpha()
        actor_loss = jax.lax.stop_gradient(alpha) * log_prob - q
        target_entropy = -self.target_entropy_multiplier * ctx.action_dim
        alpha_loss = alpha * (jax.lax.stop_gradient(-log_prob) - target_entropy)
        data_log_prob = params.actor.log_prob(obs, jnp.clip(data_action, -DATA_ACTION_BOUND, DATA_ACTION_BOUND))
        bc_loss = -self.bc_alpha * data_log_prob * valid
        metrics = {
            "actor_loss": actor_loss,
            "alpha_loss": alpha_loss,
            "bc_loss": bc_loss,
            "alpha": alpha,
            "entropy": -log_prob,
            "q": q,
        }
        return actor_loss + alpha_loss + bc_loss, metrics

    def loss(
        self, params: RLPDParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        keys = jax.random.split(key, batch.batch_size)
        losses, metrics = jax.vmap(
            lambda obs, a, v, k: self.example_loss(params, ctx, obs, a, v, key=k)
        )(batch.observations, batch.chunked_actions, batch.valid, keys)
        loss = jnp.mean(losses)
        return loss, {"loss": loss, **{name: jnp.mean(value) for name, value in metrics.items()}}

    def td_target(
        self,
        params: RLPDParams,
        ctx: Context,
        batch: Batch,
        *,
        discount: Float[Array, ""],
        horizon: int,
        rho: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> Float[Array, " b"]:
        """y = R + γ^H·M·(mean_e − ρ·std_e) Q̄_e(s′, a′), a′ ~ π(·|s′) online actor; − α·log π(a′|s′)
        inside the bracket only with `td_entropy_bonus`."""
        keys = jax.random.split(key, batch.batch_size)
        next_actions, next_log_probs = jax.vmap(lambda o, k: params.actor.sample_and_log_prob(o, key=k))(
            batch.next_observations, keys
        )
        next_q = jax.vmap(ctx.target_critic)(batch.next_observations, next_actions)
        targets = jax.vmap(chunked_td_target, in_axes=(0, 0, 0, None, None, None))(
            batch.rewards, batch.masks, next_q, discount, horizon, rho
        )
        if self.td_entropy_bonus:
            targets = targets - (discount**horizon) * batch.masks * params.alpha() * next_log_probs
        return targets

    def sample(
        self, params: RLPDParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        action, _ = params.actor.sample_and_log_prob(obs, key=key)
        return jnp.clip(action, -1.0, 1.0)
