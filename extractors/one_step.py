r"""The one-step head: distil an inner policy's noise-to-action map into μ_ω(s, z) while maximising Q.

FQL's policy extraction (Park, Li, Levine, "Flow Q-Learning", ICML 2025), and QAM-F's extra
(METHODS.md §4.4, §5.9). For a deterministic inner map z ↦ a_ODE(s, z) (the inner extractor's
`noise_to_action`: the K-step Euler ODE of its flow, clipped) the one-step network is trained on

    L_F = α · mean_{b,d} (μ_ω(s, z) − sg a_ODE(s, z))² − mean_b mean_e Q_e(s, clip(μ_ω(s, z), −1, 1)),

z ~ N(0, I_D) shared by both terms, with the *online* critic, ensemble mean, no pessimism, no
Q normalisation and no `valid` mask (reference `agents/fql.py`, `agents/qam.py` fql branch).
Acting and TD targets use a = clip(μ_ω(s, z), −1, 1), z ~ N(0, I_D) drawn from the key exactly as
the inner draws its noise, so the head and its inner map the same key through the same z.

Closed form (tests/test_heads.py): per z, L_F is α/D·‖μ − a_ODE‖² − Q(μ); for a linear critic
Q = wᵀa (and unclipped actions) its minimiser is μ(z) = a_ODE(z) + D·w/(2α) — the one-step policy
is the inner policy shifted by D·w/(2α). (The distillation term averages over the D action
dimensions while the Q term does not, hence the factor D.)

α = 0 turns the head off: the extractor is then exactly its inner (METHODS §4.5 quirk: QAM-F with
α_F = 0 is plain QAM), see `extractors/_head.py`.

The registered strategies are `extractors/fql.py` (inner: the behaviour flow) and
`extractors/qam_fql.py` (inner: QAM); `AbstractOneStepHead` holds their shared maths.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from extractors._head import AbstractHead, HeadParams, is_concrete
from flowrl.batch import Batch
from flowrl.errors import ConfigError
from flowrl.extractor import AbstractExtractor, Context, Metrics, batch_mean_loss
from flowrl.networks import MLP


class OneStepPolicy(eqx.Module):
    """μ_ω(s, z) ∈ R^D: an MLP on concat(obs, z), the reference's ActorVectorField without t
    (GELU, no LayerNorm, Xavier-uniform kernels; METHODS §3). Unclipped; callers clip."""

    mlp: MLP

    def __init__(self, obs_dim: int, action_dim: int, hidden: Sequence[int], *, key: PRNGKeyArray):
        self.mlp = MLP(obs_dim + action_dim, hidden, action_dim, key=key)

    def __call__(self, obs: Float[Array, " obs"], noise: Float[Array, " d"]) -> Float[Array, " d"]:
        return self.mlp(jnp.concatenate([obs, noise]))


def one_step_example_loss(
    one_step_action: Float[Array, " d"],
    flow_action: Float[Array, " d"],
    q_at_clipped_action: Float[Array, ""],
    alpha: Float[Array, ""],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(α·mean_d (μ − sg a_ODE)² − Q(s, clip μ), mean_d (μ − a_ODE)²) for one example (FQL loss).

    Pure in its inputs; `q_at_clipped_action` is mean_e Q_e(s, clip(μ)) computed by the caller
    so that its gradient reaches μ.
    """
    distill = jnp.mean(jnp.square(one_step_action - jax.lax.stop_gradient(flow_action)))
    return alpha * distill - q_at_clipped_action, distill


def check_noise_to_action(head_name: str, inner: AbstractExtractor) -> None:
    """The one-step head distils z ↦ a(s, z), so its inner must expose that deterministic map."""
    if not callable(getattr(inner, "noise_to_action", None)):
        raise ConfigError(
            f"{head_name}.inner = {type(inner).__name__} has no `noise_to_action(params, ctx, obs, z)`; "
            f"the one-step head needs the inner policy as a map from noise to action — use an inner "
            f"extractor that defines it (QAM, BAM, the behaviour flow)"
        )


class AbstractOneStepHead(AbstractHead):
    """One-step head over `inner`. Concrete subclasses set the fields and their defaults."""

    inner: eqx.AbstractVar[AbstractExtractor]
    alpha: eqx.AbstractVar[Float[Array, ""]]  # α, distillation weight; 0 = head off
    hidden_dims: eqx.AbstractVar[tuple[int, ...]]  # μ_ω MLP

    def __check_init__(self):
        check_noise_to_action(type(self).__name__, self.inner)
        if is_concrete(self.alpha) and not bool(self.alpha >= 0):
            raise ConfigError(
                f"{type(self).__name__}.alpha must be >= 0 (0 turns the one-step head off), got {float(self.alpha)}"
            )

    def enabled(self) -> Bool[Array, ""]:
        return self.alpha > 0

    def init_head(self, ctx: Context, *, key: PRNGKeyArray) -> OneStepPolicy:
        return OneStepPolicy(ctx.obs_dim, ctx.action_dim, self.hidden_dims, key=key)

    def example_head_loss(
        self, params: HeadParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        noise = jax.random.normal(key, (ctx.action_dim,))
        inner_params = jax.lax.stop_gradient(params.inner)  # the target uses the current inner, untrained here
        flow_action = jax.lax.stop_gradient(self.inner.noise_to_action(inner_params, ctx, obs, noise))
        action = params.head(obs, noise)
        q = jnp.mean(ctx.critic(obs, jnp.clip(action, -1.0, 1.0)))  # online critic, ensemble mean
        loss, distill = one_step_example_loss(action, flow_action, q, self.alpha)
        return loss, {"distill_loss": distill, "q_loss": -q}

    def head_loss(
        self, params: HeadParams, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        loss, metrics = batch_mean_loss(
            lambda obs, key: self.example_head_loss(params, ctx, obs, key=key), batch.observations, key=key
        )
        metrics["head_loss"] = metrics.pop("loss")
        return loss, metrics

    def head_sample(
        self, params: HeadParams, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        """clip(μ_ω(s, z), −1, 1), z ~ N(0, I_D) from `key` (the inner's noise for the same key)."""
        return jnp.clip(params.head(obs, jax.random.normal(key, (ctx.action_dim,))), -1.0, 1.0)
