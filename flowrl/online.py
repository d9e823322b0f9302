"""The online phase of offline-to-online training (METHODS.md §1.3, §1.4), resumable exactly.

After the offline phase the agent keeps training while it acts in the OGBench env. Per online step
i = 0 … online_steps − 1 (the reference `main.py` loop):

1. **Act.** Before `random_action_steps` the action is uniform in [−1, 1]^A (RLPD's warm-up: one
   action, not a chunk). Otherwise an action queue is used: when it is empty the policy is called
   once, its D = H·A vector is split time-major into a_0 … a_{H−1} and enqueued; one action is
   popped per env step (chunks run open-loop). The queue is cleared when an episode ends. As in
   the reference the driver does not clip the action (the extractors clip internally).
2. **Store** (obs, a, r, terminal = terminated ∨ truncated, mask = 1 − terminated, next_obs); with
   `sparse`, r ← −1 if r ≠ 0 else 0 (METHODS §2.2, the dataset loader's rule).
3. **Update** for i ≥ `start_training` (for every method, METHODS §9 item 11): `utd_ratio` updates,
   each on a batch of `sample_sequence` (METHODS §2.3) over the filled part of the replay buffer.

Replay buffers (a `flowrl.replay.SequenceDataset` on device that grows by writing rows past `size`):

- non-balanced (all methods but RLPD): one buffer, the offline dataset followed by room for
  `online_steps` rows; the pointer starts after the offline rows and never wraps, so offline and
  online chunks are mixed uniformly by count;
- balanced (`balanced_sampling`, RLPD): the offline dataset stays as it is and an empty buffer of
  `online_steps` rows takes the online transitions; each batch is B/2 chunks from each (B − B/2
  from the online one), concatenated (`balanced_sample`).

Both get H − 1 spare rows at the end so a fixed-size write of H rows never runs off the array
(`jax.lax.dynamic_update_slice` would otherwise shift it back over filled rows); spare rows are
never sampled. Memory: `transition_bytes(obs, act)` = 4·(2·obs + act + 3) bytes per row (float32
observations, next_observations, actions, reward, mask, terminal); cube-double shapes (obs 40,
act 5) → 352 MB per million transitions. `check_buffer_fits` says on which device the buffer lives
and raises `ReplayBufferTooLargeError` (one line) when it does not fit.

Execution: env steps run on the host, updates on device. Updates never change the actions of a
chunk already in the queue, so the steps of one *block* — until the queue empties, the episode
ends, or a log/eval/save boundary is reached, at most H steps — are stepped first and their
rows and updates then run in ONE jitted call (`lax.scan` over H slots, skipped slots under
`lax.cond`; buffer and agent donated, so nothing is copied). Update j of a block samples from the
buffer filled up to its own step, so the result is the reference's step-by-step order exactly.

Randomness is addressed, never streamed: with `k = fold_in(key(seed), 2^31 − 2)`, the policy call
made at online step i uses `fold_in(fold_in(k, 0), i)`, the u-th update of step i uses
`fold_in(fold_in(fold_in(k, 1), i), u)` and the random action of step i `fold_in(fold_in(k, 2), i)`;
training episode e resets with `episode_reset_seed(env_seed, e)`. Nothing depends on a stream a
resume would cut.

Resume (checked on CPU by tests/test_online.py: bit-identical to an uninterrupted run): an online
checkpoint holds the agent, the online rows written so far, the queue, the counters, the log
accumulators and the env's state. The env is restored by resetting episode e with its seed and
replaying the episode's executed actions, which are the buffer's last rows. This also restores
Python-side env state that `mujoco.mj_setState` would miss (OGBench keeps `_prev_qpos`,
`_prev_ob_info`, the TimeLimit counter outside MuJoCo). The replay is then verified against the
stored MuJoCo integration state, the last stored next-observation and the env's `np_random`
state; a mismatch (a non-deterministic env) warns with `ResumeMismatchWarning`, sets the stored
physics and RNG state, and carries on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from flowrl import agent as agent_lib
from flowrl.agent import AgentConfig, AgentState
from flowrl.batch import Batch
from flowrl.errors import ConfigError, FlowRLError
from flowrl.extractor import AbstractExtractor
from flowrl.replay import SequenceDataset, sample_sequence

__all__ = [
    "ONLINE_KEY_TAG",
    "ActionQueue",
    "OnlineError",
    "OnlinePhase",
    "OnlineSettings",
    "ReplayBufferTooLargeError",
    "ResumeMismatchWarning",
    "append_rows",
    "available_bytes",
    "balanced_sample",
    "buffer_bytes",
    "buffer_rows",
    "check_buffer_fits",
    "empty_buffer",
    "extend_buffer",
    "is_online_checkpoint",
    "latest_phase_checkpoint",
    "online_checkpoint_template",
    "online_rows",
    "sparse_rewards",
    "transition_bytes",
]

ONLINE_KEY_TAG = 2**31 - 2  # fold_in(key(seed), ·) of the online phase; init uses 2^31 − 1
_ACT, _UPDATE, _RANDOM = 0, 1, 2
_FIELDS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
PHASE_ONLINE = "online"


class OnlineError(FlowRLError, ValueError):
    """Bad online-phase input (settings, checkpoint contents); one line naming the value and the fix."""


class ReplayBufferTooLargeError(OnlineError):
    """The replay buffer does not fit in the device's free memory."""


class ResumeMismatchWarning(UserWarning):
    """Replaying the current episode at resume did not reproduce the stored env state."""


# --------------------------------------------------------------------------------------------------
# Buffer memory


def transition_bytes(obs_dim: int, action_dim: int) -> int:
    """Bytes per stored transition: float32 obs, next_obs (obs_dim each), action, reward, mask, terminal."""
    return 4 * (2 * obs_dim + action_dim + 3)


def buffer_bytes(rows: int, obs_dim: int, action_dim: int) -> int:
    return rows * transition_bytes(obs_dim, action_dim)


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Free memory of `device`: the allocator's limit minus use on accelerators, MemAvailable on CPU."""
    device = device or jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def buffer_rows(settings: OnlineSettings, offline_rows: int, horizon: int) -> int:
    """Rows the replay buffer allocates: (offline rows unless balanced) + online_steps + H − 1 spare."""
    return (0 if settings.balanced_sampling else offline_rows) + settings.online_steps + horizon - 1


def check_buffer_fits(
    rows: int, obs_dim: int, action_dim: int, *, device: jax.Device | None = None, available: int | None = None
) -> str:
    """One line saying where the buffer of `rows` transitions lives, or `ReplayBufferTooLargeError`.

    The buffer must fit in the free memory of the device (`available_bytes`, or `available` when given).
    """
    device = device or jax.devices()[0]
    needed = buffer_bytes(rows, obs_dim, action_dim)
    free = available_bytes(device) if available is None else int(available)
    where = f"{device.platform}:{device.id}"
    per_million = transition_bytes(obs_dim, action_dim)  # bytes per row = MB per million rows
    if free is not None and needed > free:
        raise ReplayBufferTooLargeError(
            f"replay buffer of {rows:,} transitions needs {needed / 2**20:,.0f} MiB on {where} "
            f"({per_million} MB per million transitions) but only {free / 2**20:,.0f} MiB are free; "
            "lower train.online_steps, use a smaller dataset, or run on a device with more memory"
        )
    free_text = "unknown free memory" if free is None else f"{free / 2**20:,.0f} MiB free"
    return (f"replay buffer: {rows:,} transitions, {needed / 2**20:,.1f} MiB on device {where} "
            f"({free_text}; {per_million} MB per million transitions)")


# --------------------------------------------------------------------------------------------------
# Buffer operations


def sparse_rewards(rewards: np.ndarray | float) -> np.ndarray:
    """METHODS §2.2: r ← −1 if r ≠ 0 else 0 (float32); the rule `flowrl.ogbench.load_dataset` applies."""
    rewards = np.asarray(rewards, dtype=np.float32)
    return np.where(rewards != 0.0, np.float32(-1.0), np.float32(0.0)).astype(np.float32)


def _zeros(rows: int, like: Array) -> Array:
    return jnp.zeros((rows, *like.shape[1:]), jnp.float32)


def extend_buffer(dataset: SequenceDataset, extra_rows: int, horizon: int) -> SequenceDataset:
    """The non-balanced buffer: `dataset`'s rows, then `extra_rows` empty rows and H − 1 spare ones.

    `size` stays the dataset's, so sampling still sees the offline rows only until rows are appended.
    """
    pad = extra_rows + horizon - 1
    arrays = {name: jnp.concatenate([getattr(dataset, name)[: int(dataset.size)],
                                     _zeros(pad, getattr(dataset, name))]) for name in _FIELDS}
    # A fresh size array: the buffer is donated to the update call, the dataset must survive it.
    return SequenceDataset(**arrays, size=jnp.array(int(dataset.size), jnp.int32))


def zero_rows(rows: int, obs_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    """`rows` empty transitions on the host, one float32 array per buffer field."""
    widths = {"observations": (obs_dim,), "actions": (action_dim,), "next_observations": (obs_dim,)}
    return {name: np.zeros((rows, *widths.get(name, ())), np.float32) for name in _FIELDS}


def empty_buffer(rows: int, obs_dim: int, action_dim: int, horizon: int) -> SequenceDataset:
    """The balanced (online-only) buffer: `rows` + H − 1 empty rows, size 0."""
    arrays = zero_rows(rows + horizon - 1, obs_dim, action_dim)
    return SequenceDataset(**{name: jnp.asarray(a) for name, a in arrays.items()}, size=jnp.zeros((), jnp.int32))


def append_rows(buffer: SequenceDataset, rows: Mapping[str, Array], count: Array) -> SequenceDataset:
    """Write the first `count` of the (K, …) `rows` at `buffer.size` and advance `size` by `count`.

    K is static, `count` ≤ K may be traced; rows past `count` leave the buffer untouched. Needs
    size + K ≤ capacity (the spare rows of `extend_buffer` / `empty_buffer`). jit-compatible.
    """
    k = rows["observations"].shape[0]
    start = buffer.size
    keep = jnp.arange(k) < count

    def write(old: Array, new: Array) -> Array:
        current = jax.lax.dynamic_slice_in_dim(old, start, k, axis=0)
        mask = jnp.reshape(keep, (k,) + (1,) * (new.ndim - 1))
        merged = jnp.where(mask, jnp.asarray(new, old.dtype), current)
        return jax.lax.dynamic_update_slice_in_dim(old, merged, start, axis=0)

    arrays = {name: write(getattr(buffer, name), rows[name]) for name in _FIELDS}
    return SequenceDataset(**arrays, size=start + jnp.asarray(count, jnp.int32))


def online_rows(buffer: SequenceDataset, first: int, last: int) -> dict[str, np.ndarray]:
    """Host copies of rows [first, last) (what a checkpoint stores)."""
    return {name: np.asarray(jax.device_get(getattr(buffer, name)[first:last])) for name in _FIELDS}


def balanced_sample(
    offline: SequenceDataset, online: SequenceDataset, key: PRNGKeyArray, batch_size: int, horizon: int, discount
) -> Batch:
    """RLPD's batch (METHODS §1.3): B/2 chunks from `offline`, B − B/2 from `online`, concatenated."""
    offline_key, online_key = jax.random.split(key)
    half = batch_size // 2
    first = sample_sequence(offline, offline_key, half, horizon, discount)
    second = sample_sequence(online, online_key, batch_size - half, horizon, discount)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), first, second)


# --------------------------------------------------------------------------------------------------
# Action queue


class ActionQueue:
    """FIFO of the actions of one chunk (METHODS §1.3): filled from one policy call, popped per step."""

    def __init__(self, horizon: int, action_dim: int):
        self.horizon, self.action_dim = horizon, action_dim
        self._actions = np.zeros((horizon, action_dim), np.float32)
        self._next = horizon  # index of the next action; == horizon: empty

    def __len__(self) -> int:
        return self.horizon - self._next

    def fill(self, chunk: np.ndarray) -> None:
        """Enqueue a D = H·A chunk, time-major (a_0 … a_{H−1}); the queue must be empty."""
        if len(self):
            raise RuntimeError("ActionQueue.fill on a non-empty queue")
        self._actions = np.asarray(chunk, np.float32).reshape(self.horizon, self.action_dim).copy()
        self._next = 0

    def pop(self) -> np.ndarray:
        if not len(self):
            raise RuntimeError("ActionQueue.pop on an empty queue")
        action = self._actions[self._next].copy()
        self._next += 1
        return action

    def clear(self) -> None:
        self._next = self.horizon

    def state(self) -> tuple[np.ndarray, int]:
        """(all H stored actions, number still queued): what a checkpoint needs."""
        return self._actions.copy(), len(self)

    def restore(self, actions: np.ndarray, queued: int) -> None:
        if not 0 <= queued <= self.horizon:
            raise OnlineError(f"checkpoint queue length {queued} is outside [0, H = {self.horizon}]; "
                              "the checkpoint does not belong to this config")
        self._actions = np.asarray(actions, np.float32).reshape(self.horizon, self.action_dim).copy()
        self._next = self.horizon - int(queued)


# --------------------------------------------------------------------------------------------------
# Settings and progress


@dataclasses.dataclass(frozen=True)
class OnlineSettings:
    """The online-phase knobs of `flowrl.train.train` (METHODS §1.1, §1.3)."""

    online_steps: int
    start_training: int = 5000
    balanced_sampling: bool = False
    random_action_steps: int = 0
    utd_ratio: int = 1
    sparse: bool = False
    max_episode_steps: int | None = None
    log_interval: int = 5000
    eval_interval: int = 50_000
    save_interval: int = 50_000

    def check(self, horizon: int, batch_size: int) -> None:
        """One `ConfigError` line per bad value."""
        for name in ("online_steps", "start_training", "random_action_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name} must be an int >= 0, got {value!r}")
        for name in ("utd_ratio", "log_interval", "eval_interval", "save_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be an int >= 1, got {value!r}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"train.online_max_episode_steps must be >= 1 or None, got {self.max_episode_steps}")
        if self.balanced_sampling:
            if batch_size < 2:
                raise ConfigError("train.balanced_sampling needs flowrl.AgentConfig.batch_size >= 2 (B/2 from each buffer)")
            if self.online_steps and self.start_training < horizon:
                raise ConfigError(
                    f"train.balanced_sampling samples chunks of H = {horizon} online rows, so train.start_training "
                    f"must be >= {horizon} (got {self.start_training}); raise it"
                )


@dataclasses.dataclass
class _Progress:
    """Host-side counters of the online phase; all of it goes into a checkpoint's JSON `extra`."""

    step: int = 0  # online steps done
    episode: int = 0  # index of the current (or next, when needs_reset) training episode
    episode_start: int = 0  # online row of the current episode's first transition
    episode_return: float = 0.0
    needs_reset: bool = True
    # Since the last train-log record: metric sums and count, and episodes finished.
    metric_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    updates: int = 0
    episodes_done: int = 0
    successes: int = 0
    return_sum: float = 0.0
    total_episodes: int = 0
    total_successes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Progress:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(data)
        if missing:
            raise OnlineError(f"online checkpoint lacks progress field(s) {sorted(missing)}; it was written by "
                              "another flowrl version — start the run over with --overwrite")
        return cls(**{k: data[k] for k in fields})


# --------------------------------------------------------------------------------------------------
# The online phase


Callback = Callable[..., Any]


def _physics(env: Any) -> np.ndarray | None:
    """MuJoCo's full integration state of an OGBench env (None if it is not a MuJoCo env)."""
    unwrapped = getattr(env, "unwrapped", env)
    model, data = getattr(unwrapped, "_model", None), getattr(unwrapped, "_data", None)
    if model is None or data is None:
        return None
    import mujoco

    spec = mujoco.mjtState.mjSTATE_INTEGRATION
    state = np.empty(mujoco.mj_stateSize(model, spec), np.float64)
    mujoco.mj_getState(model, data, state, spec)
    return state


def _set_physics(env: Any, state: np.ndarray) -> None:
    import mujoco

    unwrapped = env.unwrapped
    mujoco.mj_setState(unwrapped._model, unwrapped._data, np.asarray(state, np.float64),
                       mujoco.mjtState.mjSTATE_INTEGRATION)


def _rng_state(env: Any) -> dict[str, Any] | None:
    rng = getattr(env.unwrapped, "_np_random", None)
    return None if rng is None else rng.bit_generator.state


class OnlinePhase:
    """Runs online steps [start, online_steps) of one seed; see the module docstring.

    Args:
        env_name: OGBench single-task name (the training env is `flowrl.evaluation.make_env`).
        extractor, agent_config: as in `flowrl.train.train`.
        settings: `OnlineSettings`.
        offline: the offline dataset on device (`SequenceDataset`).
        seed: the run seed (keys and env seeds derive from it).
        obs_dim, chunk_dim: the agent's dims (chunk_dim = H·A).
        step_offset: offline_steps; logs and checkpoints use step_offset + online step.
    """

    def __init__(
        self,
        env_name: str,
        extractor: AbstractExtractor,
        agent_config: AgentConfig,
        settings: OnlineSettings,
        offline: SequenceDataset,
        *,
        seed: int,
        obs_dim: int,
        chunk_dim: int,
        step_offset: int,
    ):
        settings.check(agent_config.horizon, agent_config.batch_size)
        self.env_name = env_name
        self.extractor = extractor
        self.config = agent_config
        self.settings = settings
        self.seed = seed
        self.obs_dim, self.chunk_dim = obs_dim, chunk_dim
        self.horizon = agent_config.horizon
        self.action_dim = chunk_dim // self.horizon
        self.step_offset = step_offset
        self.env_seed = (seed * 7919 + 2) % 2**31  # eval uses seed·7919 + 1
        online_key = jax.random.fold_in(jax.random.key(seed), ONLINE_KEY_TAG)
        self._act_key = jax.random.fold_in(online_key, _ACT)
        self._update_key = jax.random.fold_in(online_key, _UPDATE)
        self._random_key = jax.random.fold_in(online_key, _RANDOM)

        steps = settings.online_steps
        rows = buffer_rows(settings, int(offline.size), self.horizon)
        self.buffer_message = check_buffer_fits(rows, obs_dim, self.action_dim)
        if settings.balanced_sampling:
            self.offline = offline
            self.base_rows = 0
            self.buffer = empty_buffer(steps, obs_dim, self.action_dim, self.horizon)
        else:
            self.offline = None
            self.base_rows = int(offline.size)
            self.buffer = extend_buffer(offline, steps, self.horizon)
        self.queue = ActionQueue(self.horizon, self.action_dim)
        self.progress = _Progress()
        self.env: Any = None
        self.obs: np.ndarray | None = None
        self.env_seconds = 0.0
        self.env_steps_timed = 0

    # ---- jitted pieces (module-level, so every phase with the same shapes reuses one compile) ----

    def _policy(self, state: AgentState, observation: np.ndarray, step: int) -> np.ndarray:
        """The chunk (D,) for the policy call made at online step `step`."""
        key = jax.random.fold_in(self._act_key, step)
        return np.asarray(_policy_call(state, self.extractor, jnp.asarray(observation, jnp.float32), key,
                                       self.obs_dim, self.chunk_dim))

    def _block(self, state: AgentState, rows: Mapping[str, np.ndarray], count: int, first_step: int):
        fixed = (self.offline, self.extractor, self.config, self._update_key, self.settings)
        return _block_call(fixed, state, self.buffer, rows, np.int32(count), np.int32(first_step))

    # ---- env ------------------------------------------------------------------------------------

    def _make_env(self) -> Any:
        from flowrl.evaluation import make_env

        return make_env(self.env_name, max_episode_steps=self.settings.max_episode_steps)

    def _reset(self) -> None:
        from flowrl.evaluation import episode_reset_seed

        p = self.progress
        self.obs, _ = self.env.reset(seed=episode_reset_seed(self.env_seed, p.episode))
        p.episode_start = p.step
        p.episode_return = 0.0
        p.needs_reset = False
        self.queue.clear()

    # ---- checkpoint -----------------------------------------------------------------------------

    def checkpoint(self, state: AgentState) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tree, extra) of an online checkpoint after `progress.step` online steps."""
        first = self.base_rows
        rows = online_rows(self.buffer, first, first + self.progress.step)
        actions, queued = self.queue.state()
        physics = None if self.env is None or self.progress.needs_reset else _physics(self.env)
        rng = None if self.env is None or self.progress.needs_reset else _rng_state(self.env)
        tree = {"agent": state, "rows": rows, "queue": actions}
        extra = {
            "phase": PHASE_ONLINE,
            "online_step": self.progress.step,
            "online_rows": self.progress.step,
            "queued": queued,
            "progress": self.progress.to_json(),
            "physics": None if physics is None else [float(x) for x in physics],
            "np_random": rng,
        }
        return tree, extra

    def checkpoint_template(self, state: AgentState, extra: Mapping[str, Any]) -> dict[str, Any]:
        """The `like` tree of an online checkpoint (`online_checkpoint_template`)."""
        return online_checkpoint_template(state, extra, self.obs_dim, self.action_dim, self.horizon)

    def restore(self, tree: Mapping[str, Any], extra: Mapping[str, Any]) -> AgentState:
        """Load an online checkpoint: rows into the buffer, queue, counters, and the env (replayed)."""
        progress = _Progress.from_json(extra["progress"])
        n = int(extra["online_rows"])
        if n != progress.step or n > self.settings.online_steps:
            raise OnlineError(
                f"online checkpoint holds {n} rows at online step {progress.step} (online_steps = "
                f"{self.settings.online_steps}); it does not belong to this config — start over with --overwrite"
            )
        rows = {name: np.asarray(tree["rows"][name]) for name in _FIELDS}
        self.buffer = _write_host_rows(self.buffer, rows, self.base_rows)
        self.queue.restore(np.asarray(tree["queue"]), int(extra["queued"]))
        self.progress = progress
        if not progress.needs_reset:
            self._replay_episode(rows, extra)
        return tree["agent"]

    def _replay_episode(self, rows: Mapping[str, np.ndarray], extra: Mapping[str, Any]) -> None:
        """Rebuild the env mid-episode: reset with the episode's seed, step its stored actions."""
        from flowrl.evaluation import episode_reset_seed

        p = self.progress
        if self.env is None:
            self.env = self._make_env()
        self.obs, _ = self.env.reset(seed=episode_reset_seed(self.env_seed, p.episode))
        for action in rows["actions"][p.episode_start: p.step]:
            self.obs, *_ = self.env.step(action)
        problems = []
        if p.step > p.episode_start and not np.array_equal(
                np.asarray(self.obs, np.float32), rows["next_observations"][p.step - 1]):
            problems.append("observation")
        stored_physics = extra.get("physics")
        physics = _physics(self.env)
        if stored_physics is not None and physics is not None:
            stored = np.asarray(stored_physics, np.float64)
            if not np.array_equal(stored, physics):
                problems.append("MuJoCo state")
                _set_physics(self.env, stored)
        stored_rng = extra.get("np_random")
        if stored_rng is not None and _rng_state(self.env) != stored_rng:
            problems.append("np_random state")
            self.env.unwrapped._np_random.bit_generator.state = stored_rng
        if problems:
            warnings.warn(
                f"replaying training episode {p.episode} ({p.step - p.episode_start} steps) of {self.env_name} did "
                f"not reproduce the stored {', '.join(problems)}; the env is not deterministic here, so the "
                "resumed run will not be bit-identical to an uninterrupted one (stored state was set where possible)",
                ResumeMismatchWarning, stacklevel=2,
            )

    # ---- the loop -------------------------------------------------------------------------------

    def _boundary(self, step: int) -> int:
        """The next online step > `step` at which a block must end (log, eval, save, or the end)."""
        s = self.settings
        candidates = [s.online_steps]
        for interval in (s.log_interval, s.eval_interval, s.save_interval):
            candidates.append((step // interval + 1) * interval)
        return min(candidates)

    def run(
        self,
        state: AgentState,
        *,
        on_log: Callback,
        on_eval: Callback,
        on_save: Callback,
        on_progress: Callable[[int], None] | None = None,
    ) -> AgentState:
        """Online steps [progress.step, online_steps). Callbacks get (global_step, …):

        on_log(step, record), on_eval(step, state), on_save(step, tree, extra), on_progress(steps_done).
        """
        s = self.settings
        p = self.progress
        horizon, obs_dim, action_dim = self.horizon, self.obs_dim, self.action_dim
        if self.env is None:
            self.env = self._make_env()
        # The block call donates the agent's buffers; the offline phase may hand over leaves that
        # share one buffer (targets start as the online modules), which cannot be donated twice.
        state = jax.tree.map(lambda x: jnp.array(x, copy=True) if eqx.is_array(x) else x, state)
        rows = zero_rows(horizon, obs_dim, action_dim)
        interval_start = time.perf_counter()
        interval_steps = 0
        while p.step < s.online_steps:
            if p.needs_reset:
                self._reset()
            first_step = p.step
            rows = {name: np.zeros_like(array) for name, array in rows.items()}  # the last call may still read them
            limit = min(horizon, self._boundary(first_step) - first_step)
            count = 0
            tick = time.perf_counter()
            while count < limit:
                step = first_step + count
                if step < s.random_action_steps:
                    action = np.asarray(_random_action(self._random_key, np.int32(step), self.action_dim), np.float32)
                else:
                    if not len(self.queue):
                        if count:  # the policy must see the updates of every earlier step
                            break
                        self.queue.fill(self._policy(state, self.obs, step))
                    action = self.queue.pop()
                next_obs, reward, terminated, truncated, info = self.env.step(action)
                reward = float(reward)
                stored_reward = sparse_rewards(reward) if s.sparse else np.float32(reward)
                rows["observations"][count] = self.obs
                rows["actions"][count] = action
                rows["rewards"][count] = stored_reward
                rows["masks"][count] = 0.0 if terminated else 1.0
                rows["terminals"][count] = 1.0 if (terminated or truncated) else 0.0
                rows["next_observations"][count] = next_obs
                p.episode_return += reward
                count += 1
                self.obs = next_obs
                if terminated or truncated:
                    self.queue.clear()
                    p.needs_reset = True
                    p.episode += 1
                    p.episodes_done += 1
                    p.total_episodes += 1
                    success = bool(info.get("success", False))
                    p.successes += int(success)
                    p.total_successes += int(success)
                    p.return_sum += p.episode_return
                    break
            self.env_seconds += time.perf_counter() - tick
            self.env_steps_timed += count
            state, self.buffer, metrics, active = self._block(state, rows, count, first_step)
            p.step += count
            interval_steps += count
            active = np.asarray(active)
            if active.any():
                metrics = jax.device_get(metrics)
                for name, values in metrics.items():
                    p.metric_sums[name] = p.metric_sums.get(name, 0.0) + float(np.sum(np.asarray(values, np.float64)[active]))
                p.updates += int(active.sum())
            if on_progress is not None:
                on_progress(count)
            step = p.step
            done = step == s.online_steps
            if step % s.log_interval == 0 or done:
                record = self._log_record()
                elapsed = max(time.perf_counter() - interval_start, 1e-9)
                record["time/online_env_steps_per_second"] = interval_steps / elapsed
                on_log(self.step_offset + step, record)
                interval_start, interval_steps = time.perf_counter(), 0
            if step % s.eval_interval == 0 or done:
                on_eval(self.step_offset + step, state)
            if step % s.save_interval == 0 or done:
                tree, extra = self.checkpoint(state)
                on_save(self.step_offset + step, tree, extra)
        return state

    def _log_record(self) -> dict[str, float]:
        """Means over the interval since the last record; resets the interval accumulators."""
        p = self.progress
        record: dict[str, float] = {}
        if p.updates:
            record.update({name: total / p.updates for name, total in sorted(p.metric_sums.items())})
            if "optim/skipped" in p.metric_sums:
                record["optim/skipped"] = p.metric_sums["optim/skipped"]
        record["online/updates"] = float(p.updates)
        record["online/episodes"] = float(p.episodes_done)
        record["online/success"] = p.successes / p.episodes_done if p.episodes_done else math.nan
        record["online/return"] = p.return_sum / p.episodes_done if p.episodes_done else math.nan
        record["online/total_episodes"] = float(p.total_episodes)
        record["online/total_successes"] = float(p.total_successes)
        record["online/buffer_size"] = float(self.base_rows + p.step)
        p.metric_sums, p.updates = {}, 0
        p.episodes_done = p.successes = 0
        p.return_sum = 0.0
        return record

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


@eqx.filter_jit
def _policy_call(state: AgentState, extractor: AbstractExtractor, observation, key, obs_dim: int, chunk_dim: int):
    ctx = agent_lib.make_context(state, obs_dim, chunk_dim)
    return extractor.sample(state.online.extractor, ctx, observation, key=key)


@functools.partial(jax.jit, static_argnums=(2,))
def _random_action(key: PRNGKeyArray, step: Array, action_dim: int) -> Array:
    """RLPD's warm-up action of online step `step`: uniform in [−1, 1]^A."""
    return jax.random.uniform(jax.random.fold_in(key, step), (action_dim,), minval=-1.0, maxval=1.0)


def _block_impl(fixed, state: AgentState, buffer: SequenceDataset, rows, count, first_step):
    """One block (module docstring): write `count` ≤ H rows, then for slot j < count run `utd_ratio`
    updates when step first_step + j ≥ start_training, each sampling from the buffer filled
    through step first_step + j. `fixed` = (offline or None, extractor, config, update key, settings)
    is not donated; the agent, the buffer and the rows are."""
    offline, extractor, config, update_key, settings = fixed
    horizon, batch_size = config.horizon, config.batch_size
    start_size = buffer.size
    buffer = append_rows(buffer, rows, count)

    def sample(data: SequenceDataset, key):
        if offline is None:
            return sample_sequence(data, key, batch_size, horizon, config.discount)
        return balanced_sample(offline, data, key, batch_size, horizon, config.discount)

    def updates(carry, step, filled):
        view = eqx.tree_at(lambda d: d.size, buffer, filled)
        step_key = jax.random.fold_in(update_key, step)

        def one(inner, u):
            sample_key, key = jax.random.split(jax.random.fold_in(step_key, u))
            return agent_lib.update(inner, sample(view, sample_key), extractor, config, key=key)

        return jax.lax.scan(one, carry, jnp.arange(settings.utd_ratio))

    metric_shapes = jax.eval_shape(lambda c: updates(c, first_step, start_size + 1)[1], state)

    def slot(carry, j):
        step = first_step + j
        active = (j < count) & (step >= settings.start_training)

        def skip(c):
            return c, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)

        new, metrics = jax.lax.cond(active, lambda c: updates(c, step, start_size + j + 1), skip, carry)
        return new, (jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), active)

    state, (metrics, active) = jax.lax.scan(slot, state, jnp.arange(horizon))
    return state, buffer, metrics, active


_block_call = eqx.filter_jit(_block_impl, donate="all-except-first")


def is_online_checkpoint(extra: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's metadata `extra` marks it as written by the online phase."""
    return extra.get("phase") == PHASE_ONLINE


def online_checkpoint_template(
    state: AgentState, extra: Mapping[str, Any], obs_dim: int, action_dim: int, horizon: int
) -> dict[str, Any]:
    """The `like` tree of an online checkpoint whose metadata `extra` says how many rows it holds."""
    rows = zero_rows(int(extra["online_rows"]), obs_dim, action_dim)
    return {"agent": state, "rows": rows, "queue": np.zeros((horizon, action_dim), np.float32)}


def _write_host_rows(buffer: SequenceDataset, rows: Mapping[str, np.ndarray], at: int) -> SequenceDataset:
    """Put host rows at [at, at + n) and set size = at + n (restoring a checkpoint)."""
    n = rows["observations"].shape[0]
    arrays = {}
    for name in _FIELDS:
        arrays[name] = jax.lax.dynamic_update_slice_in_dim(
            getattr(buffer, name), jnp.asarray(rows[name], jnp.float32), at, axis=0) if n else getattr(buffer, name)
    return SequenceDataset(**arrays, size=jnp.asarray(at + n, jnp.int32))


def latest_phase_checkpoint(
    directory: os.PathLike[str] | str, template: Callable[[Mapping[str, Any]], Any]
) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest loadable checkpoint, loaded into `template(extra)` (offline and online checkpoints
    of one run have different trees); `flowrl.checkpoint.latest_checkpoint_for`."""
    from flowrl.checkpoint import latest_checkpoint_for

    return latest_checkpoint_for(directory, template)
