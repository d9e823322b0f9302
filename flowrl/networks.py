"""Equinox networks with the reference conventions (METHODS.md §3).

Every network is *per-example*: it maps one observation (and one action / noisy action) to one
output; callers `vmap` over the batch. Conventions of the reference implementation:

- Dense kernels Xavier/Glorot uniform (variance_scaling(1, fan_avg, uniform)), biases zero.
- Each hidden layer is Dense → GELU (tanh approximation) → optional LayerNorm (eps 1e-6).
- Velocity fields take concat(obs, x, t) with t a raw scalar in [0, 1] (no Fourier embedding).
- The critic is an ensemble of E independent MLPs on concat(obs, action), evaluated in one
  vectorised call (parameters stacked on a leading axis; no Python loop over members).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


def xavier_uniform(key: PRNGKeyArray, fan_in: int, fan_out: int, scale: float = 1.0) -> Array:
    """Glorot uniform kernel of shape (fan_out, fan_in): U(±sqrt(6·scale / (fan_in + fan_out)))."""
    limit = math.sqrt(6.0 * scale / (fan_in + fan_out))
    return jax.random.uniform(key, (fan_out, fan_in), minval=-limit, maxval=limit)


class Dense(eqx.Module):
    """y = W x + b with a Xavier-uniform W and a zero b."""

    weight: Float[Array, "out inp"]
    bias: Float[Array, " out"]

    def __init__(self, in_size: int, out_size: int, *, key: PRNGKeyArray, kernel_scale: float = 1.0):
        self.weight = xavier_uniform(key, in_size, out_size, kernel_scale)
        self.bias = jnp.zeros((out_size,))

    def __call__(self, x: Float[Array, " inp"]) -> Float[Array, " out"]:
        # x·Wᵀ rather than W·x: under the callers' batch vmap this lowers to (B, in)·(in, out) with
        # no transpose of the result, ~1.5× faster for the stacked critic ensemble on CPU
        # (docs/performance.md); the value is the same product.
        return x @ self.weight.T + self.bias


class LayerNorm(eqx.Module):
    """LayerNorm with learnable scale and bias, eps = 1e-6 (the flax default the reference uses)."""

    scale: Float[Array, " n"]
    bias: Float[Array, " n"]
    eps: float = eqx.field(static=True, default=1e-6)

    def __init__(self, size: int, eps: float = 1e-6):
        self.scale = jnp.ones((size,))
        self.bias = jnp.zeros((size,))
        self.eps = eps

    def __call__(self, x: Float[Array, " n"]) -> Float[Array, " n"]:
        mean = jnp.mean(x)
        var = jnp.mean(jnp.square(x - mean))
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale + self.bias


def gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


class MLP(eqx.Module):
    """Dense → GELU → (LayerNorm) per hidden layer; the last layer is linear unless `activate_final`."""

    layers: tuple[Dense, ...]
    norms: tuple[LayerNorm, ...] | None
    activate_final: bool = eqx.field(static=True)

    def __init__(
        self,
        in_size: int,
        hidden: Sequence[int],
        out_size: int,
        *,
        key: PRNGKeyArray,
        layer_norm: bool = False,
        activate_final: bool = False,
    ):
        sizes = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(Dense(a, b, key=k) for a, b, k in zip(sizes[:-1], sizes[1:], keys))
        n_normed = len(self.layers) if activate_final else len(self.layers) - 1
        self.norms = tuple(LayerNorm(s) for s in sizes[1 : 1 + n_normed]) if layer_norm else None
        self.activate_final = activate_final

    def __call__(self, x: Float[Array, " inp"]) -> Float[Array, " out"]:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.activate_final:
                x = gelu(x)
                if self.norms is not None:
                    x = self.norms[i](x)
        return x


class VelocityField(eqx.Module):
    """Flow velocity v(s, x, t) ∈ R^D: an MLP on concat(obs, x, t), t a raw scalar (METHODS §3)."""

    mlp: MLP
    obs_dim: int = eqx.field(static=True)
    action_dim: int = eqx.field(static=True)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (512, 512, 512, 512),
        *,
        key: PRNGKeyArray,
        layer_norm: bool = False,
    ):
        self.mlp = MLP(obs_dim + action_dim + 1, hidden, action_dim, key=key, layer_norm=layer_norm)
        self.obs_dim = obs_dim
        self.action_dim = action_dim

    def __call__(
        self, obs: Float[Array, " obs"], x: Float[Array, " d"], t: Float[Array, ""]
    ) -> Float[Array, " d"]:
        return self.mlp(jnp.concatenate([obs, x, jnp.reshape(t, (1,)).astype(x.dtype)]))


class CriticEnsemble(eqx.Module):
    """E independent critics Q_e(s, a), stacked on a leading axis and evaluated in one `vmap`.

    `__call__(obs, action) -> (E,)`. With `action_dim = 0` it is a state-value ensemble V_e(s).
    """

    members: MLP  # every leaf has a leading axis of size E
    num_members: int = eqx.field(static=True)

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        hidden: Sequence[int] = (512, 512, 512, 512),
        num_members: int = 10,
        *,
        key: PRNGKeyArray,
        layer_norm: bool = True,
    ):
        make = lambda k: MLP(obs_dim + action_dim, hidden, 1, key=k, layer_norm=layer_norm)  # noqa: E731
        self.members = eqx.filter_vmap(make)(jax.random.split(key, num_members))
        self.num_members = num_members

    def __call__(self, obs: Float[Array, " obs"], action: Float[Array, " d"]) -> Float[Array, " e"]:
        inputs = jnp.concatenate([obs, action])

        @eqx.filter_vmap(in_axes=(eqx.if_array(0), None))
        def member_value(member: MLP, x: Array) -> Array:
            return member(x)[0]

        return member_value(self.members, inputs)


def ema_update(online, target, tau: Float[Array, ""] | float):
    """θ̄ ← τ·θ + (1 − τ)·θ̄ on every inexact array leaf (METHODS §3 "Targets / EMA")."""
    online_arrays, static = eqx.partition(online, eqx.is_inexact_array)
    target_arrays, _ = eqx.partition(target, eqx.is_inexact_array)
    mixed = jax.tree.map(lambda o, t: tau * o + (1.0 - tau) * t, online_arrays, target_arrays)
    return eqx.combine(mixed, static)


def stop_gradient_tree(tree):
    """`lax.stop_gradient` on every array leaf of a pytree that may hold non-array leaves."""
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), static)
