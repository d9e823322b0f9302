r"""CGQL — classifier-guidance Q-learning, modes simple / mse / linex (registry `cgql`, `cgql-mse`, `cgql-linex`).

METHODS.md §5.4 (ColinQiyangLi/qam `agents/cgql.py`, paper tags CGQL, CGQL_MSE → "CGQL-M",
CGQL_LINEX → "CGQL-L"). The policy is the behaviour flow, steered at sampling time by the action
gradient of a **time-conditioned** critic Q_e(s, a, t) (t = 1: clean action), used as a classifier:

    x_0 = z ~ N(0, I),   x_{i+1} = x_i + h·ṽ(s, x_i, t_i),  t_i = i/K,  a = clip(x_K, −1, 1),
    ṽ(s, x, t) = v̄(s, x, t) + (η/t)·( λ·(1 − t)·∇_x mean_e Q_e(s, x, t′) + x )   for t > 0 (i ≥ 1),
    ṽ(s, x, 0) = v̄(s, x, 0),

with v̄ the EMA behaviour flow (`target_guidance`, else the online one), the *online* critic, and
t′ = 1 for `cgql` ("simple": only the clean critic exists) or t′ = t for `cgql-mse` / `cgql-linex`.
With λ = 0 the guidance is off entirely (the plain Euler ODE of v̄). Acting and TD targets use
this sampler; the TD backup is the trainer's (METHODS §3) with the critic at t = 1.

The critic is the trainer's shared critic, built here by `make_critic` as a
`TimeConditionedCriticEnsemble` whose `__call__(s, a)` is Q_e(s, a, 1), so the shared TD loss and
EMA apply unchanged. `cgql-mse` / `cgql-linex` add, through `auxiliary_critic_loss`, a noisy-critic
loss with weight c (`noisy_coef`): τ ~ U[0, 1), ã = (1 − τ)ε + τa, T_e = Q̄_e(s, a, 1) (per member),

    mse:   mean_{e,b} (Q_e(s, ã, τ) − T_e)² · valid
    linex: δ = λ(T_e − Q_e(s, ã, τ)),  ℓ = δ if δ > isd_clip else exp(δ) + λ·Q_e(s, ã, τ),
           mean(ℓ · valid),

whose minimiser is Q(s, ã, τ) = (1/λ)·log E[exp(λ T) | s, ã] (mse: its first-order approximation
E[T | s, ã]). The policy's own "actor" is the trainer's BC flow; `init` returns None and `loss` is 0.

Parity quirk kept (METHODS §9.6): the guidance adds the extra η·x/t term (a dilation). Without it
(`guidance_dilation=False`) and with η = 1 the velocity is exact classifier guidance for the
rectified-flow path x_t = (1 − t)z + ta: v̄ + ((1 − t)/t)·λ∇_x Q_t, when Q_t is the soft value
(1/λ) log E[exp(λQ) | x_t] (tests/test_guidance_diffusion.py checks this in closed form). Not
implemented: best-of-n (default 1, inactive in the paper) and `separate=True` (broken in the
reference).

??? cite "References"
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (classifier guidance), NeurIPS 2021.
    Myers et al., "Offline Goal-Conditioned RL with Temporal Metric Distillation" (linex / Itakura–Saito), 2025.
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baselines CGQL, CGQL-M, CGQL-L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from flowrl.batch import Batch
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.flow import euler_ode_sample
from flowrl.networks import CriticEnsemble
from flowrl.registry import register_extractor


class TimeConditionedCriticEnsemble(eqx.Module):
    """E critics Q_e(s, a, t) on concat(obs, a, t) (t a raw scalar), stacked and `vmap`ped like `CriticEnsemble`.

    The reference's time-conditioned critic is an ensemble `ActorVectorField` with output 1 and
    `value_layer_norm`: Dense → GELU → LayerNorm hidden layers, linear scalar head (METHODS §5.4).
    `__call__(obs, action)` is Q_e(s, a, t = 1), the clean-action critic the trainer's TD loss uses.
    """

    ensemble: CriticEnsemble  # members over concat(obs, [action, t]): the input order concat(obs, a, t)

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
        self.ensemble = CriticEnsemble(obs_dim, action_dim + 1, hidden, num_members, key=key, layer_norm=layer_norm)

    @property
    def num_members(self) -> int:
        return self.ensemble.num_members

    def at_time(
        self, obs: Float[Array, " obs"], action: Float[Array, " d"], t: Float[Array, ""] | float
    ) -> Float[Array, " e"]:
        """Q_e(s, a, t) for every member, shape (E,)."""
        return self.ensemble(obs, jnp.concatenate([action, jnp.reshape(jnp.asarray(t, action.dtype), (1,))]))

    def __call__(self, obs: Float[Array, " obs"], action: Float[Array, " d"]) -> Float[Array, " e"]:
        return self.at_time(obs, action, 1.0)


def critic_at_time(critic, obs: Array, action: Array, t: Float[Array, ""] | float) -> Float[Array, " e"]:
    """Q_e(s, a, t) from a time-conditioned critic; a critic without a time input is read as time-independent.

    The trainer always gives CGQL its `TimeConditionedCriticEnsemble` (`make_critic`); the
    fallback lets the guided sampler run on a plain `(obs, action) -> (E,)` critic (e.g. an
    analytic one), for which Q(s, a, t) = Q(s, a) is the only reading.
    """
    if hasattr(critic, "at_time"):
        return critic.at_time(obs, action, t)
    return critic(obs, action)


def guided_velocity(
    base,
    critic,
    obs: Float[Array, " obs"],
    x: Float[Array, " d"],
    t: Float[Array, ""],
    *,
    inv_temp: Float[Array, ""],
    guidance_coef: Float[Array, ""],
    critic_time_is_one: bool,
    dilation: bool = True,
) -> Float[Array, " d"]:
    """ṽ(s, x, t) = v̄(s, x, t) + (η/t)·(λ(1 − t)·∇_x mean_e Q_e(s, x, t′) [+ x]) if t > 0 and λ > 0; else v̄.

    t′ = 1 when `critic_time_is_one` (simple mode), else t′ = t. `dilation` keeps the reference's
    extra +η·x/t term (METHODS §9.6). At t = 0 (the first Euler step) the guidance is skipped.
    """
    velocity = base(obs, x, t)
    critic_time = jnp.ones_like(t) if critic_time_is_one else t
    score = jax.grad(lambda y: jnp.mean(critic_at_time(critic, obs, y, critic_time)))(x)
    guidance = inv_temp * (1.0 - t) * score
    if dilation:
        guidance = guidance + x
    active = (t > 0.0) & (inv_temp > 0.0)
    safe_t = jnp.where(t > 0.0, t, 1.0)  # the t = 0 branch is discarded; avoid 0/0 there
    return velocity + jnp.where(active, guidance_coef / safe_t, 0.0) * guidance


def linex_loss(
    q_noisy: Float[Array, "..."], target: Float[Array, "..."], inv_temp: Float[Array, ""], isd_clip: Float[Array, ""]
) -> Float[Array, "..."]:
    """Elementwise linex (Itakura–Saito) loss: δ = λ(T − Q); ℓ = δ if δ > isd_clip else exp(δ) + λQ.

    For δ ≤ isd_clip its expectation over T is minimised at Q = (1/λ)·log E[exp(λT)]; above the
    clip it is linear (gradient −λ in Q), for numerical safety. exp is evaluated at min(δ, clip).
    """
    delta = inv_temp * (target - q_noisy)
    above = delta > isd_clip
    return jnp.where(above, delta, jnp.exp(jnp.where(above, isd_clip, delta)) + inv_temp * q_noisy)


def noisy_critic_example_loss(
    critic,
    target_critic,
    obs: Float[Array, " obs"],
    action: Float[Array, " d"],
    *,
    mode: str,
    inv_temp: Float[Array, ""],
    isd_clip: Float[Array, ""],
    key: PRNGKeyArray,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """mean_e ℓ(Q_e(s, ã, τ), Q̄_e(s, a, 1)) for one example (unweighted by valid), and mean_e Q_e(s, ã, τ).

    τ ~ U[0, 1), ε ~ N(0, I), ã = (1 − τ)ε + τa (the flow interpolant; t = 1 is clean).
    """
    time_key, noise_key = jax.random.split(key)
    tau = jax.random.uniform(time_key, ())
    noise = jax.random.normal(noise_key, action.shape)
    noisy_action = (1.0 - tau) * noise + tau * action
    target = jax.lax.stop_gradient(critic_at_time(target_critic, obs, action, 1.0))
    q_noisy = critic_at_time(critic, obs, noisy_action, tau)
    if mode == "mse":
        per_member = jnp.square(q_noisy - target)
    elif mode == "linex":
        per_member = linex_loss(q_noisy, target, inv_temp, isd_clip)
    else:
        raise ValueError(f"noisy-critic mode must be 'mse' or 'linex', got {mode!r}")
    return jnp.mean(per_member), jnp.mean(q_noisy)


class AbstractCGQL(AbstractExtractor):
    """What the three CGQL variants share: the time-conditioned critic and the guided sampler.

    Concrete classes fix `mode` and declare their fields (each variant has only the
    hyperparameters it uses).
    """

    mode: eqx.AbstractClassVar[str]
    inv_temp: eqx.AbstractVar[Float[Array, ""]]
    guidance_coef: eqx.AbstractVar[Float[Array, ""]]
    flow_steps: eqx.AbstractVar[int]
    target_guidance: eqx.AbstractVar[bool]
    guidance_dilation: eqx.AbstractVar[bool]

    def make_critic(
        self,
        obs_dim: int,
        action_dim: int,
        hidden_dims: tuple[int, ...],
        num_members: int,
        layer_norm: bool,
        *,
        key: PRNGKeyArray,
    ) -> TimeConditionedCriticEnsemble:
        return TimeConditionedCriticEnsemble(
            obs_dim, action_dim, hidden_dims, num_members, key=key, layer_norm=layer_norm
        )

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> None:
        return None  # the policy is the trainer's behaviour flow + critic guidance

    def loss(self, params: None, ctx: Context, batch: Batch, *, key: PRNGKeyArray) -> tuple[Float[Array, ""], Metrics]:
        """No trainable parts of its own: the actor is the shared BC flow (METHODS §5.4 "Actor")."""
        zero = jnp.zeros(())
        return zero, {"loss": zero}

    def guided_field(self, ctx: Context):
        """The guided velocity ṽ(s, x, t) as a callable, for `euler_ode_sample`."""
        base = ctx.target_behavior_flow if self.target_guidance else ctx.behavior_flow

        def velocity(obs, x, t):
            return guided_velocity(
                base, ctx.critic, obs, x, t, inv_temp=self.inv_temp, guidance_coef=self.guidance_coef,
                critic_time_is_one=self.mode == "simple", dilation=self.guidance_dilation,
            )

        return velocity

    def noise_to_action(
        self, params: None, ctx: Context, obs: Float[Array, " obs"], noise: Float[Array, " d"]
    ) -> Float[Array, " d"]:
        """clip(x_K) of the guided Euler sampler started at x_0 = `noise`."""
        return euler_ode_sample(self.guided_field(ctx), obs, noise, self.flow_steps)

    def sample(self, params: None, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray) -> Float[Array, " d"]:
        return self.noise_to_action(params, ctx, obs, jax.random.normal(key, (ctx.action_dim,)))

    def _noisy_critic_loss(
        self, critic, ctx: Context, batch: Batch, *, coef: Float[Array, ""], isd_clip: Float[Array, ""],
        key: PRNGKeyArray,
    ) -> tuple[Float[Array, ""], Metrics]:
        """c · mean_b [mean_e ℓ · valid_b]: the mse / linex noisy-critic loss on the shared critic."""
        keys = jax.random.split(key, batch.batch_size)
        per_example, q_noisy = jax.vmap(
            lambda o, a, k: noisy_critic_example_loss(
                critic, ctx.target_critic, o, a, mode=self.mode, inv_temp=self.inv_temp, isd_clip=isd_clip, key=k
            )
        )(batch.observations, batch.chunked_actions, keys)
        noisy_loss = jnp.mean(per_example * batch.valid)
        return coef * noisy_loss, {"noisy_loss": noisy_loss, "noisy_q_mean": jnp.mean(q_noisy)}


@register_extractor("cgql")
class CGQL(AbstractCGQL):
    """CGQL "simple": guidance by the clean critic Q(s, x, 1) at every flow time (defaults: METHODS §7)."""

    mode: ClassVar[str] = "simple"
    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # λ
    guidance_coef: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.1)  # η
    flow_steps: int = eqx.field(static=True, default=10)  # K
    target_guidance: bool = eqx.field(static=True, default=True)  # base field = EMA behaviour flow
    guidance_dilation: bool = eqx.field(static=True, default=True)  # parity: extra +η·x/t (§9.6)


@register_extractor("cgql-mse")
class CGQLMSE(AbstractCGQL):
    """CGQL-M: a noisy critic Q(s, x_t, t), fitted by MSE to Q̄(s, a, 1), guides at time t (defaults: §7)."""

    mode: ClassVar[str] = "mse"
    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # λ
    guidance_coef: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.1)  # η
    noisy_coef: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.001)  # c
    flow_steps: int = eqx.field(static=True, default=10)
    target_guidance: bool = eqx.field(static=True, default=True)
    guidance_dilation: bool = eqx.field(static=True, default=True)

    def auxiliary_critic_loss(
        self, params: PyTree, critic, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        return self._noisy_critic_loss(critic, ctx, batch, coef=self.noisy_coef, isd_clip=jnp.zeros(()), key=key)


@register_extractor("cgql-linex")
class CGQLLinex(AbstractCGQL):
    """CGQL-L: a noisy critic fitted by the linex loss, Q(s, x_t, t) → (1/λ) log E[exp(λQ̄)] (defaults: §7)."""

    mode: ClassVar[str] = "linex"
    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # λ
    guidance_coef: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.1)  # η
    noisy_coef: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.001)  # c
    isd_clip: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=5.0)  # linear above δ > clip
    flow_steps: int = eqx.field(static=True, default=10)
    target_guidance: bool = eqx.field(static=True, default=True)
    guidance_dilation: bool = eqx.field(static=True, default=True)

    def auxiliary_critic_loss(
        self, params: PyTree, critic, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        return self._noisy_critic_loss(critic, ctx, batch, coef=self.noisy_coef, isd_clip=self.isd_clip, key=key)
