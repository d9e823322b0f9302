r"""QAM-F — QAM with an FQL-style one-step policy distilled from the QAM flow (METHODS.md §4.4).

Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, variant QAM_FQL (reference
`agents/qam.py` with `fql_alpha` > 0). A composition, not a flag: the one-step head
(`extractors/one_step.py`) over a QAM inner (`extractors/qam.py`). QAM trains its fine flow v_θ
by lean adjoint matching as usual; on top,

    L_F = α_F · mean_{b,d} (μ_ω(s, z) − sg clip(ODE_{v_θ}(s, z)))² − mean_b mean_e Q_e(s, clip(μ_ω(s, z))),

with the *same* z in both terms, the online critic, no Q normalisation, no pessimism; the total
loss is L_AM + L_F (+ the trainer's L_Q, L_BC), globally clipped at norm 1 (gin). Acting and TD
targets use clip(μ_ω(s, z)) (METHODS §4.2, §6).

α_F = 0 is plain QAM — the paper's cube-double and puzzle-3x3 "QAM-F" runs (METHODS §4.5 quirk),
reproduced by binding `qam_fql.alpha = 0.0`. The inner's λ is bound through gin:
`qam_fql.inner = @qam()` and `qam.inv_temp = ...` (the default inner is QAM() with λ = 0.3).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors.one_step import AbstractOneStepHead
from extractors.qam import QAM
from flowrl.extractor import AbstractExtractor
from flowrl.registry import register_extractor


@register_extractor("qam-fql")
class QAMFQL(AbstractOneStepHead):
    """One-step head over QAM. α_F default 30: the paper's most common value (METHODS §8.2); the
    reference's `fql_alpha` default 0 would make the name plain QAM."""

    inner: AbstractExtractor = eqx.field(default_factory=QAM)
    alpha: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=30.0)  # α_F
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # μ_ω
