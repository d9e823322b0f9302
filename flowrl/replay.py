"""On-device transition storage and QAM's chunked `sample_sequence` (METHODS.md §2.3), all in JAX.

`SequenceDataset` keeps the transition arrays on the accelerator and is a pytree, so sampling runs inside
a jitted training step with no host→device copy. Only the first `size` rows are sampled; `size` is a
JAX scalar leaf (not static), so a replay buffer that grows by writing rows past `size` keeps the same
compiled step.

`sample_sequence(dataset, key, B, H, γ)` draws start indices s ~ Uniform{0, …, size − H} and, per
start (then `vmap` over the batch), returns the last column of METHODS.md §2.3's recurrences:

    T̂_i     = max(T[s], …, T[s+i])                    cumulative terminal
    valid_i = 1 for i = 0, else 1 − T̂_{i−1}           no episode boundary among rows s … s+i−1
    R_{H−1} = Σ_{i<H} γ^i · r[s+i] · valid_i            discounted return, frozen after a boundary
    M_{H−1} = min{ m[s+i] : valid_i = 1 }               0 if a success state was visited
    N_{H−1} = O′[s + i*],  i* = last i with valid_i = 1  last valid next state
    valid_{H−1}

together with observations O[s] and actions A[s … s+H−1] (H, A), as a `flowrl.batch.Batch`.
"""

from __future__ import annotations

from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from flowrl import errors
from flowrl.batch import Batch

__all__ = ["SequenceDataset", "SequenceDatasetError", "sample_sequence", "sequence_at"]

_KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class SequenceDatasetError(errors.DatasetError, ValueError):
    """Malformed arrays or a chunk length that does not fit (one line: key, shape, fix)."""


class SequenceDataset(eqx.Module):
    """Transitions stored row-wise on device; rows `[0, size)` are filled.

    Fields: observations (N, obs), actions (N, A), rewards (N,), masks (N,), terminals (N,)
    (1 on the last transition of each stored episode), next_observations (N, obs), all float32, and
    `size`, an int32 scalar array ≤ N (the capacity).
    """

    observations: Float[Array, "n obs"]
    actions: Float[Array, "n act"]
    rewards: Float[Array, " n"]
    masks: Float[Array, " n"]
    terminals: Float[Array, " n"]
    next_observations: Float[Array, "n obs"]
    size: Int[Array, ""]

    @classmethod
    def from_numpy(cls, data: Mapping[str, np.ndarray], *, size: int | None = None) -> SequenceDataset:
        """Copy a transition dict (e.g. `flowrl.ogbench.load_dataset`'s) to device as float32.

        `size` (default: all rows) marks how many leading rows are filled.
        """
        missing = [key for key in _KEYS if key not in data]
        if missing:
            raise SequenceDatasetError(f"transition dict lacks key(s) {', '.join(missing)}; needs {', '.join(_KEYS)}")
        arrays = {key: np.asarray(data[key]) for key in _KEYS}
        capacity = arrays["observations"].shape[0]
        expected_ndim = {"observations": 2, "actions": 2, "next_observations": 2}
        for key, array in arrays.items():
            ndim = expected_ndim.get(key, 1)
            if array.ndim != ndim or array.shape[0] != capacity:
                raise SequenceDatasetError(
                    f"key {key!r} has shape {array.shape}, expected {ndim}-D with {capacity} rows like observations"
                )
        if arrays["next_observations"].shape != arrays["observations"].shape:
            raise SequenceDatasetError(
                f"next_observations shape {arrays['next_observations'].shape} differs from observations "
                f"shape {arrays['observations'].shape}"
            )
        filled = capacity if size is None else int(size)
        if not 1 <= filled <= capacity:
            raise SequenceDatasetError(f"size {filled} must lie in [1, {capacity}] (the number of rows)")
        return cls(
            **{key: jnp.asarray(array, dtype=jnp.float32) for key, array in arrays.items()},
            size=jnp.asarray(filled, dtype=jnp.int32),
        )

    @property
    def capacity(self) -> int:
        """Number of allocated rows (static)."""
        return self.observations.shape[0]


def sequence_at(
    dataset: SequenceDataset, start: Int[ArrayLike, ""], horizon: int, discount: Float[ArrayLike, ""]
) -> Batch:
    """The chunk starting at row `start` (one example, no batch axis); METHODS.md §2.3, last column.

    Requires start + horizon ≤ capacity (guaranteed by `sample_sequence`).
    """

    def window(array: Array) -> Array:
        return jax.lax.dynamic_slice_in_dim(array, start, horizon, axis=0)

    rewards = window(dataset.rewards)
    masks = window(dataset.masks)
    terminals = window(dataset.terminals)
    next_observations = window(dataset.next_observations)

    cumulative_terminal = jax.lax.cummax(terminals, axis=0)  # T̂_i
    valid = jnp.concatenate([jnp.ones((1,), terminals.dtype), 1.0 - cumulative_terminal[:-1]])  # valid_i
    gamma = jnp.asarray(discount, dtype=rewards.dtype)
    discounts = gamma ** jnp.arange(horizon, dtype=rewards.dtype)  # γ^i
    chunk_return = jnp.sum(discounts * rewards * valid)  # R_{H-1}
    chunk_mask = jnp.min(jnp.where(valid > 0, masks, jnp.ones_like(masks)))  # M_{H-1}; valid_0 = 1 always
    last_valid = jnp.sum(valid > 0) - 1  # valid is 1…1 0…0, so this is i*
    return Batch(
        observations=dataset.observations[start],
        actions=window(dataset.actions),
        rewards=chunk_return,
        masks=chunk_mask,
        next_observations=next_observations[last_valid],
        valid=valid[-1],
    )


def sample_sequence(
    dataset: SequenceDataset,
    key: PRNGKeyArray,
    batch_size: int,
    horizon: int,
    discount: Float[ArrayLike, ""],
) -> Batch:
    """B chunks with starts s ~ Uniform{0, …, size − H} (METHODS.md §2.3); jit-compatible.

    `batch_size` and `horizon` are static (they set shapes); `discount` may be traced. The last H − 1
    filled rows never start a chunk. Requires size ≥ H (not checked under jit).
    """
    if horizon < 1 or horizon > dataset.capacity:
        raise SequenceDatasetError(
            f"chunk length H = {horizon} must lie in [1, {dataset.capacity}] (the dataset's rows); use a larger dataset"
        )
    starts = jax.random.randint(key, (batch_size,), 0, dataset.size - horizon + 1, dtype=jnp.int32)
    return jax.vmap(sequence_at, in_axes=(None, 0, None, None))(dataset, starts, horizon, discount)
