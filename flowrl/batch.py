"""The training batch every extractor and the trainer consume.

A `Batch` holds action-chunked transitions as produced by `flowrl.replay.sample_sequence`
(METHODS.md §2.3). Leaves carry a leading batch axis; per-example code sees one row.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class Batch(eqx.Module):
    """Action-chunked transitions, batch-major.

    Fields (shapes per example; a batch adds a leading axis B):

    - `observations` (obs_dim,): s_t, the state the chunk starts from.
    - `actions` (H, A): the H dataset actions a_t … a_{t+H-1}, time-major.
    - `rewards` (): R_{H-1} = Σ_{i<H} γ^i r_{t+i}, frozen after an episode boundary.
    - `masks` (): M_{H-1}, 0 if a success (terminal) state was visited inside the chunk.
    - `next_observations` (obs_dim,): N_{H-1}, s_{t+H} (the last valid next state).
    - `valid` (): 1 iff the whole chunk lies inside one stored episode.
    """

    observations: Float[Array, "*b obs"]
    actions: Float[Array, "*b h act"]
    rewards: Float[Array, "*b"]
    masks: Float[Array, "*b"]
    next_observations: Float[Array, "*b obs"]
    valid: Float[Array, "*b"]

    @property
    def chunked_actions(self) -> Float[Array, "*b d"]:
        """The flattened chunk a ∈ R^{H·A} (time-major) that flows and critics act on."""
        lead = self.actions.shape[:-2]
        return jnp.reshape(self.actions, (*lead, self.actions.shape[-2] * self.actions.shape[-1]))

    @property
    def batch_size(self) -> int:
        return self.observations.shape[0]
