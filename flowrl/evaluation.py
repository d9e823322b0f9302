"""Environment evaluation of action-chunking policies on OGBench single-task envs (METHODS.md §1.4).

Protocol (as the reference `evaluation.py`, METHODS.md §1.3–§1.4):

- each episode starts from `env.reset(seed=...)`; an action queue is kept per episode: when it is
  empty the policy is asked once for a chunk a ∈ R^{H·A}, which is reshaped time-major into H
  actions a_0 … a_{H-1}; these are executed open-loop, each clipped to [−1, 1]; the queue is
  cleared when the episode ends (termination on success or the time limit);
- an episode counts as a success iff `info['success']` of its **last** step is true; the success
  rate is the mean over episodes (`eval/success` in the reference logs).

Deliberate deviations, none of which changes the distribution of an episode:

- The reference queries the policy at every env step and throws the answer away unless the queue
  is empty (METHODS.md §9 item 12). Here the policy is called only when a queue is empty; this
  saves H−1 of every H policy calls and changes nothing but RNG consumption.
- The reference draws the policy's RNG from NumPy's global stream and runs episodes one after
  another. Here randomness is addressed, not streamed: the key for chunk c of episode e is
  `fold_in(fold_in(jax.random.key(seed), e), c)` (`chunk_keys`) and episode e resets with
  `episode_reset_seed(seed, e)`. An episode's outcome is therefore a function of (seed, e), the
  policy and (through floating point only) the policy's batch shape — never of how many worker
  processes step the envs or which episodes share a batch.
- Episodes run side by side in `num_envs` env slots that advance in lock-step waves of H steps: at
  the start of a wave, every running episode whose chunk is used up (all of them, since chunks
  start together) gets its next chunk from ONE batched policy call; an episode that ends inside a
  wave leaves its slot idle until the next wave, where the next pending episode is reset into it.
  Waiting a few steps in an idle slot does not touch any episode's dynamics.

Batching and bitwise reproducibility. The policy is always called on exactly `policy_batch_size`
rows (active observations, padded with copies of the first row and throw-away keys), so a jitted
policy compiles once. XLA's results for a row can change with the batch shape, but (measured on
XLA:CPU for MLPs) not with the row's position or with the other rows' contents; with a fixed batch
shape a row-independent policy (a `vmap` over per-example sampling) therefore gives bit-identical
chunks whatever `num_envs` and scheduling. Results are bit-identical for any `workers` by
construction: the worker count only decides which process steps which env slot, never the
schedule or the batches.

Worker processes. With `workers = k > 1` the `num_envs` slots are split into k contiguous blocks;
this process steps block 0 and k−1 spawned processes (multiprocessing "spawn") step the others.
Because chunks run open-loop, a whole wave (all H actions of every slot) is handed over at once and
each process steps its slots through it alone: one round trip per wave, not per env step. Actions,
observations and step results live in shared memory; the pipes carry only short command bytes.
Workers are shut down by `Evaluator.close()` (context manager), also when the policy or an env
raises; they are daemonic and ignore SIGINT so an interrupted parent still cleans them up.
As always with "spawn", a script that uses `workers > 1` needs an `if __name__ == "__main__":` guard.

Limitation: env code that draws from NumPy's *global* RNG while stepping (OGBench's teleport mazes)
is not covered by the per-episode seeds; none of the QAM-paper tasks (METHODS.md §8.1) does so.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import multiprocessing as mp
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeAlias

import jax
import numpy as np

from flowrl.errors import FlowRLError
from flowrl.ogbench.domains import UnknownEnvError

__all__ = [
    "ChunkPolicy",
    "DimensionMismatchError",
    "EnvWorkerError",
    "EvalResult",
    "EvaluationError",
    "Evaluator",
    "PolicyOutputError",
    "UnknownEnvError",
    "chunk_keys",
    "episode_reset_seed",
    "evaluate",
    "make_env",
]

ChunkPolicy: TypeAlias = Callable[[np.ndarray, jax.Array], Any]
"""`policy(observations, keys) -> chunks`.

- `observations`: float32 array (B, obs_dim), B = `policy_batch_size` (padding rows included);
- `keys`: typed PRNG key array (B,); row i must be sampled with `keys[i]` only;
- returns: an array-like (B, H·A), each row a time-major action chunk (a_0 … a_{H-1}).

Row i of the result must depend only on (observations[i], keys[i]) — e.g. a jitted `vmap` of a
per-example sampler. Nothing else is assumed (no state, no batch statistics).
"""

DEFAULT_NUM_ENVS = 16  # ~220 MB of MuJoCo buffers per cube env: 16 envs ≈ 3.5 GB
DEFAULT_POLICY_BATCH_SIZE = 16
_PAD_EPISODE_ID = 2**31 - 1  # episode id of the keys given to padding rows; no real episode has it
_POLL_SECONDS = 0.5


class EvaluationError(FlowRLError, ValueError):
    """Bad evaluation input; the message is one line naming the problem and the fix."""


class DimensionMismatchError(EvaluationError):
    """The policy's observation/action dimensions do not match the env's."""


class PolicyOutputError(EvaluationError):
    """The policy returned a chunk of the wrong shape or with non-finite values."""


class EnvWorkerError(FlowRLError, RuntimeError):
    """An env raised in a worker process, or a worker died; the message names the worker's error."""

    def __init__(self, message: str, *, worker_alive: bool = False):
        super().__init__(message)
        self.worker_alive = worker_alive  # True: the worker replied with an error and is still usable


# --------------------------------------------------------------------------------------------------
# Envs, seeds, keys


def _singletask_env_id(env_name: str) -> str:
    """The gymnasium id OGBench builds for a single-task name (dataset type removed), validated.

    `cube-double-play-singletask-task2-v0` → `cube-double-singletask-task2-v0` (the same rule as
    `ogbench.make_env_and_datasets`; OGBENCH-DATA.md §2).
    """
    import gymnasium
    import ogbench  # noqa: F401  (registers the env ids)

    form = "expected '<domain>-<dataset type>-singletask[-taskN]-v0', e.g. 'cube-double-play-singletask-task2-v0'"
    parts = env_name.split("-")
    if "singletask" not in parts or parts.index("singletask") < 2:
        raise UnknownEnvError(f"env name {env_name!r} is not an OGBench single-task name; {form}")
    position = parts.index("singletask")
    env_id = "-".join(parts[: position - 1] + parts[position:])
    if env_id not in gymnasium.registry:
        known = sorted(name for name in gymnasium.registry if "-singletask" in name and not name.startswith("visual"))
        close = difflib.get_close_matches(env_id, known, n=3, cutoff=0.6)
        hint = f"; registered env ids close to it: {', '.join(close)}" if close else ""
        raise UnknownEnvError(
            f"unknown OGBench env {env_name!r}: ogbench registers no env id {env_id!r}; {form}{hint}"
        )
    return env_id


def make_env(env_name: str, *, max_episode_steps: int | None = None) -> Any:
    """Build the OGBench evaluation env for a single-task name, without touching any dataset.

    Uses `ogbench.make_env_and_datasets(env_name, env_only=True)`, i.e. the registered single-task
    env (success timing 'pre', terminates on success; OGBENCH-DATA.md §2) inside gymnasium's
    TimeLimit. `max_episode_steps` overrides the registered time limit (e.g. 500 for cube-double).

    Raises:
        UnknownEnvError: the name is not an OGBench single-task name or its env id is not registered.
    """
    import ogbench

    _singletask_env_id(env_name)
    if max_episode_steps is not None and max_episode_steps < 1:
        raise EvaluationError(f"max_episode_steps must be ≥ 1 or None, got {max_episode_steps}")
    kwargs = {} if max_episode_steps is None else {"max_episode_steps": int(max_episode_steps)}
    with warnings.catch_warnings():
        # gymnasium warns on every env creation that the Box bounds were cast to float32 (harmless).
        warnings.filterwarnings("ignore", message=".*precision lowered.*")
        return ogbench.make_env_and_datasets(env_name, env_only=True, **kwargs)


def episode_reset_seed(seed: int, episode_index: int) -> int:
    """The `env.reset(seed=...)` of episode `episode_index`: `SeedSequence(seed, spawn_key=(episode_index,))`."""
    state = np.random.SeedSequence(seed, spawn_key=(episode_index,)).generate_state(1, np.uint32)
    return int(state[0])


@jax.jit
def _fold_keys(seed: jax.Array, episode_ids: jax.Array, chunk_ids: jax.Array) -> jax.Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda e, c: jax.random.fold_in(jax.random.fold_in(base, e), c))(episode_ids, chunk_ids)


def chunk_keys(seed: int, episode_ids: np.ndarray, chunk_ids: np.ndarray) -> jax.Array:
    """Typed keys `fold_in(fold_in(jax.random.key(seed), episode), chunk)`, one per (episode, chunk) pair.

    The key of the c-th chunk (0-based) of episode e; public so one decision can be reproduced.
    """
    return _fold_keys(
        np.uint32(seed), np.asarray(episode_ids, dtype=np.int32), np.asarray(chunk_ids, dtype=np.int32)
    )


# --------------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation; per-episode arrays are indexed by episode index.

    Attributes:
        env_name, seed, horizon: what was evaluated (horizon = action-chunk length H).
        success_rate: mean of `episode_success` (METHODS.md §1.4, `eval/success`).
        episode_success: (E,) bool, `info['success']` of each episode's last step.
        episode_lengths: (E,) int64, env steps per episode.
        episode_returns: (E,) float64, undiscounted sum of env rewards.
        episode_seeds: (E,) int64, the `reset(seed=...)` of each episode (`episode_reset_seed`).
        episode_chunks: (E,) int64, policy decisions per episode (= ceil(length / H)).
        final_observations: (E, obs_dim) float64, the observation after each episode's last step.
        episode_actions: the executed (clipped) actions, one (length, A) float32 array per episode,
            or None unless `record_actions=True`.
        env_steps: total env steps. policy_calls: batched policy calls. policy_seconds: time in them.
        wall_seconds: whole evaluation (resets, stepping, policy), excluding env/worker start-up.
        env_steps_per_second, episodes_per_second: throughput over `wall_seconds`.
        num_envs, workers, policy_batch_size: how it was run (results do not depend on `workers`).
    """

    env_name: str
    seed: int
    horizon: int
    success_rate: float
    episode_success: np.ndarray
    episode_lengths: np.ndarray
    episode_returns: np.ndarray
    episode_seeds: np.ndarray
    episode_chunks: np.ndarray
    final_observations: np.ndarray
    episode_actions: tuple[np.ndarray, ...] | None
    env_steps: int
    policy_calls: int
    policy_seconds: float
    wall_seconds: float
    env_steps_per_second: float
    episodes_per_second: float
    num_envs: int
    workers: int
    policy_batch_size: int

    @property
    def episodes(self) -> int:
        return int(self.episode_success.shape[0])

    def metrics(self) -> dict[str, float]:
        """Scalar summary for logging (keys without prefix; the reference logs `eval/success`)."""
        return {
            "success": float(self.success_rate),
            "episode_length": float(np.mean(self.episode_lengths)),
            "episode_return": float(np.mean(self.episode_returns)),
            "env_steps": float(self.env_steps),
            "wall_seconds": float(self.wall_seconds),
            "env_steps_per_second": float(self.env_steps_per_second),
            "policy_seconds": float(self.policy_seconds),
        }


# --------------------------------------------------------------------------------------------------
# Env slots: one block per process, all sharing the same slot buffers


# name → (NumPy dtype, multiprocessing typecode, per-slot shape key)
_BUFFER_LAYOUT: dict[str, tuple[type, str, str]] = {
    "actions": (np.float32, "f", "segment"),  # the open-loop actions of the current segment
    "segment_steps": (np.int64, "q", "scalar"),  # actions to execute (0: leave the slot alone)
    "reset_seeds": (np.int64, "q", "scalar"),  # > 0 entries of `reset_mask` reset with these
    "reset_mask": (np.uint8, "B", "scalar"),
    "observations": (np.float64, "d", "obs"),  # latest observation of each slot
    "steps_done": (np.int64, "q", "scalar"),  # steps executed in the segment
    "reward_sums": (np.float64, "d", "scalar"),  # sum of the segment's rewards
    "done": (np.uint8, "B", "scalar"),  # the episode ended (terminated or truncated) in the segment
    "success": (np.float64, "d", "scalar"),  # info['success'] of the slot's latest step
}
_SEGMENT_CAPACITY = 64  # actions per slot per round trip; longer chunks run as several segments


@dataclasses.dataclass(frozen=True)
class _PoolShape:
    num_envs: int
    obs_dim: int
    action_dim: int
    segment_capacity: int

    def of(self, kind: str) -> tuple[int, ...]:
        return {
            "segment": (self.num_envs, self.segment_capacity, self.action_dim),
            "obs": (self.num_envs, self.obs_dim),
            "scalar": (self.num_envs,),
        }[kind]


@dataclasses.dataclass
class _SlotBuffers:
    """Per-slot arrays every process reads/writes in place (shared memory when workers > 1)."""

    actions: np.ndarray
    segment_steps: np.ndarray
    reset_seeds: np.ndarray
    reset_mask: np.ndarray
    observations: np.ndarray
    steps_done: np.ndarray
    reward_sums: np.ndarray
    done: np.ndarray
    success: np.ndarray

    @classmethod
    def local(cls, shape: _PoolShape) -> _SlotBuffers:
        return cls(**{name: np.zeros(shape.of(kind), dtype) for name, (dtype, _, kind) in _BUFFER_LAYOUT.items()})

    @staticmethod
    def allocate_shared(context: Any, shape: _PoolShape) -> dict[str, Any]:
        return {
            name: context.RawArray(code, math.prod(shape.of(kind)))
            for name, (_, code, kind) in _BUFFER_LAYOUT.items()
        }

    @classmethod
    def from_shared(cls, raw: dict[str, Any], shape: _PoolShape) -> _SlotBuffers:
        return cls(**{
            name: np.frombuffer(raw[name], dtype=dtype).reshape(shape.of(kind))
            for name, (dtype, _, kind) in _BUFFER_LAYOUT.items()
        })


class _EnvBlock:
    """The envs of the slots [start, stop), driven through the shared `_SlotBuffers`."""

    def __init__(
        self, env_name: str, max_episode_steps: int | None, start: int, stop: int, buffers: _SlotBuffers,
        first_env: Any | None = None,
    ):
        self.start, self.stop, self.buffers = start, stop, buffers
        self.envs: list[Any] = [] if first_env is None else [first_env]
        while len(self.envs) < stop - start:
            self.envs.append(make_env(env_name, max_episode_steps=max_episode_steps))

    def reset(self) -> None:
        """Reset the slots in `reset_mask` with their `reset_seeds`."""
        b = self.buffers
        for slot in range(self.start, self.stop):
            if b.reset_mask[slot]:
                observation, _ = self.envs[slot - self.start].reset(seed=int(b.reset_seeds[slot]))
                b.observations[slot] = observation

    def run(self) -> None:
        """Execute up to `segment_steps[slot]` queued actions per slot, open-loop; stop a slot when its
        episode ends (terminated or truncated), so the rest of its queue is dropped."""
        b = self.buffers
        for slot in range(self.start, self.stop):
            env = self.envs[slot - self.start]
            b.steps_done[slot], b.reward_sums[slot], b.done[slot] = 0, 0.0, 0
            for step in range(int(b.segment_steps[slot])):
                observation, reward, terminated, truncated, info = env.step(b.actions[slot, step].copy())
                if "success" not in info:
                    raise KeyError("the env's step info has no 'success' key (METHODS.md §1.4 needs it)")
                b.observations[slot] = observation
                b.steps_done[slot] += 1
                b.reward_sums[slot] += reward
                b.success[slot] = float(info["success"])
                if terminated or truncated:
                    b.done[slot] = 1
                    break

    def close(self) -> None:
        for env in self.envs:
            env.close()
        self.envs = []


def _worker_main(
    env_name: str, max_episode_steps: int | None, start: int, stop: int, raw: dict[str, Any], shape: _PoolShape,
    connection: Connection,
) -> None:
    """Worker process loop: build the block's envs, then serve `reset`/`run` commands until `quit`/EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and shuts us down
    block = None
    try:
        block = _EnvBlock(env_name, max_episode_steps, start, stop, _SlotBuffers.from_shared(raw, shape))
        dims = (block.envs[0].observation_space.shape, block.envs[0].action_space.shape)
        if dims != ((shape.obs_dim,), (shape.action_dim,)):
            raise RuntimeError(f"worker env has spaces {dims}, the parent's has {shape}")
        connection.send_bytes(b"ok")
        while True:
            try:
                command = connection.recv_bytes()
            except EOFError:
                break
            if command == b"quit":
                break
            try:
                {b"reset": block.reset, b"run": block.run}[command]()
                connection.send_bytes(b"ok")
            except Exception:
                connection.send_bytes(b"error:" + traceback.format_exc().encode())
    except Exception:
        try:
            connection.send_bytes(b"error:" + traceback.format_exc().encode())
        except OSError:
            pass
    finally:
        if block is not None:
            block.close()
        connection.close()


@dataclasses.dataclass
class _Worker:
    process: Any
    connection: Connection
    start: int
    stop: int


def _error_summary(message: bytes) -> str:
    """Last line of a worker traceback (the exception), for a one-line error."""
    lines = [line for line in message.decode(errors="replace").removeprefix("error:").strip().splitlines() if line]
    return lines[-1] if lines else "unknown error"


class _EnvPool:
    """`num_envs` env slots split over `workers` processes (this one steps block 0)."""

    def __init__(self, env_name: str, *, num_envs: int, workers: int, max_episode_steps: int | None):
        self.env_name = env_name
        self.segment_capacity = _SEGMENT_CAPACITY
        self.num_envs = num_envs
        self.workers: list[_Worker] = []
        self.local: _EnvBlock | None = None
        self.out_of_step = False
        first_env = make_env(env_name, max_episode_steps=max_episode_steps)
        try:
            observation_shape, action_shape = first_env.observation_space.shape, first_env.action_space.shape
            if len(observation_shape) != 1 or len(action_shape) != 1:
                raise EvaluationError(
                    f"env {env_name!r} has observation shape {observation_shape} and action shape {action_shape}; "
                    "flowrl evaluates state-based envs with flat observations and actions (not visual-*)"
                )
            self.obs_dim, self.action_dim = int(observation_shape[0]), int(action_shape[0])
            self.max_episode_steps = first_env.spec.max_episode_steps
            shape = _PoolShape(num_envs, self.obs_dim, self.action_dim, self.segment_capacity)
            blocks = np.array_split(np.arange(num_envs), workers)
            if workers == 1:
                self.buffers = _SlotBuffers.local(shape)
            else:
                context = mp.get_context("spawn")
                raw = _SlotBuffers.allocate_shared(context, shape)
                self.buffers = _SlotBuffers.from_shared(raw, shape)
                for block in blocks[1:]:
                    parent_end, child_end = context.Pipe(duplex=True)
                    start, stop = int(block[0]), int(block[-1]) + 1
                    process = context.Process(
                        target=_worker_main,
                        args=(env_name, max_episode_steps, start, stop, raw, shape, child_end),
                        daemon=True,
                        name=f"flowrl-eval-{start}-{stop}",
                    )
                    process.start()
                    child_end.close()  # so a dead worker shows up as EOF here
                    self.workers.append(_Worker(process, parent_end, start, stop))
            self.local = _EnvBlock(env_name, max_episode_steps, 0, int(blocks[0][-1]) + 1, self.buffers,
                                   first_env=first_env)
            for worker in self.workers:
                self._receive(worker, "start-up")
        except BaseException:
            if self.local is None:
                first_env.close()
            self.close()
            raise

    def _receive(self, worker: _Worker, what: str) -> None:
        while not worker.connection.poll(_POLL_SECONDS):
            if not worker.process.is_alive():
                raise EnvWorkerError(
                    f"env worker for slots {worker.start}-{worker.stop - 1} of {self.env_name!r} died during "
                    f"{what} (exit code {worker.process.exitcode}); check memory (~220 MB per env) or run workers=1"
                )
        try:
            message = worker.connection.recv_bytes()
        except EOFError:
            raise EnvWorkerError(
                f"env worker for slots {worker.start}-{worker.stop - 1} of {self.env_name!r} closed its pipe "
                f"during {what}; rerun with workers=1 to see the env's own error"
            ) from None
        if message != b"ok":
            raise EnvWorkerError(
                f"env worker for slots {worker.start}-{worker.stop - 1} of {self.env_name!r} failed during "
                f"{what}: {_error_summary(message)}",
                worker_alive=what != "start-up",
            )

    def _run(self, command: bytes, slots: np.ndarray) -> None:
        """Run `command` on every block that holds one of `slots`, in parallel; re-raise the first failure.

        Every sent command gets exactly one reply; if that cannot be guaranteed (a worker died, or an
        interrupt arrived while replies were pending) the pool is marked out of step and refuses use.
        """
        if self.out_of_step:
            raise EvaluationError(
                f"the env pool of {self.env_name!r} was interrupted mid-command or lost a worker; close this "
                "Evaluator and create a new one"
            )
        busy = [w for w in self.workers if ((slots >= w.start) & (slots < w.stop)).any()]
        self.out_of_step = bool(busy)
        for worker in busy:
            try:
                worker.connection.send_bytes(command)
            except OSError:
                raise EnvWorkerError(
                    f"env worker for slots {worker.start}-{worker.stop - 1} of {self.env_name!r} is gone (exit code "
                    f"{worker.process.exitcode}); check memory (~220 MB per env) or run workers=1"
                ) from None
        failure: BaseException | None = None
        try:
            assert self.local is not None
            {b"reset": self.local.reset, b"run": self.local.run}[command]()
        except Exception as error:  # still collect the workers' replies to keep the pipes in step
            failure = error
        in_step = True
        for worker in busy:
            try:
                self._receive(worker, command.decode())
            except EnvWorkerError as error:
                failure = failure or error
                in_step = in_step and error.worker_alive
        self.out_of_step = not in_step
        if failure is not None:
            raise failure

    def reset(self, slots: np.ndarray, seeds: np.ndarray) -> None:
        """`env.reset(seed=seeds[i])` in each of `slots`; the observations land in `buffers.observations`."""
        self.buffers.reset_mask[:] = 0
        self.buffers.reset_mask[slots] = 1
        self.buffers.reset_seeds[slots] = seeds
        self._run(b"reset", slots)

    def run(self, slots: np.ndarray, actions: np.ndarray) -> None:
        """Execute `actions[i]` (k ≤ segment capacity steps, open-loop) in `slots[i]`, each slot stopping
        when its episode ends; per-slot results land in `buffers` (steps_done, reward_sums, done, ...)."""
        steps = actions.shape[1]
        self.buffers.segment_steps[:] = 0
        self.buffers.segment_steps[slots] = steps
        self.buffers.actions[slots, :steps] = actions
        self._run(b"run", slots)

    def close(self) -> None:
        """Stop the workers (politely, then by force) and close all envs; safe to call twice."""
        for worker in self.workers:
            try:
                worker.connection.send_bytes(b"quit")
            except (OSError, ValueError):
                pass
        for worker in self.workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()
        self.workers = []
        if self.local is not None:
            self.local.close()
            self.local = None


# --------------------------------------------------------------------------------------------------
# Evaluator


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Evaluator:
    """A pool of OGBench envs (and worker processes) that evaluates chunk policies, reusable across calls.

    Building envs is the slow part (~0.4 s and ~220 MB each for cube-double), so a trainer keeps one
    `Evaluator` for the whole run. Use as a context manager, or call `close()`.

    Args:
        env_name: OGBench single-task name, e.g. `cube-double-play-singletask-task2-v0`.
        num_envs: env slots run side by side (episodes beyond it wait for a free slot).
        workers: processes that step envs, this one included (clipped to `num_envs`).
        max_episode_steps: time limit; None keeps OGBench's registered one (cube-double: 500).
    """

    def __init__(
        self, env_name: str, *, num_envs: int = DEFAULT_NUM_ENVS, workers: int = 1,
        max_episode_steps: int | None = None,
    ):
        num_envs = _positive_int("num_envs", num_envs)
        workers = min(_positive_int("workers", workers), num_envs)
        if max_episode_steps is not None:
            max_episode_steps = _positive_int("max_episode_steps", max_episode_steps)
        self.env_name = env_name
        self.num_envs = num_envs
        self.workers = workers
        self._pool: _EnvPool | None = None  # set first, so __del__ works if the pool fails to start
        self._pool = _EnvPool(
            env_name, num_envs=num_envs, workers=workers, max_episode_steps=max_episode_steps
        )

    @property
    def obs_dim(self) -> int:
        return self._live_pool().obs_dim

    @property
    def action_dim(self) -> int:
        return self._live_pool().action_dim

    @property
    def max_episode_steps(self) -> int | None:
        return self._live_pool().max_episode_steps

    def _live_pool(self) -> _EnvPool:
        if self._pool is None:
            raise EvaluationError(f"this Evaluator for {self.env_name!r} is closed; create a new one")
        return self._pool

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self) -> None:  # a safety net only; call close()
        try:
            self.close()
        except Exception:
            pass

    def check_dims(self, *, expected_obs_dim: int | None, expected_action_dim: int | None) -> None:
        """Raise `DimensionMismatchError` (one line, both dims) if the policy's dims differ from the env's."""
        pool = self._live_pool()
        problems = []
        if expected_obs_dim is not None and int(expected_obs_dim) != pool.obs_dim:
            problems.append(f"observation dim {expected_obs_dim} but the env's is {pool.obs_dim}")
        if expected_action_dim is not None and int(expected_action_dim) != pool.action_dim:
            problems.append(f"action dim {expected_action_dim} but the env's is {pool.action_dim}")
        if problems:
            raise DimensionMismatchError(
                f"policy expects {' and '.join(problems)} for env {self.env_name!r}; evaluate the policy on the "
                "env it was trained for (check the env name in the config)"
            )

    def evaluate(
        self,
        policy: ChunkPolicy,
        *,
        episodes: int,
        seed: int,
        horizon: int,
        expected_obs_dim: int | None = None,
        expected_action_dim: int | None = None,
        policy_batch_size: int = DEFAULT_POLICY_BATCH_SIZE,
        record_actions: bool = False,
    ) -> EvalResult:
        """Run `episodes` episodes of `policy` (METHODS.md §1.4) and return their outcomes.

        Args:
            policy: `policy(observations (B, obs_dim) float32, keys (B,)) -> (B, horizon·action_dim)`;
                see `ChunkPolicy`.
            episodes: number of episodes (the reference uses 50).
            seed: evaluation seed in [0, 2^32); fixes every reset and every policy key.
            horizon: action-chunk length H (the policy's chunk is H actions, executed open-loop).
            expected_obs_dim, expected_action_dim: the policy's dims, checked against the env before
                any episode starts.
            policy_batch_size: rows per policy call (padded); fixed so a jitted policy compiles once.
            record_actions: keep the executed actions in `EvalResult.episode_actions`.

        Raises:
            DimensionMismatchError, PolicyOutputError, EvaluationError: bad input (one line each).
            EnvWorkerError: an env raised or a worker died.
        """
        pool = self._live_pool()
        episodes = _positive_int("episodes", episodes)
        horizon = _positive_int("horizon", horizon)
        batch_size = _positive_int("policy_batch_size", policy_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
            raise EvaluationError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        seed = int(seed)
        self.check_dims(expected_obs_dim=expected_obs_dim, expected_action_dim=expected_action_dim)
        action_dim, chunk_dim = pool.action_dim, horizon * pool.action_dim

        lengths = np.zeros(episodes, np.int64)
        returns = np.zeros(episodes, np.float64)
        success = np.zeros(episodes, bool)
        chunks_used = np.zeros(episodes, np.int64)
        final_observations = np.zeros((episodes, pool.obs_dim), np.float64)
        reset_seeds = np.array([episode_reset_seed(seed, e) for e in range(episodes)], np.int64)
        actions_taken: list[list[np.ndarray]] | None = [[] for _ in range(episodes)] if record_actions else None

        slot_episode = np.full(self.num_envs, -1, np.int64)  # -1: the slot is idle
        next_episode = 0
        policy_calls, policy_seconds = 0, 0.0
        started = time.perf_counter()

        while next_episode < episodes or (slot_episode >= 0).any():
            # Wave start: reset pending episodes into idle slots (lowest slot takes the lowest episode).
            idle = np.flatnonzero(slot_episode < 0)[: episodes - next_episode]
            if idle.size:
                new_episodes = np.arange(next_episode, next_episode + idle.size)
                next_episode += idle.size
                slot_episode[idle] = new_episodes
                pool.reset(idle, reset_seeds[new_episodes])

            # One chunk for every running episode, in fixed-size batches.
            running = np.flatnonzero(slot_episode >= 0)
            chunks = np.empty((running.size, horizon, action_dim), np.float32)
            for offset in range(0, running.size, batch_size):
                rows = running[offset: offset + batch_size]
                tick = time.perf_counter()
                chunks[offset: offset + rows.size] = self._policy_chunks(
                    policy, pool.buffers.observations[rows], slot_episode[rows], chunks_used[slot_episode[rows]],
                    seed=seed, batch_size=batch_size, horizon=horizon, chunk_dim=chunk_dim,
                    pad_chunk_id=policy_calls,
                )
                policy_seconds += time.perf_counter() - tick
                policy_calls += 1
            chunks_used[slot_episode[running]] += 1

            # Execute the chunks open-loop, one round trip per segment of ≤ segment_capacity steps (one per
            # wave unless H is larger); an episode that ends leaves its slot idle until the next wave.
            live = np.ones(running.size, bool)
            for first in range(0, horizon, pool.segment_capacity):
                slots = running[live]
                if slots.size == 0:
                    break
                segment = chunks[live, first: first + pool.segment_capacity]
                pool.run(slots, segment)
                ids = slot_episode[slots]
                steps_done = pool.buffers.steps_done[slots].copy()
                lengths[ids] += steps_done
                returns[ids] += pool.buffers.reward_sums[slots]
                if actions_taken is not None:
                    for episode, actions, steps in zip(ids, segment, steps_done, strict=True):
                        actions_taken[episode].append(actions[:steps].copy())
                done = pool.buffers.done[slots].astype(bool)
                for slot, episode in zip(slots[done], ids[done], strict=True):
                    success[episode] = pool.buffers.success[slot] > 0
                    final_observations[episode] = pool.buffers.observations[slot]
                    slot_episode[slot] = -1
                live[np.flatnonzero(live)[done]] = False

        wall = time.perf_counter() - started
        env_steps = int(lengths.sum())
        episode_actions = None
        if actions_taken is not None:
            episode_actions = tuple(np.concatenate(a).astype(np.float32) for a in actions_taken)
        return EvalResult(
            env_name=self.env_name, seed=seed, horizon=horizon,
            success_rate=float(success.mean()), episode_success=success, episode_lengths=lengths,
            episode_returns=returns, episode_seeds=reset_seeds, episode_chunks=chunks_used,
            final_observations=final_observations, episode_actions=episode_actions,
            env_steps=env_steps, policy_calls=policy_calls, policy_seconds=policy_seconds, wall_seconds=wall,
            env_steps_per_second=env_steps / wall, episodes_per_second=episodes / wall,
            num_envs=self.num_envs, workers=self.workers, policy_batch_size=batch_size,
        )

    def _policy_chunks(
        self, policy: ChunkPolicy, observations: np.ndarray, episode_ids: np.ndarray, chunk_ids: np.ndarray, *,
        seed: int, batch_size: int, horizon: int, chunk_dim: int, pad_chunk_id: int,
    ) -> np.ndarray:
        """One padded policy call → clipped chunks (n, H, A) for the n real rows."""
        n = observations.shape[0]
        pad = batch_size - n
        batch_observations = np.concatenate([observations, np.repeat(observations[:1], pad, axis=0)])
        batch_episode_ids = np.concatenate([episode_ids, np.full(pad, _PAD_EPISODE_ID)])
        # Padding keys: distinct, and never the key of a real (episode, chunk).
        batch_chunk_ids = np.concatenate([chunk_ids, pad_chunk_id * batch_size + np.arange(pad)])
        keys = chunk_keys(seed, batch_episode_ids, batch_chunk_ids)
        output = np.asarray(policy(batch_observations.astype(np.float32), keys))
        if output.shape != (batch_size, chunk_dim):
            raise PolicyOutputError(
                f"policy returned shape {output.shape} for {batch_size} observations of env {self.env_name!r}; "
                f"expected ({batch_size}, {chunk_dim}) = (batch, horizon {horizon} × action dim "
                f"{chunk_dim // horizon}); check `horizon` and the policy's action dim"
            )
        real = output[:n]
        if not np.isfinite(real).all():
            bad = sorted({int(e) for e in episode_ids[~np.isfinite(real).all(axis=1)]})
            raise PolicyOutputError(
                f"policy returned non-finite actions for episode(s) {bad[:5]} of env {self.env_name!r}; "
                "the policy or its parameters have diverged"
            )
        # Time-major chunk a_0 … a_{H-1}, each action clipped to the env's [-1, 1] box (METHODS.md §1.4).
        return np.clip(real.reshape(n, horizon, chunk_dim // horizon), -1.0, 1.0).astype(np.float32)


def evaluate(
    policy: ChunkPolicy,
    env_name: str,
    *,
    episodes: int,
    seed: int,
    horizon: int,
    workers: int = 1,
    max_episode_steps: int | None = None,
    num_envs: int | None = None,
    expected_obs_dim: int | None = None,
    expected_action_dim: int | None = None,
    policy_batch_size: int = DEFAULT_POLICY_BATCH_SIZE,
    record_actions: bool = False,
) -> EvalResult:
    """One-shot evaluation: build an `Evaluator`, run `Evaluator.evaluate`, always close it.

    `num_envs` defaults to min(episodes, 16); `expected_obs_dim`/`expected_action_dim` are checked
    against the built env before any episode starts. Other arguments: see `Evaluator` and
    `Evaluator.evaluate`.
    """
    num_envs = min(_positive_int("episodes", episodes), DEFAULT_NUM_ENVS) if num_envs is None else num_envs
    with Evaluator(env_name, num_envs=num_envs, workers=workers, max_episode_steps=max_episode_steps) as evaluator:
        return evaluator.evaluate(
            policy, episodes=episodes, seed=seed, horizon=horizon, expected_obs_dim=expected_obs_dim,
            expected_action_dim=expected_action_dim, policy_batch_size=policy_batch_size,
            record_actions=record_actions,
        )
