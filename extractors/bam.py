r"""BAM — basic adjoint matching by back-propagation through the memoryless SDE (METHODS.md §5.1).

The baseline QAM is compared against in Li & Levine (ICLR 2026): the same fine-tuned flow v_θ,
rollout and sampler as QAM, but the KL-regularised objective is differentiated directly through
the whole discretised SDE (the "basic" adjoint, computed by autodiff):

    L = mean_b [ Σ_{i=0}^{K−2} (2/σ_i²)·‖v_θ(s, x_i, t_i) − v̄_β(s, x_i, t_i)‖²
                 − λ·( mean_e Q_e(s, x_K) − ρ·std_e Q_e(s, x_K) ) ],

with x_i carrying gradients through every step — through v̄_β's input-Jacobian in the regulariser
and in the final ODE step — while no gradient reaches v̄_β's parameters. Parity quirks kept (METHODS §9.3): the regulariser has no factor h and skips the last
step, so it is K× the path KL and BAM's optimum is p_β·exp(h·λ·Q) — its λ is not on QAM's scale;
the Q term uses the *online*, *pessimistic* critic at the *unclipped* x_K.

??? cite "References"
    Domingo-Enrich, Drozdzal, Karrer, Chen, "Adjoint Matching", ICLR 2025.
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baseline "BAM".
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from extractors._fine_flow import AbstractFineFlowExtractor, rollout_noise
from flowrl.critic import pessimistic_value
from flowrl.extractor import Context, Metrics
from flowrl.flow import time_grid
from flowrl.networks import VelocityField
from flowrl.registry import register_extractor
from flowrl.sde import memoryless_rollout, sigma_schedule


@register_extractor("bam")
class BAM(AbstractFineFlowExtractor):
    """Basic adjoint matching (BPTT). Fields: paper defaults (METHODS §7); per-domain λ in experiments/."""

    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.3)  # λ
    rho: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)  # pessimism of the Q term
    flow_steps: int = eqx.field(static=True, default=10)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    use_target_base: bool = eqx.field(static=True, default=True)


    def example_loss(self, fine: VelocityField, ctx: Context, obs: Array, *, key: PRNGKeyArray):
        base = ctx.target_behavior_flow if self.use_target_base else ctx.behavior_flow
        x0, noises = rollout_noise(ctx.action_dim, self.flow_steps, key=key)
        states = memoryless_rollout(fine, base, obs, x0, noises)  # differentiable: BPTT

        sde_steps = self.flow_steps - 1
        times = time_grid(self.flow_steps)[:sde_steps]
        sigma = sigma_schedule(self.flow_steps)[:sde_steps]
        at_steps = jax.vmap(lambda field, x, t: field(obs, x, t), in_axes=(None, 0, 0))
        # No stop-gradient on v̄_β here: the states x_i carry the BPTT gradient through it (the
        # reference's `compute_sde`); its *parameters* are frozen by the trainer's context.
        gap = at_steps(fine, states[:sde_steps], times) - at_steps(base, states[:sde_steps], times)
        kl = jnp.sum((2.0 / jnp.square(sigma))[:, None] * jnp.square(gap))
        q_term = pessimistic_value(ctx.critic(obs, states[-1]), self.rho)
        return kl - self.inv_temp * q_term, {"kl": kl, "q": q_term}
