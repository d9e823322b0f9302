r"""QAM — Q-learning with Adjoint Matching (Li & Levine, ICLR 2026), lean-adjoint policy extraction.

The fine-tuned flow v_θ is trained so that its samples follow

    π*(a | s) ∝ π_β(a | s) · exp(λ · Q̄(s, a)),

by regressing it, step by step along a memoryless-SDE rollout, onto targets built from the *lean
adjoint* ã of the behaviour flow (METHODS.md §4.3–4.4):

    L_AM = mean_b Σ_{i=0}^{K−1} ‖ (2/σ_i)·(v_θ(s, x_i, t_i) − sg v̄_β(s, x_i, t_i)) + σ_i·ã_i ‖²,

with x_i from `flowrl.sde.memoryless_rollout` (fine field, then a last ODE step with the base),
ã_K = −λ ∇_x mean_e Q̄_e(s, clip(x_K)) and ã_i from `flowrl.sde.lean_adjoint`. The adjoint uses the
behaviour flow only and everything but v_θ(s, x_i, t_i) is under stop-gradient, so no gradient
passes through the denoising chain. Equivalently: regression of v_θ onto v̄_β − (σ_i²/2)·ã_i with
weight 4/σ_i². Acting and TD targets use the Euler ODE of v_θ, clipped to [−1, 1].

Parity with ColinQiyangLi/qam `agents/qam.py` (non-residual default): loss summed over the K steps
and the action dimensions, averaged over the batch, no `valid` mask; base field = the EMA target
of the behaviour flow; boundary gradient from the target critic's ensemble mean (no pessimism) at
the clipped action. Deliberate differences, each switchable or harmless: (1) `scheme="consistent"`
offers the exact discrete adjoint (see `flowrl.sde`); (2) the x_0 noise and the per-step noises
come from independent keys; (3) with λ = 0 we still sample v_θ (which then learns v̄_β), where the
reference switches to the online behaviour flow.

??? cite "References"
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026 (arXiv 2601.14234).
    Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching", ICLR 2025.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from extractors._fine_flow import AbstractFineFlowExtractor, rollout_noise
from flowrl.extractor import Context, Metrics
from flowrl.flow import time_grid
from flowrl.networks import VelocityField
from flowrl.registry import register_extractor
from flowrl.sde import check_scheme, lean_adjoint, memoryless_rollout, sigma_schedule


def lean_adjoint_matching_loss(
    fine_velocity: Float[Array, "k d"],
    base_velocity: Float[Array, "k d"],
    adjoint: Float[Array, "k d"],
    sigma: Float[Array, " k"],
) -> Float[Array, ""]:
    """Σ_i ‖ (2/σ_i)(v_θ,i − v̄_β,i) + σ_i ã_i ‖² for one example (QAM's adjoint-matching loss).

    Pure in its inputs, so tests can feed analytic velocities and adjoints.
    """
    residual = (2.0 / sigma)[:, None] * (fine_velocity - base_velocity) + sigma[:, None] * adjoint
    return jnp.sum(jnp.square(residual))


@register_extractor("qam")
class QAM(AbstractFineFlowExtractor):
    """Lean adjoint matching. Fields (paper defaults, METHODS §7; per-domain λ in experiments/)."""

    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.3)  # λ
    flow_steps: int = eqx.field(static=True, default=10)  # K
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    use_target_base: bool = eqx.field(static=True, default=True)  # base = EMA of v_β (`target_actor`)
    use_target_critic_grad: bool = eqx.field(static=True, default=True)  # `use_target_grad`
    clip_boundary_action: bool = eqx.field(static=True, default=True)  # Q̄ at clip(x_K) (`clip_adj`)
    scheme: str = eqx.field(static=True, default="reference")  # adjoint discretisation

    def __check_init__(self):
        check_scheme(self.scheme)
        if self.flow_steps < 1:
            raise ValueError(f"qam.flow_steps must be >= 1, got {self.flow_steps}")


    def _base(self, ctx: Context):
        return ctx.target_behavior_flow if self.use_target_base else ctx.behavior_flow

    def boundary_adjoint(self, ctx: Context, obs: Array, x_final: Array) -> Array:
        """ã_K = −λ ∇_x mean_e Q̄_e(s, clip(x, −1, 1)) at x = x_K."""
        critic = ctx.target_critic if self.use_target_critic_grad else ctx.critic

        def value(x):
            x = jnp.clip(x, -1.0, 1.0) if self.clip_boundary_action else x
            return jnp.mean(critic(obs, x))

        return -self.inv_temp * jax.grad(value)(x_final)

    def example_loss(
        self, fine: VelocityField, ctx: Context, obs: Array, *, key: PRNGKeyArray
    ) -> tuple[Array, Metrics]:
        base = self._base(ctx)
        x0, noises = rollout_noise(ctx.action_dim, self.flow_steps, key=key)
        states = jax.lax.stop_gradient(memoryless_rollout(fine, base, obs, x0, noises))
        terminal = self.boundary_adjoint(ctx, obs, states[-1])
        adjoint = jax.lax.stop_gradient(lean_adjoint(base, obs, states, terminal, self.scheme))

        times = time_grid(self.flow_steps)[:-1]
        at_steps = jax.vmap(lambda field, x, t: field(obs, x, t), in_axes=(None, 0, 0))
        fine_velocity = at_steps(fine, states[:-1], times)
        base_velocity = jax.lax.stop_gradient(at_steps(base, states[:-1], times))
        loss = lean_adjoint_matching_loss(
            fine_velocity, base_velocity, adjoint[:-1], sigma_schedule(self.flow_steps)
        )
        metrics = {
            "adjoint_norm_terminal": jnp.linalg.norm(terminal),
            "adjoint_norm_initial": jnp.linalg.norm(adjoint[0]),
            "fine_base_gap": jnp.mean(jnp.square(fine_velocity - base_velocity)),
        }
        return loss, metrics
