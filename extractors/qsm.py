r"""QSM — Q-score matching with a DDPM policy (Psenka et al., ICML 2024), as in the QAM paper's baselines.

METHODS.md §5.5 (ColinQiyangLi/qam `agents/dcgql.py`, `actor_loss_type="qsm"`). A noise-prediction
network ε_θ is trained so that its implied score matches λ times the critic's action gradient,
plus a DDPM behaviour-cloning term (t ~ U{1…T}, x_t = sqrt(ᾱ_t)·a + sqrt(1 − ᾱ_t)·ε):

    L = α · mean_d (ε − ε_θ(s, x_t, t))²  +  mean_d (−λ·∇_x mean_e Q̄_e(s, x_t) − ε_θ(s, x_t, t))²,

with the *target* critic's gradient at the *noisy* action x_t (`use_target_critic_grad`). Acting and
TD targets use the DDPM sampler of `extractors/_ddpm.py`; QSM's paper setting jumps to the x̂_0
estimate at every step and clips the state to [−1, 1] after every step (`clip_sampler_after`).

Parity quirks kept (METHODS §9.5): the sampler jumps to x̂_0 instead of the posterior mean (switch:
`clip_sampler_before=True` gives the posterior mean from a clipped x̂_0, DAC's sampler); invalid
chunks are masked with a power (`valid_as_power`, gradient-equivalent to the product). The
trainer's behaviour flow trains alongside, unused by this policy. Agent setting of the paper:
global-norm gradient clipping 1.0 (`flowrl.AgentConfig.grad_clip_norm`, set in the gin files).

??? cite "References"
    Psenka, Escontrela, Abbeel, Ma, "Learning a Diffusion Model Policy from Rewards via Q-Score
    Matching", ICML 2024. Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, baseline "QSM".
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors._ddpm import AbstractDDPMExtractor
from flowrl.registry import register_extractor


@register_extractor("qsm")
class QSM(AbstractDDPMExtractor):
    """Q-score matching. Defaults: METHODS §7, with QSM's paper sampler flags (§8.2); λ, α per domain in gin."""

    inv_temp: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=1.0)  # λ
    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.0)  # BC weight α
    diffusion_steps: int = eqx.field(static=True, default=10)  # T
    time_dim: int = eqx.field(static=True, default=64)  # Fourier features of the step
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    use_target_critic_grad: bool = eqx.field(static=True, default=True)
    clip_sampler_before: bool = eqx.field(static=True, default=False)  # posterior mean from clip(x̂_0)
    clip_sampler_after: bool = eqx.field(static=True, default=True)  # clip x after every step
    valid_as_power: bool = eqx.field(static=True, default=True)  # parity: ℓ^valid (§9.5)

    loss_type: ClassVar[str] = "qsm"

    def q_inv_temp(self) -> Float[Array, ""]:
        return self.inv_temp
