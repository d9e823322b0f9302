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

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from extractors._ddpm import NoiseNetwork, ddpm_batch_loss, ddpm_sample, ddpm_schedule
from flowrl.batch import Batch
from flowrl.extractor import AbstractExtractor, Context, Metrics
from flowrl.registry import register_extractor


@register_extractor("dac")
class DAC(AbstractExtractor):
    """Diffusion actor-critic. Defaults: METHODS §7, with DAC's paper sampler flags (§8.2); α per domain in gin."""

    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.0)  # BC weight α
    diffusion_steps: int = eqx.field(static=True, default=10)  # T
    time_dim: int = eqx.field(static=True, default=64)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))
    use_target_critic_grad: bool = eqx.field(static=True, default=True)
    clip_sampler_before: bool = eqx.field(static=True, default=True)  # posterior mean from clip(x̂_0)
    clip_sampler_after: bool = eqx.field(static=True, default=False)
    valid_as_power: bool = eqx.field(static=True, default=True)  # parity: ℓ^valid (§9.5)

    def __check_init__(self):
        if self.diffusion_steps < 1:
            raise ValueError(f"dac.diffusion_steps must be >= 1, got {self.diffusion_steps}")

    def init(self, ctx: Context, *, key: PRNGKeyArray) -> NoiseNetwork:
        return NoiseNetwork(ctx.obs_dim, ctx.action_dim, self.hidden_dims, self.time_dim, key=key)

    def loss(
        self, params: NoiseNetwork, ctx: Context, batch: Batch, *, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Metrics]:
        critic = ctx.target_critic if self.use_target_critic_grad else ctx.critic
        return ddpm_batch_loss(
            params, critic, ddpm_schedule(self.diffusion_steps), batch, loss_type="dac",
            inv_temp=jnp.zeros(()), bc_weight=self.alpha, valid_as_power=self.valid_as_power, key=key,
        )

    def sample(
        self, params: NoiseNetwork, ctx: Context, obs: Float[Array, " obs"], *, key: PRNGKeyArray
    ) -> Float[Array, " d"]:
        return ddpm_sample(
            params, ddpm_schedule(self.diffusion_steps), obs,
            clip_before=self.clip_sampler_before, clip_after=self.clip_sampler_after, key=key,
        )
