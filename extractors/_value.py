"""A state-value network V(s), shared by FAWAC and IFQL (METHODS.md §3 "Critic `Value`", §5.3, §5.7).

The reference builds V(s) as its critic class with one member: an MLP on the observation, hidden
(512, 512, 512, 512), Dense → GELU → LayerNorm per hidden layer (`value_layer_norm=True`), a
scalar linear head, and no ensemble axis. FAWAC fits it by plain MSE to the target critic, IFQL by
an expectile loss; both keep it in the extractor's own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
from jaxtyping import Array, Float, PRNGKeyArray

from flowrl.networks import MLP


class StateValue(eqx.Module):
    """V(s): one LayerNorm MLP with a scalar head. `__call__(obs) -> ()`; vmap over a batch."""

    mlp: MLP

    def __init__(self, obs_dim: int, hidden: Sequence[int], *, key: PRNGKeyArray, layer_norm: bool = True):
        self.mlp = MLP(obs_dim, hidden, 1, key=key, layer_norm=layer_norm)

    def __call__(self, obs: Float[Array, " obs"]) -> Float[Array, ""]:
        return self.mlp(obs)[0]
