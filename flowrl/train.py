"""Offline training driver: dataset → agent → fused updates → evaluation, logs and checkpoints.

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
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import gin
import jax
import jax.numpy as jnp
import numpy as np

from flowrl import agent as agent_lib
from flowrl.agent import AgentConfig, AgentState
from flowrl.checkpoint import latest_checkpoint, save_checkpoint
from flowrl.errors import ConfigError, DatasetError, NumericalError
from flowrl.extractor import AbstractExtractor
from flowrl.metrics_log import MetricsLogger
from flowrl.registry import REGISTRY
from flowrl.replay import SequenceDataset, sample_sequence
from flowrl.rundir import package_versions, prepare_run_dir, read_run_info, write_json_atomic, write_text_atomic

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


@gin.configurable(module="flowrl")
def train(
    run_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
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
    log_interval: int = 5000,
    eval_interval: int = 50_000,
    eval_episodes: int = 50,
    eval_workers: int = 1,
    eval_num_envs: int = 16,
    eval_max_episode_steps: int | None = None,
    save_interval: int = 50_000,
    keep_checkpoints: int = 3,
    use_wandb: bool = False,
    progress: bool = True,
    config_text: str = "",
    dry_run: bool = False,
) -> dict[str, Any]:
    """Train offline and return a summary (final success, paths, timings).

    Every interval must be a multiple of `steps_per_call` (checked with a clear error). Evaluation
    is skipped when `eval_episodes = 0`. With `dry_run`, the configuration is built and checked
    and returned without touching data or the run directory.
    """
    if eval_interval == 0:
        eval_interval = offline_steps or steps_per_call
    _check_intervals(offline_steps, steps_per_call, log_interval=log_interval,
                     eval_interval=eval_interval, save_interval=save_interval)
    if not isinstance(extractor, AbstractExtractor):
        raise ConfigError(f"train.extractor must be an extractor such as @qam(), got {extractor!r}")
    if not isinstance(agent, AgentConfig):
        raise ConfigError(f"train.agent must be @flowrl.AgentConfig(), got {agent!r}")
    from flowrl.ogbench import parse_env_name

    parse_env_name(env_name)  # unknown env or task: one line listing the valid ones
    if dry_run:
        return {"env_name": env_name, "extractor": extractor, "agent": agent, "sparse": sparse,
                "offline_steps": offline_steps, "eval_episodes": eval_episodes}

    # Everything that can reject the input happens before the run directory is touched.
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
    fingerprint = hashlib.sha256(f"{config_text}\nseed={seed}".encode()).hexdigest()
    run = prepare_run_dir(run_dir, fingerprint=fingerprint, resume=resume, overwrite=overwrite)

    # Save what this run is: operative config, versions, task and method (plots read these).
    write_text_atomic(run / "config.gin", gin.operative_config_str())
    info = read_run_info(run)
    info.update(
        env_name=env_name, extractor=extractor_name(extractor), seed=seed,
        versions=package_versions(), data=data_info, offline_steps=offline_steps,
    )
    write_json_atomic(run / "run.json", info)

    base_key = jax.random.key(seed)
    init_key = jax.random.fold_in(base_key, -1 % 2**31)
    state = agent_lib.init_agent(extractor, agent, obs_dim, chunk_dim, key=init_key)
    start_step = 0
    if resume:
        restored = latest_checkpoint(run / CHECKPOINT_DIR, like=state)
        if restored is not None:
            start_step, state, _ = restored
            print(f"resuming {run} from step {start_step}")

    def sample_batch(key):
        return sample_sequence(dataset, key, agent.batch_size, agent.horizon, agent.discount)

    @eqx.filter_jit
    def run_chunk(state: AgentState, extractor, config, key):
        return agent_lib.update_many(
            state, sample_batch, extractor, config, steps_per_call, key=key
        )

    @eqx.filter_jit
    def policy_fn(state: AgentState, extractor, observations, keys):
        ctx = agent_lib.make_context(state, obs_dim, chunk_dim)
        return jax.vmap(lambda o, k: extractor.sample(state.online.extractor, ctx, o, key=k))(
            jnp.asarray(observations, jnp.float32), keys
        )

    logger = MetricsLogger(run, resume_from_step=start_step if resume else None, use_wandb=use_wandb,
                           wandb_kwargs={"config": {"env_name": env_name, "seed": seed}})
    evaluator = None
    if eval_episodes > 0:
        from flowrl.evaluation import Evaluator

        evaluator = Evaluator(env_name, num_envs=min(eval_num_envs, eval_episodes), workers=eval_workers,
                              max_episode_steps=eval_max_episode_steps)
    eval_seed = (seed * 7919 + 1) % 2**31  # fixed per run seed, recorded with every evaluation

    def run_evaluation(step: int) -> dict[str, float]:
        result = evaluator.evaluate(
            lambda obs, keys: policy_fn(state, extractor, obs, keys),
            episodes=eval_episodes, seed=eval_seed, horizon=agent.horizon,
            expected_obs_dim=obs_dim, expected_action_dim=chunk_dim // agent.horizon,
        )
        record = {"step": step, **{f"eval/{k}": v for k, v in result.metrics().items()},
                  "eval/seed": eval_seed, "eval/episodes": eval_episodes}
        logger.log(record, kind="eval")
        return record

    summary: dict[str, Any] = {"run_dir": str(run), "start_step": start_step}
    last_eval: dict[str, float] | None = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=offline_steps, initial=start_step, desc="train", unit="upd", dynamic_ncols=True)
    train_seconds = 0.0
    skipped_total = 0
    try:
        step = start_step
        while step < offline_steps:
            chunk_start = time.perf_counter()
            state, metrics = run_chunk(state, extractor, agent, jax.random.fold_in(base_key, step))
            metrics = jax.device_get(metrics)
            step += steps_per_call
            train_seconds += time.perf_counter() - chunk_start
            skipped_total += int(np.sum(metrics["optim/skipped"]))
            bad = None if agent.skip_nonfinite_updates else _first_non_finite(metrics, step - steps_per_call)
            if bad is not None:
                name, bad_step = bad
                raise NumericalError(
                    f"non-finite {name} at update {bad_step}; the last good checkpoint in "
                    f"{run / CHECKPOINT_DIR} is intact — lower the learning rate or check the data"
                )
            if bar is not None:
                bar.update(steps_per_call)
            if step % log_interval == 0 or step == offline_steps:
                record = {"step": step, **_summarise(metrics), "time/updates_per_second":
                          steps_per_call / max(time.perf_counter() - chunk_start, 1e-9)}
                logger.log(record, kind="train")
                if bar is not None:
                    bar.set_postfix({k: f"{record[k]:.3g}" for k in ("critic/loss", "bc/loss", "extractor/loss")
                                     if k in record})
            if evaluator is not None and (step % eval_interval == 0 or step == offline_steps):
                last_eval = run_evaluation(step)
                if bar is not None:
                    bar.write(f"step {step}: success {last_eval['eval/success']:.2f}")
            if step % save_interval == 0 or step == offline_steps:
                logger.sync()
                save_checkpoint(run / CHECKPOINT_DIR, step, state, keep=keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        if evaluator is not None:
            evaluator.close()

    summary.update(
        final_step=offline_steps,
        train_seconds=train_seconds,
        success=None if last_eval is None else last_eval["eval/success"],
        skipped_updates=skipped_total,
        checkpoint_dir=str(run / CHECKPOINT_DIR),
        train_csv=str(logger.paths("train")[1]),
        eval_csv=str(logger.paths("eval")[1]),
        state=state,
    )
    return summary
