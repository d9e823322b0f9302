"""What the one-step head and the edit head share: composition over an inner extractor.

A *head* wraps any inner extractor (QAM, or the behaviour flow for FQL / FEdit) and adds one
trainable policy on top of it (METHODS.md §4.4, QAM-F / QAM-E extras; §5.8; §5.9):

- params are `HeadParams(inner=<the inner's params>, head=<the head's own modules>)`;
- the loss is the inner's loss plus the head's extra loss (one Adam step on the sum);
- the head's policy replaces the inner's for acting and for the TD target a′;
- the other hooks (`make_critic`, `auxiliary_critic_loss`, `update_targets`) are the inner's.

Each head has a strength (FQL's α, the edit scale β). Where the paper sets it to 0 (QAM-F on
cube-double / puzzle-3x3, QAM-E on scene / cube-double, METHODS §4.5) the reference builds no head
and runs plain QAM. A head with strength 0 therefore *is* its inner: same samples for the same
key, same initial parameters and loss for the same key, same TD target; its own modules get zero
gradient. The switch is a `lax.cond` on the (traced) strength, so a sweep over it needs no
recompilation; only the branch taken runs.
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from flowrl.batch import Batch
from flowrl.extractor import AbstractExtractor, Context, Metrics


class HeadParams(eqx.Module):
    """Trainable parts of a head extractor: the inner extractor's and the head's own."""

    inner: PyTree
    head: PyTree


def route_keys(enabled: Bool[Array, ""], key: PRNGKeyArray) -> tuple[PRNGKeyArray, PRNGKeyArray]:
    """(inner key, head key): `split(key)` when the head is on; when it is off the inner gets `key`
    itself, so a disabled head leaves the inner's random stream exactly as the inner alone has it.

    The off branch hands out a clone of `key` for the head, which is then never consumed (the
    head's branch is not taken); `jax.random.clone` tells the key-reuse checker so.
    """
    return jax.lax.cond(
        enabled,
        lambda k: tuple(jax.random.split(k)),
        lambda k: (jax.random.clone(k), jax.random.clone(k)),
        key,
    )


def zero_like_output(fn, *args):
    """Zeros with the shapes and dtypes `fn(*args)` would return (the disabled branch of a head)."""
    shapes = jax.eval_shape(fn, *args)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


class AbstractHead(AbstractExtractor):
    """An extractor = an inner extractor + a head policy that replaces it when `enabled()`.

    Subclasses implement `enabled`, `init_head`, `head_loss` and `head_sample`.
    """

    inner: eqx.AbstractVar[AbstractExtractor]

    @abc.abstractmethod
    def enabled(self) -> Bool[Array, ""]:
        """Whether the head is on (its strength > 0); off, the extractor is exactly `inner`."""

    @abc.abstractmethod
    def init_head(self, ctx: Context, *, key: PRNGKeyArray) -> PyTree:
        """The head's own trainable modules."""

    @abc.abstractmethod
    def head_loss(
        self, params: HeadParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """The head's extra loss (added to the inner's) and its metrics."""

    @abc.abstractmethod
    def head_sample(
        self, params: HeadParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """The head's action for one observation (used when `enabled()`)."""

    # ---- the extractor interface, composed -----------------------------------------------------

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> HeadParams:
        """The inner's params (from `key` itself when the head is off, as the inner alone) and the head's."""
        inner_key, head_key = route_keys(self.enabled(), key)
        return HeadParams(self.inner.init(ctx, key=inner_key), self.init_head(ctx, key=head_key))

    def loss(
        self, params: HeadParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """L = L_inner + (L_head if enabled else 0); inner metrics are reported as `inner/<name>`."""
        enabled = self.enabled()
        inner_key, head_key = route_keys(enabled, key)
        inner_loss, inner_metrics = self.inner.loss(params.inner, ctx, batch, key=inner_key)

        def extra(k):
            return self.head_loss(params, ctx, batch, key=k)

        head_loss, head_metrics = jax.lax.cond(enabled, extra, lambda k: zero_like_output(extra, k), head_key)
        total = inner_loss + head_loss
        return total, {
            "loss": total,
            **{f"inner/{name}": value for name, value in inner_metrics.items()},
            **head_metrics,
        }

    def sample(
        self, params: HeadParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        return jax.lax.cond(
            self.enabled(),
            lambda k: self.head_sample(params, ctx, obs, key=k),
            lambda k: self.inner.sample(params.inner, ctx, obs, key=k),
            key,
        )

    def td_target(
        self,
        params: HeadParams,
        ctx: Context,
        batch: Batch,
        *,
        discount: Float[Array, ""],
        horizon: int,
        rho: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> Float[Array, " b"]:
        """On: the pessimistic chunked backup with a′ from the head's policy (METHODS §6, QAM-F /
        QAM-E / FQL / FEdit rows). Off: the inner's own backup."""
        options = dict(discount=discount, horizon=horizon, rho=rho)
        return jax.lax.cond(
            self.enabled(),
            lambda k: AbstractExtractor.td_target(self, params, ctx, batch, **options, key=k),
            lambda k: self.inner.td_target(params.inner, ctx, batch, **options, key=k),
            key,
        )

    def auxiliary_critic_loss(
        self, params: HeadParams, critic: Any, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        return self.inner.auxiliary_critic_loss(params.inner, critic, ctx, batch, key=key)

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
        return self.inner.make_critic(obs_dim, action_dim, hidden_dims, num_members, layer_norm, key=key)

    def update_targets(
        self, old_params: HeadParams, new_params: HeadParams, *, ema_rate: Float[Array, ""]
    ) -> HeadParams:
        inner = self.inner.update_targets(old_params.inner, new_params.inner, ema_rate=ema_rate)
        return HeadParams(inner, new_params.head)
