r"""ReBRAC — revisited behaviour-regularised actor-critic (Tarasov et al., NeurIPS 2023), as run in
the QAM paper (METHODS.md §5.11, reference `agents/rebrac.py`).

A deterministic actor μ(s) = tanh(m(s)) (MLP trunk 512×4, GELU, activate_final → mean head with
variance_scaling(0.01, fan_avg, uniform) init; the tanh-Gaussian's constant log-std 0 is never
used, only its mode) and an EMA target actor μ̄ kept in this extractor's params:

    TD:     a′ = clip(μ̄(s′) + clip(ε, −c, c), −1, 1), ε ~ N(0, σ² I);  y = the §3 pessimistic backup,
    actor:  q_b = mean_e Q_e(s_b, μ(s_b)) − ρ·std_e Q_e(s_b, μ(s_b)),  λ_n = sg(1 / mean_b |q_b|),
            L = −mean_b(λ_n·q_b) + α_bc · mean_b[ Σ_d (μ(s_b) − a_b)_d² · valid_b ],
    acting: clip(μ(s) + clip(ε, −c, c), −1, 1)  (σ = `actor_noise`, c = `noise_clip`).

Parity quirks kept (METHODS §9.4): evaluation also adds the exploration noise (acting is one
sampler); no critic-side BC penalty; the actor is trained every step while the critic and actor
targets are EMA'd only every 2nd step — set `flowrl.AgentConfig.target_update_interval = 2` (the
experiments/rebrac/*.gin files do), which gates this extractor's `update_targets` and the
trainer's critic EMA alike. The trainer's shared behaviour flow trains alongside, unused.
ρ in the actor loss is this extractor's `rho` (the gin files bind the domain's ρ).
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.batch import Batch
from flowrl.critic import chunked_td_target, pessimistic_value
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.networks import MLP, Dense, ema_update
from flowrl.registry import register_extractor


class DeterministicTanhActor(eqx.Module):
    """μ(s) = tanh(W·trunk(s) + b): the mode of ReBRAC's constant-std tanh-Gaussian actor (METHODS §3)."""

    trunk: MLP
    mean_head: Dense

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: Sequence[int], *, key: PRNGKeyArray, final_scale: float = 0.01
    ):
        trunk_key, head_key = jax.random.split(key)
        self.trunk = MLP(obs_dim, hidden[:-1], hidden[-1], key=trunk_key, activate_final=True)
        self.mean_head = Dense(hidden[-1], action_dim, key=head_key, kernel_scale=final_scale)

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, " d"]:
        return jnp.tanh(self.mean_head(self.trunk(obs)))


class ReBRACParams(eqx.Module):
    actor: DeterministicTanhActor
    target_actor: DeterministicTanhActor  # EMA of `actor`, refreshed by `update_targets`


def clipped_noise(
    key: PRNGKeyArray, shape: tuple[int, ...], std: Float[Array, ""], clip: Float[Array, ""]
) -> Float[Array, "..."]:
    """clip(σ·N(0, I), −c, c): TD3's target-policy smoothing noise."""
    return jnp.clip(std * jax.random.normal(key, shape), -clip, clip)


def rebrac_actor_objective(
    q_values: Float[Array, " b"],
    actions: Float[Array, "b d"],
    data_actions: Float[Array, "b d"],
    valid: Float[Array, " b"],
    alpha_bc: Float[Array, ""],
) -> tuple[Float[Array, ""], Metrics]:
    """−mean(λ_n·q) + α_bc·mean_b[Σ_d (a − a_data)²·valid], λ_n = sg(1/mean|q|) (pure; batch level)."""
    scale = jax.lax.stop_gradient(1.0 / jnp.mean(jnp.abs(q_values)))
    q_loss = -jnp.mean(scale * q_values)
    squared_error = jnp.sum(jnp.square(actions - data_actions), axis=-1) * valid
    bc_loss = alpha_bc * jnp.mean(squared_error)
    return q_loss + bc_loss, {"q_loss": q_loss, "bc_loss": bc_loss, "bc_mse": jnp.mean(squared_error), "q_scale": scale}


@register_extractor("rebrac")
class ReBRAC(AbstractExtractor):
    """Deterministic actor + BC penalty + target smoothing. Defaults: METHODS §7."""

    actor_noise: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.2)  # σ
    alpha_bc: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.0)  # α_bc (`alpha_actor`)
    noise_clip: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # c (`actor_noise_clip`)
    rho: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # ρ of the actor's Q
    actor_fc_scale: float = eqx.field(static=True, default=0.01)  # init scale of the mean head
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))

    def __check_init__(self):
        if not self.hidden_dims:
            raise ConfigError("rebrac.hidden_dims must name at least one layer, e.g. (512, 512, 512, 512)")
        if not self.actor_fc_scale > 0:
            raise ConfigError(f"rebrac.actor_fc_scale must be > 0, got {self.actor_fc_scale}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> ReBRACParams:
        actor = DeterministicTanhActor(
            ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=key, final_scale=self.actor_fc_scale
        )
        return ReBRACParams(actor, actor)  # the target starts as an exact copy

    def loss(
        self, params: ReBRACParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        del key  # deterministic actor
        actions = jax.vmap(params.actor)(batch.observations)
        q_values = jax.vmap(lambda o, a: pessimistic_value(ctx.critic(o, a), self.rho))(batch.observations, actions)
        loss, metrics = rebrac_actor_objective(
            q_values, actions, batch.chunked_actions, batch.valid, self.alpha_bc
        )
        return loss, {"loss": loss, **metrics, "q": jnp.mean(q_values)}

    def sample(
        self, params: ReBRACParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """clip(μ(s) + clip(σ·ε, −c, c), −1, 1) — also at evaluation (quirk §9.4)."""
        action = params.actor(obs)
        return jnp.clip(action + clipped_noise(key, action.shape, self.actor_noise, self.noise_clip), -1.0, 1.0)

    def td_target(
        self,
        params: ReBRACParams,
        ctx: Context,
        batch: Batch,
        *,
        discount: Float[Array, ""],
        horizon: int,
        rho: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> Float[Array, " b"]:
        """y = R + γ^H·M·(mean_e − ρ·std_e) Q̄_e(s′, a′) with the smoothed target action
        a′ = clip(μ̄(s′) + clip(σ·ε, −c, c), −1, 1) (target actor, target critic; METHODS §5.11)."""
        target_actions = jax.vmap(params.target_actor)(batch.next_observations)
        noise = clipped_noise(key, target_actions.shape, self.actor_noise, self.noise_clip)
        next_actions = jnp.clip(target_actions + noise, -1.0, 1.0)
        next_q = jax.vmap(ctx.target_critic)(batch.next_observations, next_actions)
        return jax.vmap(chunked_td_target, in_axes=(0, 0, 0, None, None, None))(
            batch.rewards, batch.masks, next_q, discount, horizon, rho
        )

    def update_targets(
        self, old_params: ReBRACParams, new_params: ReBRACParams, *, ema_rate: Float[Array, ""]
    ) -> ReBRACParams:
        """μ̄ ← τ·μ_old + (1 − τ)·μ̄ with the pre-update actor (one-step lag, as the critic's EMA)."""
        return ReBRACParams(new_params.actor, ema_update(old_params.actor, old_params.target_actor, ema_rate))
