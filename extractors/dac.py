r"""DAC — Diffusion Actor-Critic (Fang et al., ICLR 2025), as in the QAM paper's baselines.

METHODS.md §5.5 (ColinQiyangLi/qam `agents/dcgql.py`, `actor_loss_type="dac"`). A noise-prediction
network ε_θ is trained with a DDPM behaviour-cloning term plus a term that steers the predicted
noise against the critic's action gradient (t ~ U{1…T}, x_t = sqrt(ᾱ_t)·a + sqrt(1 − ᾱ_t)·ε):

    L = α · mean_d (ε − ε_θ(s, x_t, t))² + mean_d sqrt(1 − ᾱ_t) · ∇_x mean_e Q̄_e(s, x_t) ⊙ ε_θ(s, x_t, t),

with the *target* critic's gradient at the *noisy* action x_t (`use_target_critic_grad`). There is
no inverse temperature: the reference's DAC ignores `inv_temp` (METHODS §9.5), so this class has
none; α alone trades BC against Q. Acting and TD targets use the DDPM sampler of
`extractors/_ddpm.py` in DAC's paper setting: x̂_0 is clipped to [−1, 1] and the step takes the
DDPM posterior mean (`clip_sampler_before`).

Parity quirk kept (METHODS §9.5): invalid chunks are masked with a power (`valid_as_power`,
gradient-equivalent to the product). The trainer's behaviour flow trains alongside, unused by
this policy. Agent setting of the paper: global-norm gradient clipping 1.0 (gin files).

??? cite "References"
    Fang, Jiang, Wen, Wang, Yu, "Diffusion Actor-Critic: Formulating Constrained Policy Iteration
    as Diffusion Noise Regression for Offline Reinforcement Learning", ICLR 2025.
    Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baseline "DAC".
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors._ddpm import AbstractDDPMExtractor
from flowrl.registry import register_extractor


@register_extractor("dac")
class DAC(AbstractDDPMExtractor):
    """Diffusion actor-critic. Defaults: METHODS §7, with DAC's paper sampler flags (§8.2); α per domain in gin."""

    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.0)  # BC weight α
    diffusion_steps: int = eqx.field(static=True, default=10)  # T
    time_dim: int = eqx.field(static=True, default=64)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    use_target_critic_grad: bool = eqx.field(static=True, default=True)
    clip_sampler_before: bool = eqx.field(static=True, default=True)  # posterior mean from clip(x̂_0)
    clip_sampler_after: bool = eqx.field(static=True, default=False)
    valid_as_power: bool = eqx.field(static=True, default=True)  # parity: ℓ^valid (§9.5)

    loss_type: ClassVar[str] = "dac"

    def q_inv_temp(self) -> Float[Array, ""]:
        return jnp.zeros(())  # the reference's DAC ignores inv_temp (§9.5)
