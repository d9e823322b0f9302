"""`flowrl.replay`: SequenceDataset and the exact `sample_sequence` of METHODS.md §2.3."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl.batch import Batch
from flowrl.replay import SequenceDataset, SequenceDatasetError, sample_sequence, sequence_at

# 12 rows, 3 stored episodes: rows 0–5, 6–8, 9–11 (terminals on rows 5, 8, 11).
# Success (mask 0) on rows 3, 7 and 10, i.e. inside chunks.
N_ROWS = 12
TERMINAL_ROWS = (5, 8, 11)
SUCCESS_ROWS = (3, 7, 10)


def tiny_dataset() -> dict[str, np.ndarray]:
    rows = np.arange(N_ROWS, dtype=np.float32)
    terminals = np.zeros(N_ROWS, np.float32)
    terminals[list(TERMINAL_ROWS)] = 1.0
    masks = np.ones(N_ROWS, np.float32)
    masks[list(SUCCESS_ROWS)] = 0.0
    return {
        "observations": np.stack([rows, 10.0 + rows], axis=1),  # O[j] = (j, 10 + j): identifies the row
        "actions": np.stack([rows / 10.0, -rows / 10.0], axis=1),
        "rewards": rows + 1.0,  # r[j] = j + 1
        "masks": masks,
        "terminals": terminals,
        "next_observations": np.stack([rows + 0.5, 100.0 + rows], axis=1),  # O'[j] = (j + .5, 100 + j)
    }


def reference_sequence(data: dict[str, np.ndarray], start: int, horizon: int, discount: float) -> dict:
    """Plain loop over METHODS.md §2.3's recurrences (all columns); returns the last column."""
    terminal_hat = rewards = masks = next_obs = valid = None
    for i in range(horizon):
        j = start + i
        if i == 0:
            terminal_hat = data["terminals"][j]
            valid = 1.0
            rewards = data["rewards"][j]
            masks = data["masks"][j]
            next_obs = data["next_observations"][j]
        else:
            valid = 1.0 - terminal_hat  # uses T̂_{i-1}
            terminal_hat = max(terminal_hat, data["terminals"][j])
            rewards = rewards + discount**i * data["rewards"][j] * valid
            if valid == 1.0:
                masks = min(masks, data["masks"][j])
                next_obs = data["next_observations"][j]
    return {
        "observations": data["observations"][start],
        "actions": data["actions"][start : start + horizon],
        "rewards": rewards,
        "masks": masks,
        "next_observations": next_obs,
        "valid": valid,
    }


def assert_matches(batch_row: Batch, expected: dict) -> None:
    for field, value in expected.items():
        np.testing.assert_allclose(np.asarray(getattr(batch_row, field)), value, rtol=1e-6, atol=1e-6, err_msg=field)


@pytest.mark.parametrize("horizon", [1, 5])
@pytest.mark.parametrize("discount", [0.99, 0.5])
def test_sequence_at_matches_reference_loop_at_every_start(horizon, discount):
    data = tiny_dataset()
    dataset = SequenceDataset.from_numpy(data)
    for start in range(N_ROWS - horizon + 1):
        assert_matches(sequence_at(dataset, start, horizon, discount), reference_sequence(data, start, horizon, discount))


# Hand-computed with γ = 0.5 and H = 5 (r[j] = j + 1):
HAND_CASES = {
    # rows 0–4 inside episode 0; mask 0 at row 3 but rewards keep accumulating.
    0: dict(rewards=1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 4 + 0.0625 * 5, masks=0.0, next_obs=(4.5, 104.0), valid=1.0),
    # rows 1–5: the 5th transition is the episode's last one, the chunk is still valid.
    1: dict(rewards=2 + 0.5 * 3 + 0.25 * 4 + 0.125 * 5 + 0.0625 * 6, masks=0.0, next_obs=(5.5, 105.0), valid=1.0),
    # rows 4–8: boundary after row 5 freezes R, M and N; the success at row 7 is not counted.
    4: dict(rewards=5 + 0.5 * 6, masks=1.0, next_obs=(5.5, 105.0), valid=0.0),
    # rows 6–10: boundary after row 8; success at row 7 counts.
    6: dict(rewards=7 + 0.5 * 8 + 0.25 * 9, masks=0.0, next_obs=(8.5, 108.0), valid=0.0),
    # rows 7–11 (the last possible start, N − H).
    7: dict(rewards=8 + 0.5 * 9, masks=0.0, next_obs=(8.5, 108.0), valid=0.0),
}


@pytest.mark.parametrize("start", sorted(HAND_CASES))
def test_sequence_at_hand_computed_rows(start):
    expected = HAND_CASES[start]
    row = sequence_at(SequenceDataset.from_numpy(tiny_dataset()), start, 5, 0.5)
    assert float(row.rewards) == pytest.approx(expected["rewards"], abs=1e-6)
    assert float(row.masks) == expected["masks"]
    assert tuple(np.asarray(row.next_observations).tolist()) == expected["next_obs"]
    assert float(row.valid) == expected["valid"]
    np.testing.assert_array_equal(np.asarray(row.observations), [start, 10 + start])
    np.testing.assert_allclose(np.asarray(row.actions)[:, 0], np.arange(start, start + 5) / 10.0, rtol=1e-6)


def test_horizon_one_is_plain_transitions():
    data = tiny_dataset()
    dataset = SequenceDataset.from_numpy(data)
    for start in range(N_ROWS):
        row = sequence_at(dataset, start, 1, 0.99)
        assert row.actions.shape == (1, 2)
        assert float(row.rewards) == data["rewards"][start]
        assert float(row.masks) == data["masks"][start]
        assert float(row.valid) == 1.0
        np.testing.assert_array_equal(np.asarray(row.next_observations), data["next_observations"][start])


@pytest.mark.parametrize("horizon", [1, 5])
def test_sample_sequence_under_jit_matches_reference(getkey, horizon):
    data = tiny_dataset()
    dataset = SequenceDataset.from_numpy(data)
    batch_size = 2048
    sample = jax.jit(sample_sequence, static_argnums=(2, 3))
    batch = sample(dataset, getkey(), batch_size, horizon, jnp.float32(0.99))

    assert isinstance(batch, Batch)
    assert batch.observations.shape == (batch_size, 2)
    assert batch.actions.shape == (batch_size, horizon, 2)
    assert batch.chunked_actions.shape == (batch_size, horizon * 2)
    for field in ("rewards", "masks", "valid"):
        assert getattr(batch, field).shape == (batch_size,)
        assert getattr(batch, field).dtype == jnp.float32
    starts = np.asarray(batch.observations[:, 0]).astype(int)
    # Starts are uniform on {0, …, N − H}: all of them occur, nothing beyond.
    assert set(starts.tolist()) == set(range(N_ROWS - horizon + 1))
    for b in range(0, batch_size, 97):
        expected = reference_sequence(data, int(starts[b]), horizon, 0.99)
        assert_matches(jax.tree.map(lambda leaf: leaf[b], batch), expected)


def test_sample_sequence_only_uses_filled_rows_and_does_not_recompile_on_size(getkey):
    data = tiny_dataset()
    traces = []

    @eqx.filter_jit
    def starts_of(dataset, key):
        traces.append(None)
        return sample_sequence(dataset, key, 512, 3, 0.99).observations[:, 0]

    full = SequenceDataset.from_numpy(data)
    partial = SequenceDataset.from_numpy(data, size=7)  # a replay buffer with 7 filled rows
    full_starts = np.asarray(starts_of(full, getkey())).astype(int)
    partial_starts = np.asarray(starts_of(partial, getkey())).astype(int)
    assert len(traces) == 1  # `size` is a traced leaf, not static
    assert full_starts.max() == N_ROWS - 3
    assert partial_starts.max() == 7 - 3 and partial_starts.min() == 0


def test_from_numpy_rejects_bad_input():
    data = tiny_dataset()
    with pytest.raises(SequenceDatasetError, match="lacks key"):
        SequenceDataset.from_numpy({k: v for k, v in data.items() if k != "masks"})
    with pytest.raises(SequenceDatasetError, match="'rewards' has shape"):
        SequenceDataset.from_numpy({**data, "rewards": data["rewards"][:-1]})
    with pytest.raises(SequenceDatasetError, match="size 13"):
        SequenceDataset.from_numpy(data, size=13)
    with pytest.raises(SequenceDatasetError, match="chunk length H = 13"):
        sample_sequence(SequenceDataset.from_numpy(data), jax.random.key(0), 4, 13, 0.99)
