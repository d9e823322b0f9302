r"""FEdit — the BC flow plus an EXPO-style edit policy (METHODS.md §5.8, reference `agents/fedit.py`).

The edit head (`extractors/edit.py`) over the *online* behaviour flow v_β
(`extractors/_behavior.py`): a = clip(ODE_{v_β}(s, z)), e ~ π_e(·|s, a), â = clip(a + β·e), with

    L_E = −mean_b mean_e Q_e(s, â) + mean_b(sg α·log π_e(e|s, a)) + α·(sg(−mean_b log π_e) − H_tgt),

H_tgt = −0.5·D, the online critic, no gradient clipping. Acting and TD targets use the same
stochastic edit. v_β is the trainer's shared BC flow (its L_BC is the reference's `bc_flow_loss`);
its EMA copy is kept by the trainer but unused here (the reference has none).

β per domain in experiments/fedit/ (METHODS §8.2). The reference's default β = 0 ("must be set")
would be plain BC; the registered default is 0.2, the paper's most common value.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from extractors._behavior import BehaviorFlowPolicy
from extractors.edit import AbstractEditHead
from flowrl.extractor import AbstractExtractor
from flowrl.registry import register_extractor


@register_extractor("fedit")
class FEdit(AbstractEditHead):
    """Edit head over the behaviour flow. Defaults: METHODS §7 (K = 10, entropy multiplier 0.5)."""

    inner: AbstractExtractor = eqx.field(default_factory=BehaviorFlowPolicy)  # v_β, K = 10
    edit_scale: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.2)  # β
    target_entropy_multiplier: Float[Array, ""] = eqx.field(converter=jnp.asarray, default=0.5)
    hidden_dims: tuple[int, ...] = eqx.field(static=True, default=(512, 512, 512, 512))  # π_e trunk
