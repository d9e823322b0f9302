"""The policy-extraction strategy interface.

A policy *extractor* turns a behaviour-cloned flow v_β and a learned critic Q into an improved
policy. flowrl's trainer owns the parts every method shares — the critic ensemble and its TD loss,
the behaviour flow and its flow-matching loss, the EMA targets, the optimiser — and hands them to
the extractor, read-only, as a `Context`. The extractor owns only its own trainable parts.

Writing a new extractor is one file, one registration and one gin file:

```python
@register_extractor("my-method")
class MyMethod(AbstractExtractor):
    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # a sweepable leaf
    flow_steps: int = eqx.field(static=True, default=10)                        # structural

    def init(self, ctx, *, key): ...                     # -> its trainable pytree (or None)
    def loss(self, params, ctx, batch, *, key): ...      # -> (scalar, {name: scalar})
    def sample(self, params, ctx, obs, *, key): ...      # -> one action chunk for one observation
```

Contract (tests/test_extractor_contract.py checks it for every registered name):

- Concrete extractors are final, hold hyperparameters only and construct with no arguments
  (paper defaults). Continuous hyperparameters are array leaves (`converter=jnp.asarray`), so a
  sweep can `vmap` over them without recompiling; structural ones are `static=True`.
- `loss` receives the context with gradients stopped; only `params` is trained by it.
- `sample` is per observation, deterministic per key, and returns actions in [−1, 1].

Optional hooks, with defaults that reproduce the common case (override only what a method needs;
the trainer has no per-method code):

- `td_target` — the critic's backup y (default: the pessimistic chunked ensemble backup with
  a′ from `sample`, METHODS §3). IFQL backs up a value net instead; ReBRAC smooths its target action.
- `auxiliary_critic_loss` — extra losses that train the *shared* critic (CGQL's noisy-critic loss).
- `make_critic` — the critic architecture (CGQL's critic is time-conditioned).
- `update_targets` — EMA copies the extractor keeps inside its own params (ReBRAC's target actor).
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from flowrl.batch import Batch
from flowrl.critic import chunked_td_target
from flowrl.networks import CriticEnsemble, stop_gradient_tree

Metrics = dict[str, Float[Array, ""]]


class Context(eqx.Module):
    """What an extractor may read but never trains.

    - `behavior_flow` / `target_behavior_flow`: v_β (online, trained by flow matching) and its EMA v̄_β;
      callables `(obs, x, t) -> velocity`.
    - `critic` / `target_critic`: Q_e and the EMA Q̄_e; callables `(obs, action) -> (E,)`.
    - `obs_dim`, `action_dim`: the problem's dimensions (`action_dim` is the chunked D = H·A).
    """

    behavior_flow: Any
    target_behavior_flow: Any
    critic: Any
    target_critic: Any
    obs_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)


class AbstractExtractor(eqx.Module):
    """A policy-extraction strategy: (behaviour flow, critic) → an improved policy.

    Subclasses implement `init`, `loss` and `sample` (see the module docstring for the contract).
    """

    @abc.abstractmethod
    def init(self, ctx: Context, *, key: PRNGKeyArray) -> PyTree:
        """The extractor's own trainable parts (e.g. a fine-tuned flow), or None."""

    @abc.abstractmethod
    def loss(
        self, params: PyTree, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """Scalar batch loss of the extractor's own parts, and scalar metrics."""

    @abc.abstractmethod
    def sample(
        self, params: PyTree, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """One (chunked) action in [−1, 1] for one observation."""

    # ---- optional hooks (defaults = the common case) -----------------------------------------

    def td_target(
        self,
        params: PyTree,
        ctx: Context,
        batch: Batch,
        *,
        discount: Float[Array, ""],
        horizon: int,
        rho: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> Float[Array, " b"]:
        """Backup y_b = R + γ^H·M·(mean_e − ρ·std_e) Q̄_e(s′, a′), a′ = `sample`(s′) (METHODS §3).

        Called under stop-gradient; override for a method-specific backup.
        """
        keys = jax.random.split(key, batch.batch_size)
        next_actions = jax.vmap(lambda o, k: self.sample(params, ctx, o, key=k))(batch.next_observations, keys)
        next_q = jax.vmap(ctx.target_critic)(batch.next_observations, next_actions)
        return jax.vmap(chunked_td_target, in_axes=(0, 0, 0, None, None, None))(
            batch.rewards, batch.masks, next_q, discount, horizon, rho
        )

    def auxiliary_critic_loss(
        self, params: PyTree, critic: Any, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """An extra loss on the shared online `critic` (gradients reach it); default none."""
        return jnp.zeros(()), {}

    def make_critic(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: tuple[int, ...],
        num_members: int,
        layer_norm: bool,
        *,
        key: PRNGKeyArray,
    ) -> Any:
        """The shared critic: `(obs, action) -> (E,)`. Default: `CriticEnsemble`."""
        return CriticEnsemble(obs_dim, action_dim, hidden_dims, num_members, key=key, layer_norm=layer_norm)

    def update_targets(self, old_params: PyTree, new_params: PyTree, *, ema_rate: Float[Array, ""]) -> PyTree:
        """After each optimiser step: refresh EMA copies kept in the params (θ_old → θ̄). Default: none."""
        return new_params


def frozen_context_loss(
    extractor: AbstractExtractor, params: PyTree, ctx: Context, batch: Batch, *, key: PRNGKeyArray
) -> tuple[Float[Array, ""], Metrics]:
    """`extractor.loss` with the context's gradients stopped: the only path the trainer uses.

    Whatever an extractor does, no gradient of its loss reaches the critic or the behaviour flow.
    """
    return extractor.loss(params, stop_gradient_tree(ctx), batch, key=key)


def batch_mean_loss(example_loss, observations: Float[Array, "b obs"], *, key: PRNGKeyArray):
    """Average a per-example loss `example_loss(obs, key=k) -> (scalar, metrics)` over a batch.

    Each example gets its own key; metrics are averaged too and the mean loss is reported as "loss".
    """
    keys = jax.random.split(key, observations.shape[0])
    losses, metrics = jax.vmap(lambda obs, k: example_loss(obs, key=k))(observations, keys)
    loss = jnp.mean(losses)
    return loss, {"loss": loss, **{name: jnp.mean(value) for name, value in metrics.items()}}
