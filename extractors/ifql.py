r"""IFQL — implicit flow Q-learning (flow IDQL): expectile value, value backup, best-of-N acting.

Baseline of Li & Levine (ICLR 2026), METHODS.md §5.7 (ColinQiyangLi/qam `agents/ifql.py`, itself
after seohongpark/fql `agents/ifql.py`). The extractor owns a state value V(s) (LayerNorm MLP,
`extractors/_value.py`); the policy is the trainer's plain BC flow v_β, re-ranked by the critic:

    q    = mean_e Q̄_e(s, a) − ρ·std_e Q̄_e(s, a)                (dataset action, target critic)
    L_V  = mean_b |κ − 1[q − V(s) < 0]| · (q − V(s))²            (expectile κ; no valid mask)
    y    = R + γ^H · M · sg V(s′)                                 (`td_target`: online V, no a′)
    π(s) = argmax_{a_k} min_e Q_e(s, a_k),  a_k = clip(ODE_{v_β}(s, z_k)), k = 1 … N = 32

The critic loss is the trainer's shared TD loss mean_{e,b} (Q_e − y)²·valid with this backup; the
BC flow is the trainer's L_BC. Acting uses the *online* behaviour flow and the *online* critic.

Parity: candidates are ranked by the ensemble *minimum* (METHODS §9 quirk 7; other methods use
the mean) — kept. The reference's `sample_actions` only works for one un-batched observation;
here `sample` is per observation and the trainer vmaps it, so batched acting simply works and
every observation gets its own 32 candidates (the single-observation limitation is gone, with
identical results for one observation). ρ is this extractor's own field (the gin files bind the
domain's ρ, as the reference reads its config ρ in the value loss).

??? cite "References"
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026 (arXiv 2601.14234), baseline "IFQL".
    Hansen-Estruch et al., "IDQL: Implicit Q-Learning as an Actor-Critic Method with Diffusion
    Policies", 2023. Kostrikov, Nair & Levine, "Offline RL with Implicit Q-Learning", ICLR 2022.
    Park, Li & Levine, "Flow Q-Learning", ICML 2025 (the IFQL baseline).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from extractors._value import StateValue
from flowrl.batch import Batch
from flowrl.critic import pessimistic_value
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.flow import euler_ode_sample
from flowrl.registry import register_extractor


def expectile_loss(diff: Float[Array, "*b"], expectile: Float[Array, ""]) -> Float[Array, "*b"]:
    """|κ − 1[diff < 0]| · diff², diff = q − V: weight κ above V, 1 − κ below (IQL's value loss)."""
    weight = jnp.where(diff >= 0, expectile, 1.0 - expectile)
    return weight * jnp.square(diff)


def select_by_min_q(candidates: Float[Array, "n d"], q_values: Float[Array, "n e"]) -> Float[Array, " d"]:
    """The candidate whose *smallest* ensemble value is largest: argmax_k min_e Q_e(s, a_k)."""
    return candidates[jnp.argmax(jnp.min(q_values, axis=-1))]


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


@register_extractor("ifql")
class IFQL(AbstractExtractor):
    """Flow IDQL. Fields: paper defaults (METHODS §7); per-domain κ and ρ in experiments/."""

    kappa: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.9)  # expectile κ
    rho: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # pessimism of the value target
    num_samples: int = eqx.field(static=True, default=32)  # N candidates per observation
    flow_steps: int = eqx.field(static=True, default=10)  # K
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # V MLP

    def __check_init__(self):
        if self.flow_steps < 1 or self.num_samples < 1:
            raise ConfigError(
                f"ifql.flow_steps and ifql.num_samples must be >= 1, got {self.flow_steps} and "
                f"{self.num_samples}; the paper uses 10 and 32"
            )
        if _is_concrete(self.kappa) and not bool(jnp.all((self.kappa > 0) & (self.kappa < 1))):
            raise ConfigError(f"ifql.kappa must lie in (0, 1), got {self.kappa}; the paper uses 0.7 … 0.95")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> StateValue:
        return StateValue(ctx.obs_dim, self.hidden_dims, key=key)

    def loss(
        self, params: StateValue, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """L_V: expectile regression of V(s) on the pessimistic target-critic value at the dataset action."""
        del key  # deterministic
        target_q = jax.vmap(ctx.target_critic)(batch.observations, batch.chunked_actions)  # (b, e)
        q = jax.vmap(pessimistic_value, in_axes=(0, None))(target_q, self.rho)
        v = jax.vmap(params)(batch.observations)
        loss = jnp.mean(expectile_loss(q - v, self.kappa))
        metrics = {
            "loss": loss,
            "v_mean": jnp.mean(v),
            "v_max": jnp.max(v),
            "v_min": jnp.min(v),
            "above_v_frac": jnp.mean((q >= v).astype(jnp.float32)),
        }
        return loss, metrics

    def td_target(
        self,
        params: StateValue,
        ctx: Context,
        batch: Batch,
        *,
        discount: Float[Array, ""],
        horizon: int,
        rho: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> Float[Array, " b"]:
        """y = R_{H−1} + γ^H · M_{H−1} · V(s′) with the online V (the trainer stops its gradient)."""
        del rho, key  # the backup has no action sample and no ensemble
        next_v = jax.vmap(params)(batch.next_observations)
        return batch.rewards + (discount**horizon) * batch.masks * jax.lax.stop_gradient(next_v)

    def candidate_actions(
        self, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, "n d"]:
        """a_k = clip(ODE_{v_β}(s, z_k), −1, 1), k = 1 … N, from the online behaviour flow."""
        noises = jax.random.normal(key, (self.num_samples, ctx.action_dim))
        return jax.vmap(lambda z: euler_ode_sample(ctx.behavior_flow, obs, z, self.flow_steps))(noises)

    def sample(
        self, params: StateValue, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """argmax_k min_e Q_e(s, a_k) over N behaviour-flow candidates (online critic)."""
        candidates = self.candidate_actions(ctx, obs, key=key)
        q_values = jax.vmap(ctx.critic, in_axes=(None, 0))(obs, candidates)  # (n, e)
        return select_by_min_q(candidates, q_values)
