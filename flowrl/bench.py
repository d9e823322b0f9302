"""`flowrl bench`: throughput of every registered extractor at the paper's default sizes.

Measured per extractor (defaults: batch 256, 4×512 MLPs, E = 10 critics, K = 10 flow steps,
cube-double shapes — observation 40, action 5, chunk H = 5, so D = 25):

- compile time of the fused training step (`update_many`, `--updates-per-call` updates per call);
- median wall ms and CPU seconds per update (after warm-up, `block_until_ready`);
- updates per second with S seeds trained in one process (`vmap` of the whole fused update over
  seeds: each seed its own parameters, data order and keys);
- action-sampling latency for 1 and for 50 observations;
- all of it under the chosen integrator backend (`--integrator diffrax|scan`, `flowrl.integrate`);
- peak host memory (max RSS) and, on a GPU, peak device memory.

Evaluation env steps per second are measured once (they do not depend on the extractor) with
`flowrl.evaluation` on cube-double, single process and with 2 workers, using a cheap jitted policy.
Data are synthetic (random observations/actions on device) so the benchmark needs no dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from flowrl.agent import AgentConfig, act, init_agent, update_many
from flowrl.replay import SequenceDataset, sample_sequence
from flowrl.rundir import write_json_atomic

OBS_DIM, ACTION_DIM, HORIZON = 40, 5, 5  # cube-double; chunked D = 25


def synthetic_dataset(rows: int, *, seed: int = 0) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    return SequenceDataset.from_numpy(
        {
            "observations": rng.normal(size=(rows, OBS_DIM)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (rows, ACTION_DIM)).astype(np.float32),
            "rewards": -np.ones(rows, np.float32),
            "masks": np.ones(rows, np.float32),
            "terminals": (np.arange(rows) % 1000 == 999).astype(np.float32),
            "next_observations": rng.normal(size=(rows, OBS_DIM)).astype(np.float32),
        }
    )


def _timed(fn, *args) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _sized(extractor, hidden: tuple[int, ...], flow_steps: int):
    """The extractor with its (nested) `hidden_dims` and `flow_steps` fields set to the bench sizes."""
    changes = {}
    for field in dataclasses.fields(extractor):
        value = getattr(extractor, field.name)
        if field.name == "hidden_dims":
            changes[field.name] = hidden
        elif field.name == "flow_steps":
            changes[field.name] = flow_steps
        elif isinstance(value, eqx.Module) and dataclasses.is_dataclass(value):
            changes[field.name] = _sized(value, hidden, flow_steps)
    return dataclasses.replace(extractor, **changes) if changes else extractor


def bench_extractor(
    name: str,
    *,
    seeds: list[int],
    batch_size: int = 256,
    hidden: tuple[int, ...] = (512, 512, 512, 512),
    num_critics: int = 10,
    flow_steps: int = 10,
    updates_per_call: int = 10,
    repeats: int = 3,
    grad_clip_norm: float | None = 1.0,
) -> dict[str, Any]:
    from flowrl.registry import get_extractor

    extractor = _sized(get_extractor(name)(), hidden, flow_steps)
    config = AgentConfig(horizon=HORIZON, batch_size=batch_size, num_critics=num_critics,
                         actor_hidden_dims=hidden, critic_hidden_dims=hidden, grad_clip_norm=grad_clip_norm)
    dataset = synthetic_dataset(20_000)
    chunk_dim = ACTION_DIM * HORIZON

    def sample_batch(key):
        return sample_sequence(dataset, key, batch_size, HORIZON, config.discount)

    def chunk(state, key):
        return update_many(state, sample_batch, extractor, config, updates_per_call, key=key)

    state = init_agent(extractor, config, OBS_DIM, chunk_dim, key=jax.random.key(0))
    step = eqx.filter_jit(chunk)
    compile_wall = time.perf_counter()
    compiled = step.lower(state, jax.random.key(1)).compile()
    compile_seconds = time.perf_counter() - compile_wall
    (state, _), _, _ = _timed(compiled, state, jax.random.key(2))  # warm-up
    walls, cpus = [], []
    for r in range(repeats):
        (state, _), wall, cpu = _timed(compiled, state, jax.random.key(3 + r))
        walls.append(wall / updates_per_call)
        cpus.append(cpu / updates_per_call)
    result: dict[str, Any] = {
        "extractor": name,
        "compile_seconds": compile_seconds,
        "ms_per_update": 1000 * statistics.median(walls),
        "cpu_seconds_per_update": statistics.median(cpus),
        "updates_per_second": 1.0 / statistics.median(walls),
    }

    # Many seeds in one process: vmap the whole fused update over per-seed states and keys.
    seed_rates = {}
    for num_seeds in seeds:
        if num_seeds == 1:
            seed_rates["1"] = result["updates_per_second"]
            continue
        states = eqx.filter_vmap(lambda k: init_agent(extractor, config, OBS_DIM, chunk_dim, key=k))(
            jax.random.split(jax.random.key(10), num_seeds)
        )
        many = eqx.filter_jit(eqx.filter_vmap(chunk))
        (states, _), _, _ = _timed(many, states, jax.random.split(jax.random.key(11), num_seeds))
        (states, _), wall, _ = _timed(many, states, jax.random.split(jax.random.key(12), num_seeds))
        seed_rates[str(num_seeds)] = num_seeds * updates_per_call / wall
    result["seed_updates_per_second"] = seed_rates  # total updates/s summed over seeds

    # Action sampling latency.
    policy = eqx.filter_jit(lambda s, o, k: act(s, extractor, o, key=k))
    for n in (1, 50):
        obs = jnp.zeros((n, OBS_DIM))
        _timed(policy, state, obs, jax.random.key(20))
        latencies = [_timed(policy, state, obs, jax.random.key(21 + i))[1] for i in range(5)]
        result[f"sample_ms_{n}"] = 1000 * statistics.median(latencies)
    return result


def bench_evaluation(episodes: int = 8, steps: int = 200) -> dict[str, float]:
    """Env steps per second of the evaluation path, 1 vs 2 worker processes, cheap policy."""
    from flowrl.evaluation import evaluate

    def policy(observations, keys):
        return np.zeros((observations.shape[0], ACTION_DIM * HORIZON), np.float32)

    rates = {}
    for workers in (1, 2):
        result = evaluate(policy, "cube-double-play-singletask-task2-v0", episodes=episodes, seed=0,
                          horizon=HORIZON, workers=workers, max_episode_steps=steps, num_envs=episodes)
        rates[f"env_steps_per_second_workers{workers}"] = result.env_steps_per_second
    return rates


def peak_memory() -> dict[str, float]:
    memory = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        memory["device_peak_gb"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return memory


def run(args: argparse.Namespace) -> int:
    from flowrl.integrate import use_integrator

    with use_integrator(args.integrator):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from flowrl.registry import load_extractor_plugins, registered_names

    load_extractor_plugins()
    names = args.extractor or registered_names()
    seeds = [int(s) for s in args.seeds.split(",")]
    hidden = tuple(int(h) for h in args.hidden.split(","))
    device = jax.devices()[0]
    report: dict[str, Any] = {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "cpu_count": os.cpu_count(),
        "integrator": args.integrator,
        "sizes": {"batch": args.batch_size, "hidden": hidden, "critics": args.critics,
                  "flow_steps": args.flow_steps, "obs": OBS_DIM, "action": ACTION_DIM, "horizon": HORIZON},
        "command": " ".join(sys.argv),
        "extractors": [],
    }
    print(f"{'extractor':<12} {'compile s':>9} {'ms/upd':>8} {'cpu-s/upd':>9} "
          + " ".join(f"{'S=' + str(s) + ' upd/s':>11}" for s in seeds) + f" {'act1 ms':>8} {'act50 ms':>8}")
    for name in names:
        row = bench_extractor(name, seeds=seeds, batch_size=args.batch_size, hidden=hidden,
                              num_critics=args.critics, flow_steps=args.flow_steps,
                              updates_per_call=args.updates_per_call, repeats=args.repeats)
        report["extractors"].append(row)
        print(f"{name:<12} {row['compile_seconds']:>9.1f} {row['ms_per_update']:>8.1f} "
              f"{row['cpu_seconds_per_update']:>9.3f} "
              + " ".join(f"{row['seed_updates_per_second'][str(s)]:>11.2f}" for s in seeds)
              + f" {row['sample_ms_1']:>8.1f} {row['sample_ms_50']:>8.1f}", flush=True)
    if not args.skip_eval:
        report["evaluation"] = bench_evaluation()
        print("evaluation env steps/s:", {k: round(v, 1) for k, v in report["evaluation"].items()})
    report["memory"] = peak_memory()
    print("memory:", {k: round(v, 2) for k, v in report["memory"].items()})
    if args.json:
        write_json_atomic(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def register_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure compile time, update rate, seeds/process, sampling latency")
    parser.add_argument("--extractor", action="append", help="registry name (repeatable; default: all)")
    parser.add_argument("--seeds", default="1,2,4,8", help="seed counts trained together, e.g. 1,2,4,8")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", default="512,512,512,512")
    parser.add_argument("--critics", type=int, default=10)
    parser.add_argument("--flow-steps", type=int, default=10)
    parser.add_argument("--updates-per-call", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--integrator", choices=("diffrax", "scan"), default="diffrax",
                        help="fixed-grid Euler backend of every flow/SDE/adjoint solve (flowrl.integrate)")
    parser.add_argument("--skip-eval", action="store_true", help="skip the evaluation env-step benchmark")
    parser.set_defaults(func=run)
