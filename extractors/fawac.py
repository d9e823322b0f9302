r"""FAWAC — advantage-weighted flow matching (AWAC/AWR with a flow policy), METHODS.md §5.3.

Baseline of Li & Levine (ICLR 2026), ColinQiyangLi/qam `agents/fawac.py`. The extractor owns a flow
v_φ and a state-value net V(s) (LayerNorm MLP, `extractors/_value.py`) and trains both with

    L_V   = mean_{e,b} (Q̄_e(s, a) − V(s))² · valid                       (plain MSE to every target member)
    w     = sg min( exp(λ·(mean_e Q_e(s, a) − V(s))), w_max )              (online critic, w_max = 100)
    L_AWR = mean_b [ mean_d (v_φ(s, x_τ, τ) − (a − z))² · w · valid ],   x_τ = (1 − τ) z + τ a,

with a the dataset action chunk, z ~ N(0, I), τ ~ U[0, 1); the extractor's loss is L_V + L_AWR.
Without the cap the minimiser of L_AWR is the flow of π(a|s) ∝ π_β(a|s)·exp(λ·Q(s, a)) — the same
tilted target as QAM with τ = λ; V(s) only rescales the weights per state (it sets how often the
cap binds and the effective step size). Acting and TD targets use a = clip(ODE_{v_φ}(s, z)).

Parity quirks kept: V is a plain-MSE fit of the target ensemble at dataset actions, i.e.
V ≈ E_β[mean_e Q̄_e] (METHODS §9 quirk 8 — not IQL's expectile); the weight uses the online
critic's plain ensemble mean; no gradient clipping. Differences: the reference adds L_V to its
critic loss — here V belongs to the extractor, so L_V sits in the extractor's loss (the trainer
sums all losses into one Adam step, so the update is the same); the trainer's shared behaviour
flow v_β trains alongside v_φ, unused by the policy.

??? cite "References"
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026 (arXiv 2601.14234), baseline "FAWAC".
    Nair, Gupta, Dalal & Levine, "AWAC: Accelerating Online RL with Offline Datasets", 2020.
    Peng, Kumar, Zhang & Levine, "Advantage-Weighted Regression", 2019.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from extractors._value import StateValue
from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.flow import euler_ode_sample, flow_matching_loss
from flowrl.networks import VelocityField
from flowrl.registry import register_extractor


def advantage_weight(
    q_mean: Float[Array, "*b"], value: Float[Array, "*b"], inv_temp: Float[Array, ""], cap: Float[Array, ""]
) -> Float[Array, "*b"]:
    """w = min(exp(λ·(Q − V)), cap), the capped AWR weight (IQL's actor uses the same cap of 100).

    exp may overflow to +inf for large advantages; the minimum then returns the cap (never NaN).
    """
    return jnp.minimum(jnp.exp(inv_temp * (q_mean - value)), cap)


class FAWACParams(eqx.Module):
    """FAWAC's trainable parts: the weighted flow v_φ and the state value V(s)."""

    flow: VelocityField
    value: StateValue


def _is_concrete(value) -> bool:
    return not isinstance(value, jax.core.Tracer)


@register_extractor("fawac")
class FAWAC(AbstractExtractor):
    """Advantage-weighted flow matching. Fields: paper defaults (METHODS §7); per-domain λ in experiments/."""

    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=10.0)  # λ
    weight_cap: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=100.0)  # hard-wired 100 in the reference
    flow_steps: int = eqx.field(static=True, default=10)  # K
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # v_φ and V MLPs

    def __check_init__(self):
        if self.flow_steps < 1:
            raise ConfigError(f"fawac.flow_steps must be >= 1, got {self.flow_steps}; bind e.g. fawac.flow_steps = 10")
        if _is_concrete(self.weight_cap) and not bool(jnp.all(self.weight_cap > 0)):
            raise ConfigError(f"fawac.weight_cap must be > 0, got {self.weight_cap}; the reference uses 100.0")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> FAWACParams:
        flow_key, value_key = jax.random.split(key)
        return FAWACParams(
            flow=VelocityField(ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=flow_key),
            value=StateValue(ctx.obs_dim, self.hidden_dims, key=value_key),
        )

    def value_loss(self, value: StateValue, ctx: Context, batch: Batch) -> Float[Array, ""]:
        """L_V = mean_{e,b} (Q̄_e(s, a) − V(s))² · valid at the dataset actions."""
        target_q = jax.vmap(ctx.target_critic)(batch.observations, batch.chunked_actions)  # (b, e)
        v = jax.vmap(value)(batch.observations)
        return jnp.mean(jnp.square(target_q - v[:, None]) * batch.valid[:, None])

    def flow_loss(
        self, params: FAWACParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        """L_AWR = mean_b [ L_FM(s, a) · w · valid ] with the stop-gradient capped weight w."""
        actions = batch.chunked_actions
        q_mean = jnp.mean(jax.vmap(ctx.critic)(batch.observations, actions), axis=-1)
        v = jax.lax.stop_gradient(jax.vmap(params.value)(batch.observations))
        weights = jax.lax.stop_gradient(advantage_weight(q_mean, v, self.inv_temp, self.weight_cap))
        keys = jax.random.split(key, batch.batch_size)
        matching = jax.vmap(lambda o, a, k: flow_matching_loss(params.flow, o, a, key=k))(
            batch.observations, actions, keys
        )
        loss = jnp.mean(matching * weights * batch.valid)
        metrics = {
            "weight_mean": jnp.mean(weights),
            "weight_max": jnp.max(weights),
            "weight_capped_frac": jnp.mean((weights >= self.weight_cap).astype(jnp.float32)),
            "advantage_mean": jnp.mean(q_mean - v),
            "v_mean": jnp.mean(v),
        }
        return loss, metrics

    def loss(
        self, params: FAWACParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        value_loss = self.value_loss(params.value, ctx, batch)
        flow_loss, metrics = self.flow_loss(params, ctx, batch, key=key)
        loss = value_loss + flow_loss
        return loss, {"loss": loss, "value_loss": value_loss, "flow_loss": flow_loss, **metrics}

    def sample(
        self, params: FAWACParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """a = clip(ODE_{v_φ}(s, z), −1, 1), z ~ N(0, I_D) (acting and TD targets; no best-of-n)."""
        return euler_ode_sample(params.flow, obs, jax.random.normal(key, (ctx.action_dim,)), self.flow_steps)
