r"""FQL — flow Q-learning: a one-step policy distilled from the BC flow while maximising Q.

Park, Li, Levine, "Flow Q-Learning", ICML 2025; as run in the QAM paper (METHODS.md §5.9,
reference `agents/fql.py`). The one-step head (`extractors/one_step.py`) over the *online*
behaviour flow v_β (`extractors/_behavior.py`):

    L = α · mean_{b,d} (μ_ω(s, z) − sg clip(ODE_{v_β}(s, z)))² − mean_b mean_e Q_e(s, clip(μ_ω(s, z))),

z ~ N(0, I_D), online critic, no Q normalisation, no gradient clipping; acting and TD targets
use clip(μ_ω(s, z)). v_β itself is the trainer's shared BC flow (its L_BC is the reference's
`bc_flow_loss`); its EMA copy is kept by the trainer but FQL never reads it (the reference has
none). α per domain in experiments/fql/ (METHODS §8.2); α = 0 leaves the BC flow policy.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors._behavior import BehaviorFlowPolicy
from extractors.one_step import AbstractOneStepHead
from flowrl.extractor import AbstractExtractor
from flowrl.registry import register_extractor


@register_extractor("fql")
class FQL(AbstractOneStepHead):
    """One-step head over the behaviour flow. Defaults: METHODS §7 (α = 100, K = 10)."""

    inner: AbstractExtractor = eqx.field(default_factory=BehaviorFlowPolicy)  # v_β, K = 10
    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=100.0)  # α, distillation weight
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # μ_ω
