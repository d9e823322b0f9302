"""The agent every extractor plugs into: critic ensemble + behaviour flow + extractor (METHODS.md §3–§4).

One `update` is one optimiser step on the *sum* of the losses,

    L = L_Q (pessimistic chunked TD) + L_BC (flow matching on v_β) + L_extractor,

with optional global-norm clipping over all modules jointly (QAM, BAM: 1.0), followed by the EMA
of the critic and of the behaviour flow: θ̄ ← τ·θ_old + (1 − τ)·θ̄ with θ_old the parameters
*before* the step (the reference's one-step lag). `update_many` fuses many updates — batch sampling
included, on device — into one `lax.scan`, so a jitted call does N updates with no host round-trip.

Continuous hyperparameters (discount, ρ, τ) are array leaves of `AgentConfig`, so one compiled
update serves a sweep and `vmap`s over it; structural ones (sizes, H, batch size) are static.
"""

from __future__ import annotations

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from flowrl.batch import Batch
from flowrl.critic import ensemble_td_loss
from flowrl.extractor import AbstractExtractor, Context, frozen_context_loss
from flowrl.flow import flow_matching_loss
from flowrl.networks import CriticEnsemble, VelocityField, ema_update, stop_gradient_tree


@gin.register(module="flowrl")
class AgentConfig(eqx.Module):
    """Shared hyperparameters (defaults: METHODS §7, the paper's common settings)."""

    discount: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.99)  # γ
    rho: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # pessimism ρ
    ema_rate: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.005)  # τ
    horizon: int = eqx.field(static=True, default=5)  # action-chunk length H
    batch_size: int = eqx.field(static=True, default=256)
    learning_rate: float = eqx.field(static=True, default=3e-4)
    grad_clip_norm: float | None = eqx.field(static=True, default=None)  # None: no clipping
    num_critics: int = eqx.field(static=True, default=10)  # E
    actor_hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    critic_hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    critic_layer_norm: bool = eqx.field(static=True, default=True)
    target_update_interval: int = eqx.field(static=True, default=1)  # EMA every n-th update (ReBRAC: 2)
    skip_nonfinite_updates: bool = eqx.field(static=True, default=False)  # else the driver stops the run

    def __check_init__(self):
        if self.horizon < 1 or self.batch_size < 1 or self.num_critics < 1:
            raise ValueError(
                f"AgentConfig needs horizon, batch_size, num_critics >= 1; got "
                f"{self.horizon}, {self.batch_size}, {self.num_critics}"
            )

    def optimizer(self) -> optax.GradientTransformation:
        """Adam (lr 3e-4) over all modules, after a global-norm clip when `grad_clip_norm` is set."""
        adam = optax.adam(self.learning_rate)
        if self.grad_clip_norm is None:
            return adam
        return optax.chain(optax.clip_by_global_norm(self.grad_clip_norm), adam)


class Trainables(eqx.Module):
    """Everything the single optimiser updates."""

    critic: CriticEnsemble
    behavior_flow: VelocityField
    extractor: PyTree


class AgentState(eqx.Module):
    online: Trainables
    target_critic: CriticEnsemble
    target_behavior_flow: VelocityField
    opt_state: PyTree
    step: Array


def make_context(state: AgentState, obs_dim: int, action_dim: int) -> Context:
    return Context(
        behavior_flow=state.online.behavior_flow,
        target_behavior_flow=state.target_behavior_flow,
        critic=state.online.critic,
        target_critic=state.target_critic,
        obs_dim=obs_dim,
        action_dim=action_dim,
    )


def init_agent(
    extractor: AbstractExtractor,
    config: AgentConfig,
    obs_dim: int,
    action_dim: int,
    *,
    key: PRNGKeyArray,
) -> AgentState:
    """Fresh modules; targets start as exact copies of their online modules.

    `action_dim` is the chunked dimension D = H·A.
    """
    critic_key, flow_key, extractor_key = jax.random.split(key, 3)
    critic = extractor.make_critic(
        obs_dim,
        action_dim,
        config.critic_hidden_dims,
        config.num_critics,
        config.critic_layer_norm,
        key=critic_key,
    )
    flow = VelocityField(obs_dim, action_dim, config.actor_hidden_dims, key=flow_key)
    ctx = Context(flow, flow, critic, critic, obs_dim, action_dim)
    online = Trainables(critic, flow, extractor.init(ctx, key=extractor_key))
    opt_state = config.optimizer().init(eqx.filter(online, eqx.is_inexact_array))
    return AgentState(online, critic, flow, opt_state, jnp.zeros((), jnp.int32))


def _dims(state: AgentState) -> tuple[int, int]:
    flow = state.online.behavior_flow
    return flow.obs_dim, flow.action_dim


def agent_loss(
    online: Trainables,
    state: AgentState,
    batch: Batch,
    extractor: AbstractExtractor,
    config: AgentConfig,
    *,
    key: PRNGKeyArray,
) -> tuple[Float[Array, ""], dict[str, Array]]:
    """L_Q + L_BC + L_extractor for one batch (METHODS §3, §4.4)."""
    obs_dim, action_dim = _dims(state)
    td_key, bc_key, extractor_key = jax.random.split(key, 3)
    actions = batch.chunked_actions
    batch_size = actions.shape[0]
    ctx = Context(
        behavior_flow=online.behavior_flow,
        target_behavior_flow=state.target_behavior_flow,
        critic=online.critic,
        target_critic=state.target_critic,
        obs_dim=obs_dim,
        action_dim=action_dim,
    )
    frozen = stop_gradient_tree(ctx)
    frozen_extractor_params = stop_gradient_tree(online.extractor)
    aux_key, td_key = jax.random.split(td_key)

    # Critic: the extractor's backup (default: chunked pessimistic ensemble, a′ from its policy).
    targets = jax.lax.stop_gradient(
        extractor.td_target(
            frozen_extractor_params, frozen, batch, discount=config.discount, horizon=config.horizon,
            rho=config.rho, key=td_key,
        )
    )
    q = jax.vmap(online.critic)(batch.observations, actions)
    critic_loss = jnp.mean(jax.vmap(ensemble_td_loss)(q, targets, batch.valid))
    aux_critic_loss, aux_metrics = extractor.auxiliary_critic_loss(
        frozen_extractor_params, online.critic, frozen, batch, key=aux_key
    )

    # Behaviour flow: rectified-flow BC, valid-weighted.
    bc_losses = jax.vmap(lambda o, a, k: flow_matching_loss(online.behavior_flow, o, a, key=k))(
        batch.observations, actions, jax.random.split(bc_key, batch_size)
    )
    bc_loss = jnp.mean(bc_losses * batch.valid)

    extractor_loss, extractor_metrics = frozen_context_loss(
        extractor, online.extractor, ctx, batch, key=extractor_key
    )
    total = critic_loss + aux_critic_loss + bc_loss + extractor_loss
    metrics = {
        "loss/total": total,
        "critic/loss": critic_loss,
        **{f"critic/{name}": value for name, value in aux_metrics.items()},
        "critic/q_mean": jnp.mean(q),
        "critic/target_mean": jnp.mean(targets),
        "bc/loss": bc_loss,
        **{f"extractor/{name}": value for name, value in extractor_metrics.items()},
    }
    return total, metrics


def update(
    state: AgentState,
    batch: Batch,
    extractor: AbstractExtractor,
    config: AgentConfig,
    *,
    key: PRNGKeyArray,
) -> tuple[AgentState, dict[str, Array]]:
    """One gradient step on the summed loss, then the EMA of the critic and behaviour flow."""
    params, static = eqx.partition(state.online, eqx.is_inexact_array)

    def loss_of(trainable_params):
        online = eqx.combine(trainable_params, static)
        return agent_loss(online, state, batch, extractor, config, key=key)

    grads, metrics = jax.grad(loss_of, has_aux=True)(params)
    updates, opt_state = config.optimizer().update(grads, state.opt_state, params)
    new_online = eqx.combine(optax.apply_updates(params, updates), static)
    metrics["optim/grad_norm"] = optax.tree.norm(grads)
    # EMA with the pre-update parameters (one-step lag), every `target_update_interval` updates.
    do_ema = (state.step + 1) % config.target_update_interval == 0
    ema_rate = jnp.where(do_ema, config.ema_rate, 0.0)
    new_online = eqx.tree_at(
        lambda t: t.extractor,
        new_online,
        extractor.update_targets(state.online.extractor, new_online.extractor, ema_rate=ema_rate),
        is_leaf=lambda x: x is None,
    )
    new_state = AgentState(
        online=new_online,
        target_critic=ema_update(state.online.critic, state.target_critic, ema_rate),
        target_behavior_flow=ema_update(state.online.behavior_flow, state.target_behavior_flow, ema_rate),
        opt_state=opt_state,
        step=state.step + 1,
    )
    finite = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["optim/grad_norm"])
    if config.skip_nonfinite_updates:
        # Keep the old state (only the step counter advances) and count the skipped update.
        kept = eqx.tree_at(lambda s: s.step, state, new_state.step)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    metrics["optim/skipped"] = jnp.where(finite, 0.0, 1.0) if config.skip_nonfinite_updates else jnp.zeros(())
    return new_state, metrics


def update_many(
    state: AgentState,
    sample_batch,
    extractor: AbstractExtractor,
    config: AgentConfig,
    num_updates: int,
    *,
    key: PRNGKeyArray,
) -> tuple[AgentState, dict[str, Array]]:
    """`num_updates` updates in one `lax.scan`; `sample_batch(key) -> Batch` runs on device.

    Returns the final state and the metrics of every update (leading axis `num_updates`).
    """

    def one_update(carry: AgentState, index):
        # Update i draws from fold_in(key, i): keys are addressed, never carried or split twice.
        sample_key, update_key = jax.random.split(jax.random.fold_in(key, index))
        new_state, metrics = update(carry, sample_batch(sample_key), extractor, config, key=update_key)
        return new_state, metrics

    return jax.lax.scan(one_update, state, jnp.arange(num_updates))


def act(
    state: AgentState, extractor: AbstractExtractor, observations: Float[Array, "n obs"], *, key: PRNGKeyArray
) -> Float[Array, "n d"]:
    """Chunked actions for a batch of observations from the extractor's policy."""
    obs_dim, action_dim = _dims(state)
    ctx = make_context(state, obs_dim, action_dim)
    keys = jax.random.split(key, observations.shape[0])
    return jax.vmap(lambda o, k: extractor.sample(state.online.extractor, ctx, o, key=k))(
        observations, keys
    )
