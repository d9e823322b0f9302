"""Tests for `flowrl.evaluation` (METHODS.md §1.3–§1.4): chunked open-loop acting, clipping,
addressed randomness (results independent of workers and batching), errors, worker clean-up.

Each evaluation is a few cube-double episodes of at most 30 steps; building envs dominates the time.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
import pytest

from flowrl.evaluation import (
    DimensionMismatchError,
    EnvWorkerError,
    EvaluationError,
    Evaluator,
    PolicyOutputError,
    UnknownEnvError,
    chunk_keys,
    episode_reset_seed,
    evaluate,
    make_env,
)

ENV = "cube-double-play-singletask-task2-v0"
OBS_DIM, ACTION_DIM = 37, 5
STEPS = 30  # max_episode_steps of every test env
BATCH = 4  # policy_batch_size


def uniform_policy(horizon: int, scale: float = 1.0, clip_first: bool = False):
    """Jitted policy: row i = scale · U(-1, 1)^{H·A} drawn with keys[i] only (ignores the observation)."""

    @jax.jit
    def policy(observations, keys):
        del observations
        draw = lambda k: jax.random.uniform(k, (horizon * ACTION_DIM,), minval=-1.0, maxval=1.0)  # noqa: E731
        chunks = scale * jax.vmap(draw)(keys)
        return jax.numpy.clip(chunks, -1.0, 1.0) if clip_first else chunks

    return policy


def mlp_policy(horizon: int):
    """Jitted tiny MLP of the observation plus key noise: depends on both inputs of a row."""
    weights = np.random.default_rng(0).normal(size=(OBS_DIM, horizon * ACTION_DIM)).astype(np.float32)

    @jax.jit
    def policy(observations, keys):
        noise = jax.vmap(lambda k: jax.random.normal(k, (horizon * ACTION_DIM,)))(keys)
        return jax.numpy.tanh(observations @ weights) + 0.3 * noise

    return policy


@pytest.fixture(scope="module")
def evaluator():
    with Evaluator(ENV, num_envs=3, workers=1, max_episode_steps=STEPS) as ev:
        yield ev


def outcomes(result):
    return (result.episode_success, result.episode_lengths, result.episode_returns, result.episode_seeds,
            result.episode_chunks, result.final_observations)


def assert_same_outcomes(a, b):
    for x, y in zip(outcomes(a), outcomes(b), strict=True):
        np.testing.assert_array_equal(x, y)


# --- env construction -----------------------------------------------------------------------------


def test_make_env_spaces_and_time_limit():
    env = make_env(ENV, max_episode_steps=7)
    try:
        assert env.observation_space.shape == (OBS_DIM,)
        assert env.action_space.shape == (ACTION_DIM,)
        assert env.spec.max_episode_steps == 7
    finally:
        env.close()


@pytest.mark.parametrize(
    "name", ["cube-doubel-play-singletask-task2-v0", "cube-double-play-singletask-task9-v0", "cube-double-play-v0"]
)
def test_unknown_env_name_is_one_clear_line(name):
    with pytest.raises(UnknownEnvError) as info:
        make_env(name)
    message = str(info.value)
    assert name in message and "\n" not in message and "singletask" in message


# --- protocol ---------------------------------------------------------------------------------------


def test_same_seed_same_outcomes_other_seed_differs(evaluator):
    policy = mlp_policy(horizon=5)
    first = evaluator.evaluate(policy, episodes=4, seed=3, horizon=5, policy_batch_size=BATCH)
    second = evaluator.evaluate(policy, episodes=4, seed=3, horizon=5, policy_batch_size=BATCH)
    other = evaluator.evaluate(policy, episodes=4, seed=4, horizon=5, policy_batch_size=BATCH)
    assert_same_outcomes(first, second)
    assert not np.array_equal(first.final_observations, other.final_observations)
    np.testing.assert_array_equal(first.episode_seeds, [episode_reset_seed(3, e) for e in range(4)])
    assert first.env_steps == first.episode_lengths.sum() == 4 * STEPS
    assert first.success_rate == first.episode_success.mean()


@pytest.mark.parametrize("horizon", [4, 7])
def test_chunks_are_executed_open_loop(evaluator, horizon):
    calls = []

    def counting_policy(observations, keys):
        calls.append(observations.shape[0])
        return np.tile(np.linspace(-0.5, 0.5, horizon * ACTION_DIM, dtype=np.float32), (observations.shape[0], 1))

    result = evaluator.evaluate(counting_policy, episodes=3, seed=0, horizon=horizon, policy_batch_size=BATCH)
    assert (result.episode_lengths == STEPS).all()  # nobody succeeds: every episode runs T = 30 steps
    # One batched call per chunk of H steps, not one per step: ceil(T / H) calls, each of BATCH rows.
    assert calls == [BATCH] * math.ceil(STEPS / horizon)
    assert (result.episode_chunks == math.ceil(STEPS / horizon)).all()


def test_executed_actions_are_the_clipped_time_major_chunks_and_replay_exactly(evaluator):
    horizon, seed = 4, 11
    result = evaluator.evaluate(uniform_policy(horizon, scale=3.0), episodes=3, seed=seed, horizon=horizon,
                                policy_batch_size=BATCH, record_actions=True)
    assert result.episode_actions is not None
    unclipped_seen = False
    for episode, actions in enumerate(result.episode_actions):
        assert actions.shape == (result.episode_lengths[episode], ACTION_DIM)
        for chunk in range(result.episode_chunks[episode]):
            key = chunk_keys(seed, np.array([episode]), np.array([chunk]))[0]
            raw = 3.0 * np.asarray(jax.random.uniform(key, (horizon * ACTION_DIM,), minval=-1.0, maxval=1.0))
            expected = np.clip(raw.reshape(horizon, ACTION_DIM), -1.0, 1.0)  # a_0 … a_{H-1}, time-major
            executed = actions[chunk * horizon: (chunk + 1) * horizon]
            np.testing.assert_array_equal(executed, expected[: executed.shape[0]].astype(np.float32))
            unclipped_seen |= bool((np.abs(raw) > 1.0).any())
    assert unclipped_seen

    # Replaying the recorded seed and actions on a fresh env reproduces the evaluator's final state.
    env = make_env(ENV, max_episode_steps=STEPS)
    try:
        for episode, actions in enumerate(result.episode_actions):
            env.reset(seed=int(result.episode_seeds[episode]))
            for action in actions:
                observation, *_ = env.step(action)
            np.testing.assert_array_equal(observation, result.final_observations[episode])
    finally:
        env.close()


def test_env_receives_clipped_actions(evaluator):
    kwargs = dict(episodes=3, seed=5, horizon=5, policy_batch_size=BATCH)
    big = evaluator.evaluate(uniform_policy(5, scale=4.0), **kwargs)
    clipped = evaluator.evaluate(uniform_policy(5, scale=4.0, clip_first=True), **kwargs)
    small = evaluator.evaluate(uniform_policy(5, scale=0.5), **kwargs)
    np.testing.assert_array_equal(big.final_observations, clipped.final_observations)
    assert not np.array_equal(big.final_observations, small.final_observations)


def test_outcomes_do_not_depend_on_num_envs(evaluator):
    # Fixed policy batch shape + row-wise policy → each episode's chunks are bit-identical whether the
    # 5 episodes run 3 at a time (slots reused, other batch neighbours) or one by one.
    policy = mlp_policy(horizon=5)
    kwargs = dict(episodes=5, seed=8, horizon=5, policy_batch_size=BATCH)
    three_slots = evaluator.evaluate(policy, **kwargs)
    with Evaluator(ENV, num_envs=1, max_episode_steps=STEPS) as one_slot:
        assert_same_outcomes(three_slots, one_slot.evaluate(policy, **kwargs))


def test_two_workers_equal_one_worker_exactly(evaluator):
    policy = mlp_policy(horizon=5)
    kwargs = dict(episodes=5, seed=21, horizon=5, policy_batch_size=BATCH, record_actions=True)
    single = evaluator.evaluate(policy, **kwargs)
    with Evaluator(ENV, num_envs=3, workers=2, max_episode_steps=STEPS) as parallel:
        assert parallel.workers == 2
        double = parallel.evaluate(policy, **kwargs)
    assert_same_outcomes(single, double)
    for a, b in zip(single.episode_actions, double.episode_actions, strict=True):
        np.testing.assert_array_equal(a, b)


def test_chunks_longer_than_a_segment_run_as_several_segments(evaluator, monkeypatch):
    # With 3 actions per round trip, a 7-action chunk runs as segments of 3 + 3 + 1 (in both processes).
    policy = mlp_policy(horizon=7)
    kwargs = dict(episodes=4, seed=2, horizon=7, policy_batch_size=BATCH, record_actions=True)
    whole = evaluator.evaluate(policy, **kwargs)
    monkeypatch.setattr("flowrl.evaluation._SEGMENT_CAPACITY", 3)
    with Evaluator(ENV, num_envs=2, workers=2, max_episode_steps=STEPS) as segmented:
        split = segmented.evaluate(policy, **kwargs)
    assert_same_outcomes(whole, split)
    for a, b in zip(whole.episode_actions, split.episode_actions, strict=True):
        np.testing.assert_array_equal(a, b)


# --- errors and clean-up ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "named"), [({"expected_obs_dim": 36}, ["36", "37"]), ({"expected_action_dim": 4}, ["4", "5"])]
)
def test_dimension_mismatch_raises_before_any_episode(evaluator, dims, named):
    calls = []

    def policy(observations, keys):
        calls.append(1)
        return np.zeros((observations.shape[0], 5 * ACTION_DIM), np.float32)

    with pytest.raises(DimensionMismatchError) as info:
        evaluator.evaluate(policy, episodes=2, seed=0, horizon=5, **dims)
    assert calls == []
    assert all(n in str(info.value) for n in named) and "\n" not in str(info.value)


def test_wrong_chunk_shape_and_non_finite_actions_are_reported(evaluator):
    def short_policy(observations, keys):
        return np.zeros((observations.shape[0], 24), np.float32)

    with pytest.raises(PolicyOutputError, match=r"expected \(4, 25\)"):
        evaluator.evaluate(short_policy, episodes=2, seed=0, horizon=5, policy_batch_size=BATCH)

    def nan_policy(observations, keys):
        return np.full((observations.shape[0], 25), np.nan, np.float32)

    with pytest.raises(PolicyOutputError, match="non-finite"):
        evaluator.evaluate(nan_policy, episodes=2, seed=0, horizon=5, policy_batch_size=BATCH)


@pytest.mark.parametrize("bad", [{"seed": -1}, {"horizon": 0}, {"episodes": 0}, {"policy_batch_size": 0}])
def test_invalid_arguments(evaluator, bad):
    kwargs = dict(episodes=2, seed=0, horizon=5) | bad
    with pytest.raises(EvaluationError):
        evaluator.evaluate(uniform_policy(5), **kwargs)


def test_worker_processes_are_stopped_when_the_policy_raises():
    import multiprocessing

    seen_workers = []

    def failing_policy(observations, keys):
        seen_workers.extend(p for p in multiprocessing.active_children() if p.name.startswith("flowrl-eval"))
        raise RuntimeError("policy failed")

    with pytest.raises(RuntimeError, match="policy failed"):
        evaluate(failing_policy, ENV, episodes=2, seed=0, horizon=5, workers=2, max_episode_steps=STEPS)
    assert len(seen_workers) == 1  # workers=2: this process + one spawned worker
    for process in seen_workers:
        assert not process.is_alive()
        with pytest.raises(ProcessLookupError):
            os.kill(process.pid, 0)


def test_a_dead_worker_is_reported_and_the_evaluator_refuses_further_use():
    ev = Evaluator(ENV, num_envs=2, workers=2, max_episode_steps=STEPS)
    try:
        (worker,) = ev._pool.workers
        worker.process.kill()
        worker.process.join()
        with pytest.raises(EnvWorkerError, match="slots 1-1"):
            ev.evaluate(uniform_policy(5), episodes=2, seed=0, horizon=5, policy_batch_size=BATCH)
        with pytest.raises(EvaluationError, match="create a new one"):
            ev.evaluate(uniform_policy(5), episodes=2, seed=0, horizon=5, policy_batch_size=BATCH)
    finally:
        ev.close()


def test_closed_evaluator_refuses():
    ev = Evaluator(ENV, num_envs=1, max_episode_steps=STEPS)
    ev.close()
    with pytest.raises(EvaluationError, match="closed"):
        ev.evaluate(uniform_policy(5), episodes=1, seed=0, horizon=5)
