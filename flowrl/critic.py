"""Critic maths: the pessimistic ensemble backup and the TD loss (METHODS.md §3), rlax-style.

Everything is per example; the trainer `vmap`s over the batch.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def pessimistic_value(q_values: Float[Array, " e"], rho: Float[Array, ""] | float) -> Float[Array, ""]:
    """mean_e Q_e − ρ·std_e Q_e (population std, ddof = 0) over the ensemble axis.

    The std's gradient is taken as 0 where all members agree (E = 1, or identical members):
    d sqrt(v)/dv is infinite at v = 0 and would turn gradients into NaN even with ρ = 0.
    """
    variance = jnp.var(q_values)
    positive = variance > 0.0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, variance, 1.0)), 0.0)
    return jnp.mean(q_values) - rho * std


def chunked_td_target(
    reward: Float[Array, ""],
    mask: Float[Array, ""],
    next_q_values: Float[Array, " e"],
    discount: Float[Array, ""] | float,
    horizon: int,
    rho: Float[Array, ""] | float,
) -> Float[Array, ""]:
    """y = R_{H−1} + γ^H · M_{H−1} · (mean_e Q̄_e(s′, a′) − ρ·std_e Q̄_e(s′, a′)).

    The n-step (action-chunk) backup of QAM (METHODS §3 "Pessimistic ensemble backup"); the same
    scalar y is the target of every ensemble member.
    """
    return reward + (discount**horizon) * mask * pessimistic_value(next_q_values, rho)


def ensemble_td_loss(
    q_values: Float[Array, " e"], target: Float[Array, ""], valid: Float[Array, ""]
) -> Float[Array, ""]:
    """mean_e (Q_e(s, a) − y)² · valid — averaged over the batch by the caller (invalid rows count)."""
    return jnp.mean(jnp.square(q_values - target)) * valid
