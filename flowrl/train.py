"""Training driver: dataset → agent → fused updates → evaluation, logs and checkpoints; then,
with `online_steps > 0`, the online phase (`flowrl.online`, METHODS.md §1.3) on the same step axis.

`train(...)` is flowrl's single `@gin.configurable` root (gin binds it and the constructor
arguments of registered classes, nothing else). Per METHODS.md §1.2: each update samples a batch
of action chunks (`flowrl.replay.sample_sequence`) and takes one step of `flowrl.agent.update`;
`steps_per_call` updates are fused into one jitted `lax.scan`, all on device. Every
`eval_interval` steps (and at the last step) the policy is evaluated on the OGBench task;
checkpoints every `save_interval` steps are atomic and pickle-free.

Reproducibility and resume: the key of the chunk of updates that starts at step n is
`fold_in(key(seed), n)`, so the run is a pure function of (config, seed, data) and a run resumed
from a checkpoint at step n continues exactly as the uninterrupted run would (checked on CPU by
tests/test_train.py). Evaluation seeds are derived from the run seed and recorded in the log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np

from flowrl import agent as agent_lib
from flowrl.agent import AgentConfig, AgentState
from flowrl.checkpoint import save_checkpoint
from flowrl.errors import ConfigError, DatasetError, NumericalError
from flowrl.extractor import AbstractExtractor
from flowrl.metrics_log import MetricsLogger
from flowrl.registry import REGISTRY
from flowrl.replay import SequenceDataset, sample_sequence
from flowrl.rundir import (
    check_run_dir,
    config_fingerprint,
    package_versions,
    prepare_run_dir,
    read_run_info,
    write_json_atomic,
    write_text_atomic,
)

CHECKPOINT_DIR = "checkpoints"


def default_data_dir() -> Path:
    return Path(os.environ.get("FLOWRL_DATA_DIR", "~/.ogbench/data")).expanduser()


def extractor_name(extractor: AbstractExtractor) -> str:
    """The registry name of an extractor instance ('' for an unregistered class)."""
    return next((name for name, cls in REGISTRY.items() if type(extractor) is cls), "")


def _check_intervals(offline_steps: int, steps_per_call: int, **intervals: int) -> None:
    if steps_per_call < 1 or offline_steps < 0:
        raise ConfigError(f"train.steps_per_call must be >= 1 and train.offline_steps >= 0 "
                          f"(got {steps_per_call}, {offline_steps})")
    for name, value in {"offline_steps": offline_steps, **intervals}.items():
        if value % steps_per_call:
            raise ConfigError(
                f"train.{name} = {value} is not a multiple of train.steps_per_call = {steps_per_call}; "
                f"updates run in fused chunks of steps_per_call — bind train.{name} to a multiple of it"
            )


def load_training_data(
    env_name: str,
    data_dir: Path,
    *,
    sparse: bool,
    clip_actions: bool,
    generate_if_missing: bool,
    generate_episodes: int | None,
    generate_workers: int,
    generate_max_episode_steps: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The offline dataset (METHODS §2), generated first when missing and `generate_if_missing`."""
    from flowrl.ogbench import generate_dataset, load_dataset, parse_env_name
    from flowrl.ogbench.datasets import dataset_paths

    info: dict[str, Any] = {}
    train_path, val_path = dataset_paths(env_name, data_dir)
    if generate_if_missing and not (train_path.is_file() and val_path.is_file()):
        domain = parse_env_name(env_name).domain
        print(f"dataset {train_path} missing: generating it locally from ogbench's oracles "
              f"({generate_episodes or domain.default_episodes} episodes)")
        result = generate_dataset(
            domain.name,
            episodes=generate_episodes,
            workers=generate_workers,
            directory=data_dir,
            seed=0,
            max_episode_steps=generate_max_episode_steps,
        )
        info["generated"] = {
            "transitions": int(result.transitions),
            "seconds": float(result.wall_seconds),
            "transitions_per_second": float(result.transitions_per_second),
        }
    data = load_dataset(env_name, data_dir, sparse=sparse, clip_actions=clip_actions)
    info["dataset"] = str(train_path)
    info["transitions"] = int(data["observations"].shape[0])
    return data, info


def _check_env_dims(env_name: str, data: dict[str, np.ndarray], horizon: int) -> None:
    from flowrl.ogbench import env_dims

    obs_dim, action_dim = env_dims(env_name)
    got_obs, got_action = data["observations"].shape[1], data["actions"].shape[1]
    if (got_obs, got_action) != (obs_dim, action_dim):
        raise DatasetError(
            f"dataset for {env_name} has observation dim {got_obs} and action dim {got_action}, but the "
            f"env has {obs_dim} and {action_dim}; regenerate it with `flowrl data generate` for this domain"
        )
    if data["observations"].shape[0] < horizon:
        raise DatasetError(
            f"dataset for {env_name} has {data['observations'].shape[0]} transitions, fewer than the "
            f"chunk length H = {horizon}; generate more episodes"
        )


def _summarise(metrics: dict[str, jax.Array]) -> dict[str, float]:
    """Mean of each metric over the updates of one fused chunk (skipped updates: their count)."""
    summary = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name == "optim/skipped":
            summary[name] = float(np.sum(value))
        else:
            finite = value[np.isfinite(value)]
            summary[name] = float(np.mean(finite)) if finite.size else float("nan")
    return summary


def _first_non_finite(metrics: dict[str, np.ndarray], first_step: int) -> tuple[str, int] | None:
    """(metric, update) of the earliest update with a non-finite value; at that update, loss
    terms are named before their sum and before derived metrics (a NaN gradient with finite
    losses names `optim/grad_norm`). The earliest update comes first: a bad gradient at update n
    makes every loss of update n + 1 NaN, and naming those would point at the wrong cause."""
    first_bad = {}
    for name, values in metrics.items():
        bad = np.flatnonzero(~np.isfinite(np.asarray(values)))
        if bad.size:
            first_bad[name] = int(bad[0])
    if not first_bad:
        return None
    update = min(first_bad.values())
    culprits = [name for name, index in first_bad.items() if index == update]
    name = min(culprits, key=lambda name: (name == "loss/total", "loss" not in name, name))
    return name, first_step + update + 1


SEED_PARALLELISM = ("auto", "vmap", "sequential")


def resolve_seed_parallelism(mode: str) -> str:
    """'auto' → 'vmap' on an accelerator, 'sequential' on CPU.

    On CPU a vmapped update is a different XLA program from the single-seed one, and its float
    rounding differs (measured: ~1e-7 relative after 20 tiny QAM updates), so a seed trained in a
    vmapped batch would drift from the same seed trained alone. Sequential mode runs each seed's
    chunk through the single-seed compiled step — one compilation, bit-identical runs. On CPU,
    vmapping seeds is not reliably faster (`flowrl bench --seeds`, docs/performance.md: faster for
    some methods, slower for others), so the exact path is the default there; bind 'vmap' to trade
    bit-identity for throughput. On a GPU one vmapped update of S seeds fills the device far better
    than S small ones.
    """
    if mode not in SEED_PARALLELISM:
        raise ConfigError(f"train.seed_parallelism = {mode!r} is not one of {', '.join(SEED_PARALLELISM)}")
    if mode == "auto":
        return "sequential" if jax.default_backend() == "cpu" else "vmap"
    return mode


def _stack(trees: list[Any]) -> Any:
    arrays = [eqx.filter(tree, eqx.is_array) for tree in trees]
    static = eqx.filter(trees[0], eqx.is_array, inverse=True)
    return eqx.combine(jax.tree.map(lambda *xs: jnp.stack(xs), *arrays), static)


def _unstack(tree: Any, count: int) -> list[Any]:
    arrays, static = eqx.partition(tree, eqx.is_array)
    return [eqx.combine(jax.tree.map(lambda x, i=i: x[i], arrays), static) for i in range(count)]


@dataclasses.dataclass
class _SeedRun:
    """Everything one seed of a (possibly multi-seed) job owns: its directory, logs and state."""

    seed: int
    run: Path
    base_key: jax.Array
    eval_seed: int
    state: AgentState
    step: int
    start_step: int
    logger: MetricsLogger
    last_eval: dict[str, float] | None = None
    train_seconds: float = 0.0
    skipped_total: int = 0
    online_restore: tuple[Any, dict[str, Any]] | None = None  # (tree, extra) of an online checkpoint
    online_summary: dict[str, Any] | None = None


@gin.configurable(module="flowrl")
def train(
    run_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    seed: int | Sequence[int] = 0,
    resume: bool = False,
    overwrite: bool = False,
    env_name: str = gin.REQUIRED,
    extractor: AbstractExtractor = gin.REQUIRED,
    agent: AgentConfig = AgentConfig(),
    sparse: bool = False,
    clip_dataset_actions: bool = True,
    data_dir: str | None = None,
    generate_if_missing: bool = False,
    generate_episodes: int | None = None,
    generate_workers: int = 2,
    generate_max_episode_steps: int = 1001,
    offline_steps: int = 1_000_000,
    steps_per_call: int = 1000,
    seed_parallelism: str = "auto",
    log_interval: int = 5000,
    eval_interval: int = 50_000,
    eval_episodes: int = 50,
    eval_workers: int = 1,
    eval_num_envs: int = 16,
    eval_max_episode_steps: int | None = None,
    save_interval: int = 50_000,
    keep_checkpoints: int = 3,
    online_steps: int = 0,
    start_training: int = 5000,
    balanced_sampling: bool = False,
    random_action_steps: int = 0,
    utd_ratio: int = 1,
    online_max_episode_steps: int | None = None,
    use_wandb: bool = False,
    progress: bool = True,
    config_text: str = "",
    dry_run: bool = False,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Train offline and return a summary (final success, paths, timings).

    Several seeds in one process: pass sequences `run_dir = [d_0, …]`, `seed = [s_0, …]` (or use
    `train_many`); the result is then one summary per seed, and each run directory is what
    `train(d_i, seed=s_i)` alone would write (same config fingerprint, checkpoints, logs and — on
    CPU, where `seed_parallelism='auto'` runs seeds one after another through one compiled step —
    bit-identical metrics). With `seed_parallelism='vmap'` each fused chunk of updates is one
    `vmap` over the seeds (each with its own parameters, data order and keys).

    Online phase (METHODS §1.3, `flowrl.online`): with `online_steps > 0` the agent then acts in
    the env for `online_steps` steps, one update per step from step `start_training` on
    (`utd_ratio` per step), with a replay buffer that starts as the offline dataset; with
    `balanced_sampling` (RLPD) batches are half offline, half online, and the first
    `random_action_steps` actions are uniform. Logs, evaluations (every `eval_interval`) and
    checkpoints (every `save_interval`) continue at step offline_steps + i; a run resumed inside the
    online phase continues exactly (buffer, action queue, env, keys). `online_max_episode_steps`
    is the training env's time limit (None: `eval_max_episode_steps`, else OGBench's). Several seeds
    run their online phases one after another (an env loop per seed), each as its single-seed run.

    Every offline interval must be a multiple of `steps_per_call` (checked with a clear error). Evaluation
    is skipped when `eval_episodes = 0`. With `dry_run`, the configuration is built and checked
    and returned without touching data or the run directory.
    """
    many = not isinstance(seed, int)
    seeds = [int(s) for s in (seed if many else [seed])]
    run_dirs = list(run_dir) if many else [run_dir]
    if many and (isinstance(run_dir, (str, os.PathLike)) or len(run_dirs) != len(seeds)):
        raise ConfigError(f"{len(seeds)} seeds need as many run directories (got {run_dir!r})")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and at least one (got {seeds})")
    if eval_interval == 0:
        eval_interval = offline_steps or steps_per_call
    _check_intervals(offline_steps, steps_per_call, log_interval=log_interval,
                     eval_interval=eval_interval, save_interval=save_interval)
    if not isinstance(extractor, AbstractExtractor):
        raise ConfigError(f"train.extractor must be an extractor such as @qam(), got {extractor!r}")
    if not isinstance(agent, AgentConfig):
        raise ConfigError(f"train.agent must be @flowrl.AgentConfig(), got {agent!r}")
    parallelism = resolve_seed_parallelism(seed_parallelism)
    from flowrl.online import OnlineSettings

    online = OnlineSettings(
        online_steps=online_steps, start_training=start_training, balanced_sampling=balanced_sampling,
        random_action_steps=random_action_steps, utd_ratio=utd_ratio, sparse=sparse,
        max_episode_steps=online_max_episode_steps if online_max_episode_steps is not None else eval_max_episode_steps,
        log_interval=log_interval, eval_interval=eval_interval, save_interval=save_interval,
    )
    online.check(agent.horizon, agent.batch_size)
    from flowrl.ogbench import parse_env_name

    parse_env_name(env_name)  # unknown env or task: one line listing the valid ones
    if dry_run:
        return {"env_name": env_name, "extractor": extractor, "agent": agent, "sparse": sparse,
                "offline_steps": offline_steps, "online_steps": online_steps, "eval_episodes": eval_episodes, "seeds": seeds,
                "seed_parallelism": parallelism}

    # Everything that can reject the input happens before a run directory is touched.
    data_path = Path(data_dir).expanduser() if data_dir else default_data_dir()
    data, data_info = load_training_data(
        env_name, data_path, sparse=sparse, clip_actions=clip_dataset_actions,
        generate_if_missing=generate_if_missing, generate_episodes=generate_episodes,
        generate_workers=generate_workers, generate_max_episode_steps=generate_max_episode_steps,
    )
    _check_env_dims(env_name, data, agent.horizon)
    obs_dim = int(data["observations"].shape[1])
    chunk_dim = int(data["actions"].shape[1]) * agent.horizon
    dataset = SequenceDataset.from_numpy(data)
    del data
    if online_steps > 0:  # a buffer that cannot fit is refused now, not after the offline phase
        from flowrl.online import buffer_rows, check_buffer_fits

        check_buffer_fits(buffer_rows(online, int(dataset.size), agent.horizon), obs_dim, chunk_dim // agent.horizon)
    fingerprints = [config_fingerprint(f"{config_text}\nseed={s}") for s in seeds]
    for path, fingerprint in zip(run_dirs, fingerprints):
        check_run_dir(path, fingerprint=fingerprint, resume=resume, overwrite=overwrite)

    def sample_batch(key):
        return sample_sequence(dataset, key, agent.batch_size, agent.horizon, agent.discount)

    @eqx.filter_jit
    def run_chunk(state: AgentState, extractor, config, key):
        return agent_lib.update_many(
            state, sample_batch, extractor, config, steps_per_call, key=key
        )

    @eqx.filter_jit
    def run_chunk_seeds(states: AgentState, extractor, config, keys):
        return eqx.filter_vmap(
            lambda state, key: agent_lib.update_many(state, sample_batch, extractor, config, steps_per_call, key=key)
        )(states, keys)

    @eqx.filter_jit
    def policy_fn(state: AgentState, extractor, observations, keys):
        ctx = agent_lib.make_context(state, obs_dim, chunk_dim)
        return jax.vmap(lambda o, k: extractor.sample(state.online.extractor, ctx, o, key=k))(
            jnp.asarray(observations, jnp.float32), keys
        )

    runs: list[_SeedRun] = []
    evaluator = None
    bar = None
    try:
        for path, run_seed, fingerprint in zip(run_dirs, seeds, fingerprints):
            runs.append(_start_seed_run(
                path, run_seed, fingerprint, resume=resume, overwrite=overwrite, env_name=env_name,
                extractor=extractor, agent=agent, obs_dim=obs_dim, chunk_dim=chunk_dim,
                data_info=data_info, offline_steps=offline_steps, online_steps=online_steps, use_wandb=use_wandb,
            ))
        if eval_episodes > 0:
            from flowrl.evaluation import Evaluator

            evaluator = Evaluator(env_name, num_envs=min(eval_num_envs, eval_episodes), workers=eval_workers,
                                  max_episode_steps=eval_max_episode_steps)

        def run_evaluation(seed_run: _SeedRun) -> dict[str, float]:  # at seed_run.step, with seed_run.state
            state = seed_run.state
            result = evaluator.evaluate(
                lambda obs, keys: policy_fn(state, extractor, obs, keys),
                episodes=eval_episodes, seed=seed_run.eval_seed, horizon=agent.horizon,
                expected_obs_dim=obs_dim, expected_action_dim=chunk_dim // agent.horizon,
            )
            record = {"step": seed_run.step, **{f"eval/{k}": v for k, v in result.metrics().items()},
                      "eval/seed": seed_run.eval_seed, "eval/episodes": eval_episodes}
            seed_run.logger.log(record, kind="eval")
            return record

        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=(offline_steps + online_steps) * len(runs), initial=sum(r.step for r in runs), desc="train",
                       unit="upd", dynamic_ncols=True)

        while True:
            pending = [r for r in runs if r.step < offline_steps]
            if not pending:
                break
            # Seeds resumed from different checkpoints catch up one by one; aligned seeds share a chunk.
            lagging = [r for r in pending if r.step == min(p.step for p in pending)]
            chunk_start = time.perf_counter()
            if parallelism == "vmap" and len(lagging) > 1:
                keys = jnp.stack([jax.random.fold_in(r.base_key, r.step) for r in lagging])
                states, metrics = run_chunk_seeds(_stack([r.state for r in lagging]), extractor, agent, keys)
                metrics = jax.device_get(metrics)
                outputs = list(zip(_unstack(states, len(lagging)),
                                   [jax.tree.map(lambda x, i=i: x[i], metrics) for i in range(len(lagging))]))
            else:
                outputs = []
                for r in lagging:
                    state, metrics = run_chunk(r.state, extractor, agent, jax.random.fold_in(r.base_key, r.step))
                    outputs.append((state, jax.device_get(metrics)))
            seconds = (time.perf_counter() - chunk_start) / len(lagging)
            for r, (state, metrics) in zip(lagging, outputs):
                r.state = state
                r.step += steps_per_call
                r.train_seconds += seconds
                _after_chunk(r, metrics, seconds, agent=agent, steps_per_call=steps_per_call,
                             offline_steps=offline_steps, log_interval=log_interval, bar=bar)
                if bar is not None:
                    bar.update(steps_per_call)
                if evaluator is not None and (r.step % eval_interval == 0 or r.step == offline_steps):
                    r.last_eval = run_evaluation(r)
                    if bar is not None:
                        prefix = f"seed {r.seed} " if many else ""
                        bar.write(f"{prefix}step {r.step}: success {r.last_eval['eval/success']:.2f}")
                if r.step % save_interval == 0 or r.step == offline_steps:
                    r.logger.sync()
                    save_checkpoint(r.run / CHECKPOINT_DIR, r.step, r.state, extra={"phase": "offline"},
                                    keep=keep_checkpoints)

        if online_steps > 0:
            for r in runs:  # one seed after another: each seed has its own env loop and buffer
                _run_online_phase(
                    r, online, env_name=env_name, extractor=extractor, agent=agent, dataset=dataset,
                    obs_dim=obs_dim, chunk_dim=chunk_dim, offline_steps=offline_steps,
                    keep_checkpoints=keep_checkpoints, bar=bar,
                    evaluate=(run_evaluation if evaluator is not None else None),
                )
    finally:
        if bar is not None:
            bar.close()
        for r in runs:
            r.logger.close()
        if evaluator is not None:
            evaluator.close()

    summaries = [
        {
            "run_dir": str(r.run),
            "seed": r.seed,
            "start_step": r.start_step,
            "final_step": offline_steps + online_steps,
            "online": r.online_summary,
            "train_seconds": r.train_seconds,
            "success": None if r.last_eval is None else r.last_eval["eval/success"],
            "skipped_updates": r.skipped_total,
            "checkpoint_dir": str(r.run / CHECKPOINT_DIR),
            "train_csv": str(r.logger.paths("train")[1]),
            "eval_csv": str(r.logger.paths("eval")[1]),
            "state": r.state,
            "seed_parallelism": parallelism,
        }
        for r in runs
    ]
    return summaries if many else summaries[0]


def train_many(
    run_dirs: Sequence[str | os.PathLike[str]],
    seeds: Sequence[int],
    *,
    resume: bool = False,
    overwrite: bool = False,
    config_text: str = "",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Several seeds of the gin-bound configuration in one process: one run directory per seed,
    each as `train(run_dirs[i], seed=seeds[i])` alone would write it (see `train`)."""
    return train(list(run_dirs), seed=[int(s) for s in seeds], resume=resume, overwrite=overwrite,
                 config_text=config_text, progress=progress)


def _start_seed_run(
    path: str | os.PathLike[str], seed: int, fingerprint: str, *, resume: bool, overwrite: bool,
    env_name: str, extractor: AbstractExtractor, agent: AgentConfig, obs_dim: int, chunk_dim: int,
    data_info: dict[str, Any], offline_steps: int, online_steps: int, use_wandb: bool,
) -> _SeedRun:
    """Prepare one seed's run directory, record what the run is, and build or restore its state."""
    run = prepare_run_dir(path, fingerprint=fingerprint, resume=resume, overwrite=overwrite)
    # Save what this run is: operative config, versions, task and method (plots read these).
    write_text_atomic(run / "config.gin", gin.operative_config_str())
    info = read_run_info(run)
    info.update(
        env_name=env_name, extractor=extractor_name(extractor), seed=seed,
        versions=package_versions(), data=data_info, offline_steps=offline_steps, online_steps=online_steps,
    )
    write_json_atomic(run / "run.json", info)

    base_key = jax.random.key(seed)
    init_key = jax.random.fold_in(base_key, -1 % 2**31)
    state = agent_lib.init_agent(extractor, agent, obs_dim, chunk_dim, key=init_key)
    start_step = 0
    online_restore = None
    if resume:
        from flowrl.online import is_online_checkpoint, latest_phase_checkpoint, online_checkpoint_template

        def template(extra: dict[str, Any]) -> Any:
            if is_online_checkpoint(extra):
                return online_checkpoint_template(state, extra, obs_dim, chunk_dim // agent.horizon, agent.horizon)
            return state

        restored = latest_phase_checkpoint(run / CHECKPOINT_DIR, template)
        if restored is not None:
            start_step, tree, extra = restored
            if is_online_checkpoint(extra):
                online_restore = (tree, extra)
                state = tree["agent"]
            else:
                state = tree
            print(f"resuming {run} from step {start_step}")
    logger = MetricsLogger(run, resume_from_step=start_step if resume else None, use_wandb=use_wandb,
                           wandb_kwargs={"config": {"env_name": env_name, "seed": seed}})
    eval_seed = (seed * 7919 + 1) % 2**31  # fixed per run seed, recorded with every evaluation
    return _SeedRun(seed=seed, run=run, base_key=base_key, eval_seed=eval_seed, state=state,
                    step=start_step, start_step=start_step, logger=logger, online_restore=online_restore)


def _after_chunk(
    r: _SeedRun, metrics: dict[str, np.ndarray], seconds: float, *, agent: AgentConfig,
    steps_per_call: int, offline_steps: int, log_interval: int, bar: Any,
) -> None:
    """Account for one finished chunk of updates: skipped updates, non-finite check, train log."""
    r.skipped_total += int(np.sum(metrics["optim/skipped"]))
    bad = None if agent.skip_nonfinite_updates else _first_non_finite(metrics, r.step - steps_per_call)
    if bad is not None:
        name, bad_step = bad
        raise NumericalError(
            f"non-finite {name} at update {bad_step} (seed {r.seed}); the last good checkpoint in "
            f"{r.run / CHECKPOINT_DIR} is intact — lower the learning rate or check the data"
        )
    if r.step % log_interval == 0 or r.step == offline_steps:
        record = {"step": r.step, **_summarise(metrics),
                  "time/updates_per_second": steps_per_call / max(seconds, 1e-9)}
        r.logger.log(record, kind="train")
        if bar is not None:
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("critic/loss", "bc/loss", "extractor/loss")
                             if k in record})


def _run_online_phase(
    r: _SeedRun, settings: Any, *, env_name: str, extractor: AbstractExtractor, agent: AgentConfig,
    dataset: SequenceDataset, obs_dim: int, chunk_dim: int, offline_steps: int, keep_checkpoints: int,
    bar: Any, evaluate: Any,
) -> None:
    """One seed's online phase (METHODS §1.3; `flowrl.online.OnlinePhase`), resumed if it was checkpointed."""
    from flowrl.online import OnlinePhase

    if r.step >= offline_steps + settings.online_steps:
        return
    phase = OnlinePhase(env_name, extractor, agent, settings, dataset, seed=r.seed, obs_dim=obs_dim,
                        chunk_dim=chunk_dim, step_offset=offline_steps)
    (bar.write if bar is not None else print)(f"seed {r.seed}: {phase.buffer_message}")
    if r.online_restore is not None:
        r.state = phase.restore(*r.online_restore)
        r.online_restore = None

    def on_log(step: int, record: dict[str, float]) -> None:
        if not agent.skip_nonfinite_updates:
            update_metrics = {k: np.asarray([v]) for k, v in record.items()
                              if k.split("/")[0] in ("critic", "bc", "extractor", "loss", "optim")}
            bad = _first_non_finite(update_metrics, step)  # the same culprit rule as offline
            if bad is not None:
                raise NumericalError(
                    f"non-finite {bad[0]} in the online updates before step {step} (seed {r.seed}); the last good "
                    f"checkpoint in {r.run / CHECKPOINT_DIR} is intact — lower the learning rate or check the data"
                )
        r.logger.log({"step": step, **record}, kind="train")

    def on_eval(step: int, state: AgentState) -> None:
        if evaluate is None:
            return
        r.state, r.step = state, step
        r.last_eval = evaluate(r)
        if bar is not None:
            bar.write(f"seed {r.seed} step {step}: success {r.last_eval['eval/success']:.2f}")

    def on_save(step: int, tree: Any, extra: dict[str, Any]) -> None:
        r.logger.sync()
        save_checkpoint(r.run / CHECKPOINT_DIR, step, tree, extra=extra, keep=keep_checkpoints)

    started = time.perf_counter()
    try:
        r.state = phase.run(r.state, on_log=on_log, on_eval=on_eval, on_save=on_save,
                            on_progress=(bar.update if bar is not None else None))
    finally:
        phase.close()
    r.step = offline_steps + settings.online_steps
    r.train_seconds += time.perf_counter() - started
    r.online_summary = {
        "buffer": phase.buffer_message,
        "env_steps": phase.env_steps_timed,
        "env_and_policy_seconds": phase.env_seconds,
        "wall_seconds": time.perf_counter() - started,
        "env_steps_per_second": phase.env_steps_timed / max(time.perf_counter() - started, 1e-9),
    }
