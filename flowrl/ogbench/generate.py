"""Generate OGBench manipulation "play" datasets locally from ogbench's scripted oracles.

Our own driver, written from the prose recipe in OGBENCH-DATA.md §1 and §6 (not a copy of OGBench's
`data_gen_scripts/generate_manipspace.py`). Per episode:

1. Seed NumPy's global RNG (the oracles draw from it) and the env's `np_random` (via `reset(seed=...)`)
   from `SeedSequence((seed, episode_index, attempt))`. Every episode is therefore a pure function of
   (seed, episode index): the output is byte-identical for any worker count.
2. `env = gymnasium.make('<domain>-v0', terminate_at_goal=False, mode='data_collection',
   max_episode_steps=T)`; reset randomises the scene and sets a first sub-task target.
3. Draw the per-episode stacking probability p_stack (cube-double U(0, .25), cube-triple U(.05, .35),
   cube-quadruple U(.1, .5), otherwise 0) and run the "play" PlanOracle matching
   `info['privileged/target_task']` (cube / button / drawer / window; puzzle: button oracle with the
   gripper always closed). Each step: action = clip(oracle action, −1, 1), step, record the pre-step
   observation s_t, a_t, the done flag, `prev_qpos`, `prev_qvel` (and `prev_button_states`); when the
   oracle's plan is exhausted, `set_new_target(p_stack)` and switch oracle.
4. Scene health check: an episode in which the cube leaves the visible area other than into the drawer
   (y ≥ 0.29, or y ≤ −0.3 with height outside [0.06, 0.08]) is discarded and re-collected with the next
   `attempt` seed.

Episodes 0 … N−1 form the train file `<domain>-v0.npz`, episodes N … N+max(1, N//10)−1 the val file
`<domain>-v0-val.npz` (OGBENCH-DATA.md §2 keys and dtypes; `terminals` True only on each episode's last
row). Each episode stores exactly T = `max_episode_steps` rows (T − 1 transitions after loading).

Memory stays bounded: worker processes (multiprocessing spawn) return one episode's float32 block at a
time; the parent writes it into per-key `.npy` memory maps in a hidden temporary directory next to the
output, then streams each map into a deflate-compressed `.npz` (the `np.savez_compressed` format, with
fixed zip timestamps so equal arrays give byte-equal files), fsyncs, and `os.replace`s both files into
place. A crash or Ctrl-C never leaves a partial file under a final name (a `kill -9` may leave the hidden
`.<dataset>.*.tmp` directory, which is safe to delete).

Only the standard 1M-style file is generated; OGBench's 100M shard sets (`<domain>-100m-v0/`, used by
the QAM paper for cube-quadruple and puzzle-4x4) are 100 such datasets with different seeds
(~65–70 CPU-hours each set, OGBENCH-DATA.md §3); `flowrl.ogbench.datasets` loads them when present.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flowrl import errors
from flowrl.ogbench.domains import DatasetError, DomainSpec, generable_domain_spec

__all__ = ["DatasetExistsError", "GenerationArgumentError", "GenerationResult", "dataset_keys", "generate_dataset"]

# Attempts per episode before giving up on the scene health check (failures are rare, OGBENCH-DATA §1).
_MAX_ATTEMPTS = 100
# Fixed zip member timestamp: identical arrays give identical files.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class DatasetExistsError(DatasetError):
    """Refused to overwrite an existing dataset file (pass overwrite=True / --overwrite)."""


class GenerationArgumentError(errors.ConfigError, ValueError):
    """A bad number given to `generate_dataset` (episodes, workers, max_episode_steps, seed)."""


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate_dataset` produced.

    `transitions` counts simulated env steps, i.e. stored rows over both files (each row is one
    (s_t, a_t) step; loading drops each episode's last row, so loaders see `transitions − episodes`).
    """

    domain: str
    train_path: Path
    val_path: Path
    train_episodes: int
    val_episodes: int
    episode_rows: int
    transitions: int
    wall_seconds: float
    workers: int
    seed: int

    @property
    def transitions_per_second(self) -> float:
        return self.transitions / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    @property
    def paths(self) -> tuple[Path, Path]:
        return self.train_path, self.val_path


def dataset_keys(spec: DomainSpec) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-row shape and dtype of every stored key (OGBENCH-DATA.md §2)."""
    keys: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "observations": ((spec.ob_dim,), np.dtype(np.float32)),
        "actions": ((spec.action_dim,), np.dtype(np.float32)),
        "terminals": ((), np.dtype(np.bool_)),
        "qpos": ((spec.nq,), np.dtype(np.float32)),
        "qvel": ((spec.nv,), np.dtype(np.float32)),
    }
    if spec.n_buttons:
        keys["button_states"] = ((spec.n_buttons,), np.dtype(np.int64))
    return keys


# --------------------------------------------------------------------------------------------------
# Episode collection (runs in worker processes, or in-process when workers == 1).


def _draw_p_stack(spec: DomainSpec) -> float:
    """Per-episode probability that a new cube target is stacked on another cube (OGBENCH-DATA.md §1)."""
    bounds = {
        "cube-double-play": (0.0, 0.25),
        "cube-triple-play": (0.05, 0.35),
        "cube-quadruple-play": (0.1, 0.5),
    }.get(spec.name)
    # Drawn from the global RNG like the oracles' noise, so it is part of the seeded stream.
    return 0.0 if bounds is None else float(np.random.uniform(*bounds))


def _scene_is_healthy(qpos: np.ndarray) -> bool:
    """False if the scene's cube left the visible area other than into the drawer (OGBENCH-DATA.md §1)."""
    cube_y, cube_z = qpos[:, 15], qpos[:, 16]  # qpos[14:17] is the cube's xyz (free joint after 14 arm dofs)
    off_table = (cube_y >= 0.29) | ((cube_y <= -0.3) & ((cube_z < 0.06) | (cube_z > 0.08)))
    return not bool(np.any(off_table))


class _EpisodeRunner:
    """One data-collection env plus its oracle set; `run(seed, index)` returns one episode block."""

    def __init__(self, domain: str, max_episode_steps: int) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")  # never render, but keep mujoco's GL probe quiet
        warnings.filterwarnings("ignore", message=".*precision lowered.*")
        import gymnasium

        import ogbench  # noqa: F401  (registers the env ids)
        from ogbench.manipspace.oracles.plan.button_plan import ButtonPlanOracle
        from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle
        from ogbench.manipspace.oracles.plan.drawer_plan import DrawerPlanOracle
        from ogbench.manipspace.oracles.plan.window_plan import WindowPlanOracle

        self.spec = generable_domain_spec(domain)
        self.max_episode_steps = max_episode_steps
        self.keys = dataset_keys(self.spec)
        self.env = gymnasium.make(
            self.spec.generation_env_id,
            terminate_at_goal=False,
            mode="data_collection",
            max_episode_steps=max_episode_steps,
            disable_env_checker=True,
        )
        env = self.env
        if self.spec.name.startswith("puzzle"):
            self.oracles: dict[str, Any] = {"button": ButtonPlanOracle(env=env, gripper_always_closed=True)}
        elif self.spec.name.startswith("scene"):
            self.oracles = {
                "cube": CubePlanOracle(env=env),
                "button": ButtonPlanOracle(env=env),
                "drawer": DrawerPlanOracle(env=env),
                "window": WindowPlanOracle(env=env),
            }
        else:
            self.oracles = {"cube": CubePlanOracle(env=env)}

    def run(self, seed: int, index: int) -> dict[str, np.ndarray]:
        for attempt in range(_MAX_ATTEMPTS):
            block = self._collect(np.random.SeedSequence([seed, index, attempt]))
            if not self.spec.name.startswith("scene") or _scene_is_healthy(block["qpos"]):
                return block
        raise RuntimeError(f"episode {index} failed the scene health check {_MAX_ATTEMPTS} times (seed {seed})")

    def _collect(self, seed_sequence: np.random.SeedSequence) -> dict[str, np.ndarray]:
        words = seed_sequence.generate_state(5)
        np.random.seed(words[:4])
        ob, info = self.env.reset(seed=int(words[4]))
        p_stack = _draw_p_stack(self.spec)
        oracle = self.oracles[info["privileged/target_task"]]
        oracle.reset(ob, info)

        rows = self.max_episode_steps
        block = {key: np.zeros((rows, *shape), dtype) for key, (shape, dtype) in self.keys.items()}
        for t in range(rows):
            action = np.clip(oracle.select_action(ob, info), -1.0, 1.0)
            next_ob, _, terminated, truncated, info = self.env.step(action)
            block["observations"][t] = ob  # pre-step s_t
            block["actions"][t] = action
            block["terminals"][t] = terminated or truncated
            block["qpos"][t] = info["prev_qpos"]
            block["qvel"][t] = info["prev_qvel"]
            if "button_states" in block:
                block["button_states"][t] = info["prev_button_states"]
            if oracle.done:
                target_ob, target_info = self.env.unwrapped.set_new_target(p_stack=p_stack)
                oracle = self.oracles[target_info["privileged/target_task"]]
                oracle.reset(target_ob, target_info)
            ob = next_ob
            if terminated or truncated:
                break
        if t != rows - 1 or not block["terminals"][-1]:
            raise RuntimeError(f"episode ended after {t + 1} steps, expected exactly {rows} (time-limit truncation)")
        return block


_WORKER_RUNNER: _EpisodeRunner | None = None


def _init_worker(domain: str, max_episode_steps: int) -> None:
    global _WORKER_RUNNER
    _WORKER_RUNNER = _EpisodeRunner(domain, max_episode_steps)


def _run_in_worker(job: tuple[int, int]) -> tuple[int, dict[str, np.ndarray]]:
    seed, index = job
    assert _WORKER_RUNNER is not None
    return index, _WORKER_RUNNER.run(seed, index)


def _episodes(domain: str, seed: int, total: int, workers: int, max_episode_steps: int) -> Iterator[
    tuple[int, dict[str, np.ndarray]]
]:
    """Yield (episode index, block) for episodes 0 … total−1, in completion order."""
    if workers == 1:
        # In-process: no spawn start-up; the caller's global NumPy RNG state is restored afterwards.
        saved_state = np.random.get_state()
        try:
            runner = _EpisodeRunner(domain, max_episode_steps)
            for index in range(total):
                yield index, runner.run(seed, index)
        finally:
            np.random.set_state(saved_state)
        return
    context = multiprocessing.get_context("spawn")  # fork + MuJoCo/JAX threads is unsafe
    with context.Pool(workers, initializer=_init_worker, initargs=(domain, max_episode_steps)) as pool:
        yield from pool.imap_unordered(_run_in_worker, ((seed, index) for index in range(total)), chunksize=1)


# --------------------------------------------------------------------------------------------------
# Writing.


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as a deflate-compressed .npz (np.savez_compressed layout), streamed, then fsync."""
    with open(path, "wb") as handle:
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for key, array in arrays.items():
                member = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                member.compress_type = zipfile.ZIP_DEFLATED
                member.external_attr = 0o644 << 16
                with archive.open(member, mode="w", force_zip64=True) as stream:
                    # write_array streams memory-mapped arrays in 16 MiB chunks.
                    np.lib.format.write_array(stream, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refuse_existing(paths: tuple[Path, ...]) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise DatasetExistsError(
            f"dataset file already exists: {', '.join(existing)}; pass overwrite=True (CLI: --overwrite) to replace it"
        )


def generate_dataset(
    domain: str,
    *,
    episodes: int | None,
    workers: int,
    directory: str | Path,
    seed: int = 0,
    max_episode_steps: int = 1001,
    overwrite: bool = False,
    progress: bool = True,
) -> GenerationResult:
    """Generate `<domain>-v0.npz` and `<domain>-v0-val.npz` in `directory` (see the module docstring).

    Args:
        domain: a manipulation domain, e.g. `cube-double-play` (also `cube-double`, `cube-double-v0`).
        episodes: train episodes N (None: the official count, 1000 / 3000 / 5000); the val file gets
            max(1, N // 10) more.
        workers: worker processes (1: run in this process). The output does not depend on it.
            Workers are spawned, so scripts must call this under `if __name__ == "__main__":`.
        directory: output directory (created if missing; `~` expanded).
        seed: non-negative integer; episode i is a pure function of (seed, i).
        max_episode_steps: rows per episode (official: 1001, i.e. 1000 transitions).
        overwrite: replace existing files; otherwise an existing file raises `DatasetExistsError`.
        progress: show a tqdm bar over episodes.

    Raises:
        UnknownEnvError / NotGenerableError: bad domain (one line listing the valid ones / saying why).
        DatasetExistsError: a target file exists and `overwrite` is False.
        GenerationArgumentError: non-positive episodes/workers, max_episode_steps < 2, negative seed.
    """
    spec = generable_domain_spec(domain)
    train_episodes = spec.train_episodes if episodes is None else int(episodes)
    if train_episodes < 1:
        raise GenerationArgumentError(f"episodes must be >= 1, got {train_episodes}")
    if workers < 1:
        raise GenerationArgumentError(f"workers must be >= 1, got {workers}")
    if max_episode_steps < 2:
        raise GenerationArgumentError(f"max_episode_steps must be >= 2 (one transition per episode), got {max_episode_steps}")
    if seed < 0:
        raise GenerationArgumentError(f"seed must be a non-negative integer, got {seed}")
    val_episodes = max(1, train_episodes // 10)
    total_episodes = train_episodes + val_episodes
    workers = min(workers, total_episodes)

    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    train_path, val_path = directory / spec.train_file, directory / spec.val_file
    if not overwrite:
        _refuse_existing((train_path, val_path))

    start = time.perf_counter()
    keys = dataset_keys(spec)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.dataset_name}.", suffix=".tmp", dir=directory))
    try:
        splits = {"train": train_episodes, "val": val_episodes}
        maps = {
            split: {
                key: np.lib.format.open_memmap(
                    scratch / f"{split}-{key}.npy", mode="w+", dtype=dtype, shape=(count * max_episode_steps, *shape)
                )
                for key, (shape, dtype) in keys.items()
            }
            for split, count in splits.items()
        }
        from tqdm.auto import tqdm

        with tqdm(total=total_episodes, unit="episode", desc=spec.dataset_name, disable=not progress) as bar:
            for index, block in _episodes(spec.name, seed, total_episodes, workers, max_episode_steps):
                split, slot = ("train", index) if index < train_episodes else ("val", index - train_episodes)
                rows = slice(slot * max_episode_steps, (slot + 1) * max_episode_steps)
                for key, array in block.items():
                    maps[split][key][rows] = array
                bar.update(1)

        staged = {"train": scratch / "train.npz", "val": scratch / "val.npz"}
        for split, path in staged.items():
            for array in maps[split].values():
                array.flush()
            _write_npz(path, maps[split])
        del maps  # close the memory maps before the directory is removed
        if not overwrite:
            _refuse_existing((train_path, val_path))  # someone else may have written meanwhile
        # Val first: a train file without its val file would make ogbench reach for the network.
        os.replace(staged["val"], val_path)
        os.replace(staged["train"], train_path)
        _fsync_directory(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wall = time.perf_counter() - start
    return GenerationResult(
        domain=spec.name,
        train_path=train_path,
        val_path=val_path,
        train_episodes=train_episodes,
        val_episodes=val_episodes,
        episode_rows=max_episode_steps,
        transitions=total_episodes * max_episode_steps,
        wall_seconds=wall,
        workers=workers,
        seed=seed,
    )
