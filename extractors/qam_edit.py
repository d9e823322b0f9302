r"""QAM-E — QAM with an EXPO-style edit policy on top of the QAM flow (METHODS.md §4.4).

Li & Levine, "Q-learning with Adjoint Matching", ICLR 2026, variant QAM_EDIT (reference
`agents/qam.py` with `edit_scale` > 0). A composition, not a flag: the edit head
(`extractors/edit.py`) over a QAM inner (`extractors/qam.py`). QAM trains v_θ by lean adjoint
matching as usual; on top, with a = clip(ODE_{v_θ}(s, z)) (no gradient), e ~ π_e(·|s, a),
â = clip(a + β·e),

    L_E = −mean_b mean_e Q_e(s, â) + mean_b(sg α_e·log π_e) + α_e·(sg(−mean_b log π_e) − H_tgt),

H_tgt = −0.5·D, α_e init 1, online critic. Total L_AM + L_E (+ L_Q, L_BC), globally clipped at
norm 1 (gin). Acting and TD targets: a fresh ODE sample of v_θ, then one stochastic edit.

β = 0 is plain QAM — the paper's scene and cube-double "QAM-E" runs (METHODS §4.5 quirk),
reproduced by binding `qam_edit.edit_scale = 0.0`. The inner's λ is bound through gin:
`qam_edit.inner = @qam()` and `qam.inv_temp = ...` (the default inner is QAM() with λ = 0.3).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors.edit import AbstractEditHead
from extractors.qam import QAM
from flowrl.extractor import AbstractExtractor
from flowrl.registry import register_extractor


@register_extractor("qam-edit")
class QAMEdit(AbstractEditHead):
    """Edit head over QAM. β default 0.1: the paper's most common value (METHODS §8.2); the
    reference's `edit_scale` default 0 would make the name plain QAM."""

    inner: AbstractExtractor = eqx.field(default_factory=QAM)
    edit_scale: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.1)  # β
    target_entropy_multiplier: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # π_e trunk
