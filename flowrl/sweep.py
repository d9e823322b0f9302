"""`flowrl sweep`: a grid of training runs (methods × tasks × variants × seeds) on Ray or in-process.

    flowrl sweep SPEC.yaml [--engine ray|serial] [--address ADDR] [--max-parallel N] [--out DIR]
                           [--subset KEY=V1,V2]... [--retries N] [--cpus-per-task C] [--gpus-per-task G]
                           [--dry-run] [--cost-table BENCH.json]...

A sweep spec is a small YAML file (read with `yaml.safe_load`: data only, nothing executed); the
format is in docs/sweeps.md and `experiments/paper/grid.yaml` is the paper's grid. Its grid is
expanded into *cells*, one per (method, domain, task, variant); a cell's seeds run together in one
task through the many-seeds path (`flowrl.train.train_many`) when it exists, else one after the
other in that task.

Layout of the output directory (`--out`, default the spec's `out`, else `runs/<spec name>`)::

    <out>/sweep.json                                      what the last invocation did, per cell
    <out>/<method>/<env_name>/<variant>-<hash12>/cell.json  the cell: configs, bindings, seeds, hash
    <out>/<method>/<env_name>/<variant>-<hash12>/seed<S>/   a flowrl run directory (flowrl.rundir)
    <out>/.../seed<S>/done.json                           written once `train` returned for that seed

`hash12` is the start of the sha256 of the cell's parsed gin config (the text `flowrl train` would
fingerprint, seed excluded), so a rerun of the same spec finds the same directories: seeds with
`done.json` are skipped, the others are (re)started with `resume=True`, which continues a partial
run from its latest checkpoint or starts a missing one (flowrl.rundir). Changing anything that
changes the config gives new directories; the old ones are never touched.

Failures: an error a user can fix (`FlowRLError`: bad config, data, run directory) fails its cell
at once with its one-line message. Anything else — an exception, or the worker process dying
(killed, out of memory, node lost) — is retried up to `retries` times within one invocation (Ray's
`max_retries` / `retry_exceptions`; the serial engine loops). A later invocation tries failed cells
again, resuming from their checkpoints.

Engines: `ray` (default) runs one Ray task per cell. `ray.init()` without `--address` starts a
local Ray instance (nothing to install or start by hand); `--address` attaches to a running
cluster (docs/sweeps.md). Each task requests `resources.cpus` CPUs and `resources.gpus` GPUs;
JAX inside it is sized to match: no GPU requested → `JAX_PLATFORMS=cpu`; a GPU share g → JAX
preallocates `0.9·min(g, 1)` of that GPU's memory (`XLA_PYTHON_CLIENT_MEM_FRACTION`), so
fractional tasks packed on one GPU fit. `serial` runs the cells one by one in this process (for
debugging, and for tests of the spec logic).

`--dry-run` parses every cell's config (so any config error shows before anything starts), lists
the cells with their status, and estimates their cost from a per-method table of measured update
costs (`flowrl/resources/bench_cpu.json`, from docs/performance.md; or `flowrl bench --json`
outputs given with `--cost-table`). Evaluation time is not included (under 1% at the paper's
settings). There is no GPU estimate unless a GPU bench file is given.

Test hook: if the environment variable `FLOWRL_SWEEP_HOOK=package.module:function` is set, each
cell attempt calls `function(cell_payload: dict, attempt: int)` before training (fault-injection
tests use it to kill a worker mid-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

from flowrl.errors import ConfigError, FlowRLError
from flowrl.rundir import config_fingerprint, write_json_atomic

__all__ = [
    "Cell",
    "CostTable",
    "SweepSpec",
    "SweepSpecError",
    "apply_subset",
    "cell_status",
    "estimate_cost",
    "expand_cells",
    "load_cost_tables",
    "load_spec",
    "register_cli",
    "run_cell",
    "run_sweep",
]

SPEC_KEYS = ("name", "out", "config", "methods", "domains", "tasks", "seeds", "bindings",
             "method_bindings", "domain_bindings", "variants", "resources", "retries")
REQUIRED_KEYS = ("methods", "domains", "tasks", "seeds")
SUBSET_KEYS = ("methods", "domains", "tasks", "seeds", "variants")
DEFAULT_CONFIG = "{method}/{domain}.gin"
DEFAULT_VARIANT = "default"
CELL_FILE = "cell.json"
DONE_FILE = "done.json"
ATTEMPTS_FILE = "attempts.json"
SWEEP_FILE = "sweep.json"
HOOK_ENV = "FLOWRL_SWEEP_HOOK"
# Environment passed on to Ray workers when set in the driver (data location, test hook).
FORWARDED_ENV = ("FLOWRL_DATA_DIR", HOOK_ENV, "MUJOCO_GL")
GPU_MEMORY_HEADROOM = 0.9  # JAX's share of the GPU memory a task requested (rest: CUDA context, other users)
COST_TABLE_RESOURCE = "bench_cpu.json"
GPU_COST_TABLE_RESOURCE = "bench_gpu.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepSpecError(ConfigError):
    """A sweep spec (or --subset / --cost-table) that is malformed; the message names file, key and fix."""


class SweepError(FlowRLError):
    """A sweep that cannot run as asked (Ray missing, inconsistent configs between machines, ...)."""


# --------------------------------------------------------------------------------------------
# Spec


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed, validated sweep spec (format: module docstring and docs/sweeps.md)."""

    path: Path
    name: str
    out: str | None
    config: str  # template of the gin file(s), with {method} and {domain}
    methods: tuple[str, ...]
    domains: tuple[str, ...]
    tasks: tuple[int, ...]
    seeds: tuple[int, ...]
    bindings: tuple[str, ...]
    method_bindings: Mapping[str, tuple[str, ...]]
    domain_bindings: Mapping[str, tuple[str, ...]]
    variants: Mapping[str, tuple[str, ...]]  # name -> bindings; at least one
    cpus: float
    gpus: float
    retries: int


def _spec_error(path: Path, key: str, problem: str, fix: str) -> SweepSpecError:
    return SweepSpecError(f"{path}: key '{key}': {problem}; {fix}")


def _str_list(path: Path, key: str, value: Any, *, names: bool = False) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _spec_error(path, key, f"expected a list of strings, got {value!r}",
                          "write it as a YAML list, e.g. [a, b]")
    if names:
        bad = [v for v in value if not _NAME.match(v)]
        if bad:
            raise _spec_error(path, key, f"{bad[0]!r} is not a plain name",
                              "use letters, digits, '-', '_' or '.' (it becomes a directory name)")
        if len(set(value)) != len(value):
            raise _spec_error(path, key, "contains duplicates", "list each entry once")
    return tuple(value)


def _int_list(path: Path, key: str, value: Any, *, minimum: int) -> tuple[int, ...]:
    """A list of ints, an int n (meaning 0..n-1 for seeds), or 'a-b' ranges in a string."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and key == "seeds":
        if value < 1:
            raise _spec_error(path, key, f"seed count {value} < 1", "give a count >= 1 or a list of seeds")
        return tuple(range(value))
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        try:
            value = _parse_int_ranges(value)
        except ValueError:
            value = None
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        raise _spec_error(path, key, f"expected a non-empty list of integers, got {value!r}",
                          "write e.g. [1, 2, 3] or '0-11'")
    if min(value) < minimum:
        raise _spec_error(path, key, f"value {min(value)} < {minimum}", f"use integers >= {minimum}")
    if len(set(value)) != len(value):
        raise _spec_error(path, key, "contains duplicates", "list each entry once")
    return tuple(value)


def _parse_int_ranges(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7]; ValueError when malformed."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if re.fullmatch(r"\d+-\d+", part):
            lo, hi = (int(x) for x in part.split("-"))
            if hi < lo:
                raise ValueError(part)
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    return out


def _bindings_map(path: Path, key: str, value: Any, allowed: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _spec_error(path, key, f"expected a mapping name -> list of gin bindings, got {value!r}",
                          "write e.g. {qam: ['qam.inv_temp=3.0']}")
    out = {}
    for name, bindings in value.items():
        if not isinstance(name, str) or (allowed is not None and name not in allowed):
            raise _spec_error(path, f"{key}.{name}", f"{name!r} is not one of the spec's entries "
                              f"({', '.join(allowed or ())})", "fix the name or remove the entry")
        out[name] = () if bindings is None else _str_list(path, f"{key}.{name}", bindings)
    return out


def load_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a YAML sweep spec; `SweepSpecError` (one line: file, key, fix) when it is wrong."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SweepSpecError(f"sweep spec {path} cannot be read ({e.strerror or e}); pass the path of a "
                             "YAML spec such as experiments/paper/grid.yaml") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SweepSpecError(f"{path}{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: a sweep spec is a YAML mapping with keys {', '.join(REQUIRED_KEYS)}; "
                             f"got {type(raw).__name__}")
    unknown = [k for k in raw if k not in SPEC_KEYS]
    if unknown:
        raise _spec_error(path, str(unknown[0]), "unknown key", f"use only {', '.join(SPEC_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise _spec_error(path, missing[0], "missing", f"add it (required keys: {', '.join(REQUIRED_KEYS)})")

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise _spec_error(path, "name", f"{name!r} is not a plain name", "use letters, digits, '-', '_', '.'")
    out = raw.get("out")
    if out is not None and (not isinstance(out, str) or not out.strip()):
        raise _spec_error(path, "out", f"expected a directory path, got {out!r}", "give a path or drop the key")
    config = raw.get("config", DEFAULT_CONFIG)
    if not isinstance(config, str) or "{method}" not in config:
        raise _spec_error(path, "config", f"{config!r} does not contain '{{method}}'",
                          f"use a template such as '{DEFAULT_CONFIG}' (several files: separate with ';')")
    methods = _str_list(path, "methods", raw["methods"], names=True)
    domains = _str_list(path, "domains", raw["domains"], names=True)
    tasks = _int_list(path, "tasks", raw["tasks"], minimum=1)
    seeds = _int_list(path, "seeds", raw["seeds"], minimum=0)
    bindings = () if raw.get("bindings") is None else _str_list(path, "bindings", raw["bindings"])
    method_bindings = _bindings_map(path, "method_bindings", raw.get("method_bindings"), methods)
    domain_bindings = _bindings_map(path, "domain_bindings", raw.get("domain_bindings"), domains)
    variants = _bindings_map(path, "variants", raw.get("variants"), None) or {DEFAULT_VARIANT: ()}
    bad_variant = [v for v in variants if not _NAME.match(v)]
    if bad_variant:
        raise _spec_error(path, "variants", f"{bad_variant[0]!r} is not a plain name",
                          "use letters, digits, '-', '_' or '.' (it becomes a directory name)")
    res = raw.get("resources") or {}
    if not isinstance(res, dict) or any(k not in ("cpus", "gpus") for k in res):
        raise _spec_error(path, "resources", f"expected a mapping with 'cpus' and/or 'gpus', got {res!r}",
                          "write e.g. {cpus: 1, gpus: 0.25}")
    cpus, gpus = res.get("cpus", 1), res.get("gpus", 0)
    for key, value in (("cpus", cpus), ("gpus", gpus)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise _spec_error(path, f"resources.{key}", f"{value!r} is not a number >= 0", "give e.g. 1 or 0.5")
    retries = raw.get("retries", 2)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _spec_error(path, "retries", f"{retries!r} is not an integer >= 0", "give e.g. 2")
    return SweepSpec(path=path, name=name, out=out, config=config, methods=methods, domains=domains,
                     tasks=tasks, seeds=seeds, bindings=bindings, method_bindings=method_bindings,
                     domain_bindings=domain_bindings, variants=variants, cpus=float(cpus), gpus=float(gpus),
                     retries=retries)


def apply_subset(spec: SweepSpec, subsets: Sequence[str]) -> SweepSpec:
    """Restrict the spec's axes with `--subset KEY=V1,V2` (KEY in methods, domains, tasks, seeds, variants).

    Values must belong to the spec (a typo fails with one line listing the valid values); integer
    axes accept ranges ('0-3').
    """
    for item in subsets:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or key not in SUBSET_KEYS or not values.strip():
            raise SweepSpecError(f"--subset {item!r}: expected KEY=V1,V2 with KEY one of {', '.join(SUBSET_KEYS)}")
        current = tuple(spec.variants) if key == "variants" else getattr(spec, key)
        if key in ("tasks", "seeds"):
            try:
                wanted: list[Any] = _parse_int_ranges(values)
            except ValueError:
                raise SweepSpecError(f"--subset {item!r}: {key} must be integers or ranges like 0-3") from None
        else:
            wanted = [v.strip() for v in values.split(",") if v.strip()]
        bad = [v for v in wanted if v not in current]
        if bad:
            raise SweepSpecError(f"--subset {item!r}: {bad[0]!r} is not in {spec.path}'s {key} "
                                 f"({', '.join(map(str, current))})")
        if key == "variants":
            spec = dataclasses.replace(spec, variants={k: v for k, v in spec.variants.items() if k in wanted})
        else:
            spec = dataclasses.replace(spec, **{key: tuple(v for v in current if v in wanted)})
    return spec


# --------------------------------------------------------------------------------------------
# Cells


@dataclasses.dataclass(frozen=True)
class Cell:
    """One (method, domain, task, variant) of the grid with all its seeds and its parsed config."""

    method: str
    domain: str
    task: int
    variant: str
    env_name: str
    config_files: tuple[str, ...]
    bindings: tuple[str, ...]
    seeds: tuple[int, ...]
    config_hash: str  # sha256 of the parsed gin config text (seed excluded)
    steps: int  # training updates per seed: train.offline_steps + train.online_steps
    directory: Path

    @property
    def label(self) -> str:
        return f"{self.method} {self.env_name} {self.variant}"

    def seed_dir(self, seed: int) -> Path:
        return self.directory / f"seed{seed}"

    def payload(self) -> dict[str, Any]:
        """Plain data describing the cell (what a Ray task receives and cell.json stores)."""
        return {
            "method": self.method, "domain": self.domain, "task": self.task, "variant": self.variant,
            "env_name": self.env_name, "config_files": list(self.config_files), "bindings": list(self.bindings),
            "seeds": list(self.seeds), "config_hash": self.config_hash, "steps": self.steps,
            "directory": str(self.directory),
        }


def env_name_for(domain: str, task: int) -> str:
    return f"{domain}-singletask-task{task}-v0"


def _parse_cell_config(config_files: Sequence[str], bindings: Sequence[str]) -> tuple[str, int]:
    """(parsed gin config text, updates per seed = offline + online steps); gin state is cleared around it."""
    import gin

    from flowrl.cli import parse_gin

    gin.clear_config()
    try:
        text = parse_gin(list(config_files), list(bindings))
        steps = sum(_train_value(name) for name in ("offline_steps", "online_steps"))
        return text, steps
    finally:
        gin.clear_config()


def _train_value(name: str) -> int:
    """`train.<name>` as bound in the parsed gin config, else `flowrl.train.train`'s default (0 if none)."""
    import inspect

    import gin

    import flowrl.train

    try:
        return int(gin.query_parameter(f"train.{name}"))
    except ValueError:
        parameter = inspect.signature(flowrl.train.train).parameters.get(name)
        return int(parameter.default) if parameter is not None else 0


def expand_cells(spec: SweepSpec, out: str | os.PathLike[str]) -> list[Cell]:
    """All cells of the grid, in (method, domain, task, variant) order, each with its parsed config.

    Parsing every cell's gin config here means a bad config fails before any run starts; the error
    names the cell and the spec.
    """
    out = Path(out).expanduser().absolute()
    cells = []
    for method in spec.methods:
        for domain in spec.domains:
            files = tuple(f.strip().format(method=method, domain=domain) for f in spec.config.split(";") if f.strip())
            for task in spec.tasks:
                env_name = env_name_for(domain, task)
                for variant, variant_bindings in spec.variants.items():
                    bindings = (*spec.bindings, *spec.domain_bindings.get(domain, ()),
                                *spec.method_bindings.get(method, ()), *variant_bindings,
                                f"train.env_name = '{env_name}'")
                    try:
                        text, steps = _parse_cell_config(files, bindings)
                    except FlowRLError as e:
                        raise SweepSpecError(f"{spec.path}: cell (method={method}, domain={domain}, task={task}, "
                                             f"variant={variant}): {_one_line(e)}") from None
                    digest = config_fingerprint(text)
                    directory = out / method / env_name / f"{variant}-{digest[:12]}"
                    cells.append(Cell(method, domain, task, variant, env_name, files, bindings, spec.seeds,
                                      digest, steps, directory))
    return cells


def _one_line(error: BaseException | str) -> str:
    text = str(error).split("In call to configurable")[0]  # gin's appended call trail
    return " ".join(text.split()) or type(error).__name__


def cell_status(cell: Cell) -> tuple[str, tuple[int, ...]]:
    """('done' | 'partial' | 'new', seeds still to run): done = every seed has done.json."""
    todo = tuple(s for s in cell.seeds if not (cell.seed_dir(s) / DONE_FILE).is_file())
    if not todo:
        return "done", todo
    started = any((cell.seed_dir(s) / "run.json").is_file() for s in cell.seeds)
    return ("partial" if started or len(todo) < len(cell.seeds) else "new"), todo


# --------------------------------------------------------------------------------------------
# Running one cell (in a Ray worker or in-process)


def _call_hook(payload: dict[str, Any], attempt: int) -> None:
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    module_name, _, function_name = spec.partition(":")
    hook: Callable[[dict[str, Any], int], None] = getattr(importlib.import_module(module_name), function_name)
    hook(payload, attempt)


def _next_attempt(directory: Path) -> int:
    path = directory / ATTEMPTS_FILE
    try:
        attempts = int(json.loads(path.read_text())["attempts"])
    except (OSError, ValueError, KeyError, TypeError):
        attempts = 0
    write_json_atomic(path, {"attempts": attempts + 1})
    return attempts + 1


def run_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Train the seeds of one cell that have no done.json yet; return a plain-data result.

    Parses the cell's gin config afresh (gin state is per process and a worker runs many cells),
    checks that it hashes to the cell's `config_hash` (a machine with other configs or another
    flowrl version would otherwise write into the wrong cell), then trains with `resume=True`.
    A `FlowRLError` is returned as a failed result (not retried: it would fail again); other
    exceptions propagate so the engine can retry.
    """
    import gin

    directory = Path(payload["directory"])
    directory.mkdir(parents=True, exist_ok=True)
    attempt = _next_attempt(directory)
    started = time.perf_counter()
    result: dict[str, Any] = {"directory": str(directory), "attempt": attempt, "seeds": [], "status": "done"}
    try:
        _call_hook(payload, attempt)
        from flowrl.cli import parse_gin

        gin.clear_config()
        config_text = parse_gin(payload["config_files"], payload["bindings"])
        digest = config_fingerprint(config_text)
        if digest != payload["config_hash"]:
            raise SweepError(
                f"{directory}: the config parsed on this machine hashes to {digest[:12]}, the driver's to "
                f"{payload['config_hash'][:12]}; run the same flowrl version and experiments/ on every node"
            )
        seeds = [s for s in payload["seeds"] if not (directory / f"seed{s}" / DONE_FILE).is_file()]
        run_dirs = [directory / f"seed{s}" for s in seeds]
        summaries = _train_seeds(run_dirs, seeds, config_text)
        for seed, run_dir, summary in zip(seeds, run_dirs, summaries, strict=True):
            done = {
                "seed": seed,
                "final_step": summary.get("final_step"),
                "start_step": summary.get("start_step"),
                "success": summary.get("success"),
                "train_seconds": summary.get("train_seconds"),
                "attempt": attempt,
                "config_hash": payload["config_hash"],
            }
            write_json_atomic(run_dir / DONE_FILE, done)
            result["seeds"].append(done)
    except FlowRLError as e:
        result.update(status="failed", error=f"{type(e).__name__}: {_one_line(e)}")
    finally:
        gin.clear_config()
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _train_seeds(run_dirs: list[Path], seeds: list[int], config_text: str) -> list[dict[str, Any]]:
    """All seeds through `train_many` (one process; one compiled step, or a vmap over seeds on a GPU) if
    flowrl has it, else one `train` after another."""
    import flowrl.train as train_module

    from flowrl.ogbench.generate import DatasetExistsError

    if not seeds:
        return []
    train_many = getattr(train_module, "train_many", None)

    def train_all() -> list[dict[str, Any]]:
        if train_many is not None and len(seeds) > 1:
            return list(train_many(run_dirs, seeds, resume=True, config_text=config_text, progress=False))
        return [train_module.train(run_dir, seed=seed, resume=True, config_text=config_text, progress=False)
                for run_dir, seed in zip(run_dirs, seeds, strict=True)]

    try:
        return train_all()
    except DatasetExistsError:
        # `train.generate_if_missing`: another cell generated the same dataset at the same time
        # (generation is deterministic and its files are replaced atomically). Nothing has been
        # written to the run directories yet; this time the dataset loads.
        return train_all()


# --------------------------------------------------------------------------------------------
# Engines


def worker_env(cpus: float, gpus: float) -> dict[str, str]:
    """Environment of a cell's worker: JAX sized to the task's request (module docstring)."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    if gpus <= 0:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{GPU_MEMORY_HEADROOM * min(gpus, 1.0):.3f}"
    return env


def _serial_engine(cells: Sequence[Cell], retries: int, report: Callable[[Cell, dict], None]) -> None:
    for cell in cells:
        for attempt in range(retries + 1):
            try:
                result = run_cell(cell.payload())
                break
            except Exception as e:  # noqa: BLE001 — anything but a user error is retried
                result = {"directory": str(cell.directory), "status": "failed",
                          "error": f"{type(e).__name__}: {_one_line(e)}", "seeds": []}
                if attempt < retries:
                    print(f"flowrl sweep: {cell.label}: attempt {attempt + 1} failed ({result['error']}); retrying",
                          file=sys.stderr)
                else:
                    traceback.print_exc()
        report(cell, result)


def _ray_engine(cells: Sequence[Cell], *, retries: int, cpus: float, gpus: float, address: str | None,
                max_parallel: int | None, report: Callable[[Cell, dict], None],
                init_kwargs: Mapping[str, Any] | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise SweepError("the ray engine needs Ray: pip install 'ray>=2.40' (or use --engine serial)") from None

    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"include_dashboard": False, **(init_kwargs or {})}
        with warnings.catch_warnings():
            # Ray starts its processes with fork+exec; Python warns because JAX's threads exist
            # in this process, but exec replaces the child at once, so nothing can deadlock.
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"attach to the Ray cluster at {address}" if address else "start a local Ray instance"
                raise SweepError(f"could not {where}: {_one_line(str(e).splitlines()[0] if str(e) else e)}; "
                                 "check that the cluster runs (`ray status`) and see docs/sweeps.md") from None
    try:
        remote = ray.remote(run_cell).options(
            num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=True,
            runtime_env={"env_vars": worker_env(cpus, gpus)}, name="flowrl-sweep-cell",
        )
        pending = list(cells)
        running: dict[Any, Cell] = {}
        limit = max_parallel or len(pending) or 1
        while pending or running:
            while pending and len(running) < limit:
                cell = pending.pop(0)
                running[remote.remote(cell.payload())] = cell
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                cell = running.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 — retries exhausted (task error or worker death)
                    result = {"directory": str(cell.directory), "status": "failed", "seeds": [],
                              "error": f"{type(e).__name__}: {_one_line(str(e).splitlines()[0] if str(e) else e)}"}
                report(cell, result)
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(spec: SweepSpec, out: str | os.PathLike[str], *, engine: str = "ray", address: str | None = None,
              max_parallel: int | None = None, retries: int | None = None, cpus: float | None = None,
              gpus: float | None = None, ray_init_kwargs: Mapping[str, Any] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell of `spec` that is not done; return the summary also written to `<out>/sweep.json`.

    Summary: {"spec", "engine", "cells": [per-cell {directory, method, env_name, variant, status,
    seeds_run, error?, wall_seconds?}], "counts": {"skipped", "ran", "failed"}, "wall_seconds"}.
    """
    if engine not in ("ray", "serial"):
        raise SweepSpecError(f"--engine {engine!r}: use 'ray' or 'serial'")
    retries = spec.retries if retries is None else retries
    cpus = spec.cpus if cpus is None else cpus
    gpus = spec.gpus if gpus is None else gpus
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    cells = expand_cells(spec, out)
    todo, records = [], {}
    for cell in cells:
        status, seeds = cell_status(cell)
        record = {"directory": str(cell.directory), "method": cell.method, "env_name": cell.env_name,
                  "variant": cell.variant, "seeds": list(cell.seeds), "status": "skipped" if status == "done"
                  else "pending", "seeds_run": []}
        records[str(cell.directory)] = record
        if status != "done":
            cell.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cell.directory / CELL_FILE, {"spec": str(spec.path), "spec_name": spec.name,
                                                           **cell.payload()})
            todo.append(cell)
    log(f"flowrl sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
        f"({engine} engine) -> {out}")
    summary: dict[str, Any] = {"spec": str(spec.path), "engine": engine, "out": str(out)}

    def write_summary() -> None:
        summary["cells"] = list(records.values())
        summary["counts"] = {k: sum(r["status"] == v for r in records.values())
                             for k, v in (("skipped", "skipped"), ("ran", "done"), ("failed", "failed"),
                                          ("pending", "pending"))}
        summary["wall_seconds"] = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / SWEEP_FILE, summary)

    finished = 0

    def report(cell: Cell, result: dict[str, Any]) -> None:
        nonlocal finished
        finished += 1
        record = records[str(cell.directory)]
        attempts = result.get("attempt")
        if attempts is None:  # the worker died: it could not report; its attempts file knows
            try:
                attempts = int(json.loads((cell.directory / ATTEMPTS_FILE).read_text())["attempts"])
            except (OSError, ValueError, KeyError, TypeError):
                attempts = None
        record.update(status=result["status"], seeds_run=[s["seed"] for s in result.get("seeds", [])],
                      wall_seconds=result.get("wall_seconds"), attempts=attempts)
        if result.get("error"):
            record["error"] = result["error"]
        write_summary()
        what = result["status"] if result["status"] != "failed" else f"FAILED: {result.get('error')}"
        log(f"[{finished}/{len(todo)}] {cell.label}: {what}")

    write_summary()
    if todo:
        if engine == "serial":
            _serial_engine(todo, retries, report)
        else:
            _ray_engine(todo, retries=retries, cpus=cpus, gpus=gpus, address=address, max_parallel=max_parallel,
                        report=report, init_kwargs=ray_init_kwargs)
    write_summary()
    counts = summary["counts"]
    log(f"flowrl sweep: {counts['ran']} ran, {counts['skipped']} skipped (done), {counts['failed']} failed "
        f"in {summary['wall_seconds']:.1f} s")
    return summary


# --------------------------------------------------------------------------------------------
# Cost estimate


@dataclasses.dataclass(frozen=True)
class CostTable:
    """Seconds per update per method on one device kind ('cpu': CPU-seconds; 'gpu': wall seconds on one GPU)."""

    device: str
    seconds_per_update: Mapping[str, float]
    source: str


def _read_cost_table(name: str, data: Any) -> CostTable:
    """A shipped table ({device, seconds_per_update: {method: s}, source}) or a `flowrl bench --json` output."""
    if isinstance(data, dict) and isinstance(data.get("seconds_per_update"), dict):
        device = str(data.get("device", "cpu"))
        table = data["seconds_per_update"]
        source = str(data.get("source", name))
    elif isinstance(data, dict) and isinstance(data.get("extractors"), list):
        device = "gpu" if not str(data.get("device", "cpu")).startswith("cpu") else "cpu"
        column = "cpu_seconds_per_update" if device == "cpu" else "ms_per_update"
        scale = 1.0 if device == "cpu" else 1e-3
        try:
            table = {row["extractor"]: float(row[column]) * scale for row in data["extractors"]}
        except (KeyError, TypeError, ValueError):
            raise SweepSpecError(f"{name}: rows of 'extractors' need 'extractor' and '{column}'; pass the file "
                                 "`flowrl bench --json` wrote") from None
        source = f"{name} ({data.get('device', '?')}, {data.get('command', 'flowrl bench')})"
    else:
        raise SweepSpecError(f"{name}: not a cost table (needs 'seconds_per_update' or the 'extractors' list of "
                             "`flowrl bench --json`)")
    if not all(isinstance(v, int | float) and v > 0 for v in table.values()):
        raise SweepSpecError(f"{name}: every seconds-per-update value must be a number > 0")
    return CostTable(device=device if device in ("cpu", "gpu") else "cpu", seconds_per_update=dict(table),
                     source=source)


def load_cost_tables(paths: Sequence[str | os.PathLike[str]] = ()) -> dict[str, CostTable]:
    """{'cpu': table, 'gpu': table} — shipped tables first, then `paths` (bench JSON files) override."""
    tables: dict[str, CostTable] = {}
    for resource in (COST_TABLE_RESOURCE, GPU_COST_TABLE_RESOURCE):
        node = importlib_resources.files("flowrl.resources").joinpath(resource)
        if node.is_file():
            table = _read_cost_table(f"flowrl/resources/{resource}", json.loads(node.read_text()))
            tables[table.device] = table
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SweepSpecError(f"--cost-table {path}: cannot read JSON ({e}); pass a `flowrl bench --json` "
                                 "output") from None
        table = _read_cost_table(str(path), data)
        tables[table.device] = table
    return tables


def estimate_cost(cells: Iterable[Cell], tables: Mapping[str, CostTable], *,
                  only_todo: bool = False) -> dict[str, Any]:
    """Device-hours for the cells: Σ seeds × updates × seconds/update(method), per device kind.

    Updates = `train.offline_steps + train.online_steps` (an online step is one update and one env step;
    the env steps are not in the table's cost).

    Methods missing from a table make that device's total a lower bound and are listed.
    """
    totals: dict[str, Any] = {"runs": 0, "updates": 0}
    per_method: dict[str, dict[str, float]] = {}
    missing: dict[str, set[str]] = {"cpu": set(), "gpu": set()}
    hours = {"cpu": 0.0, "gpu": 0.0}
    for cell in cells:
        seeds = cell_status(cell)[1] if only_todo else cell.seeds
        updates = len(seeds) * cell.steps
        totals["runs"] += len(seeds)
        totals["updates"] += updates
        row = per_method.setdefault(cell.method, {"runs": 0, "cpu_hours": 0.0, "gpu_hours": 0.0})
        row["runs"] += len(seeds)
        for device in ("cpu", "gpu"):
            table = tables.get(device)
            cost = None if table is None else table.seconds_per_update.get(cell.method)
            if cost is None:
                missing[device].add(cell.method)
                row[f"{device}_hours"] = float("nan")
                continue
            hours[device] += updates * cost / 3600
            row[f"{device}_hours"] += updates * cost / 3600
    for device in ("cpu", "gpu"):
        table = tables.get(device)
        if table is None:
            totals[f"{device}_hours"] = None
            totals[f"{device}_note"] = (f"no measured {device.upper()} cost table; run `flowrl bench --json FILE` "
                                        f"on the {device.upper()} and pass --cost-table FILE")
        else:
            totals[f"{device}_hours"] = hours[device]
            totals[f"{device}_note"] = (f"from {table.source}" + (f"; no cost for {', '.join(sorted(missing[device]))}"
                                        " (total is a lower bound)" if missing[device] else ""))
    totals["per_method"] = per_method
    return totals


def _format_hours(hours: float | None, device: str) -> str:
    unit = "CPU-core-hours" if device == "cpu" else "GPU-hours"
    if hours is None or hours != hours:
        return "unknown"
    if hours >= 24 * 365:
        return f"{hours:,.0f} {unit} (~{hours / (24 * 365):,.0f} {unit.removesuffix('-hours')}-years)"
    return f"{hours:,.2f} {unit}" if hours < 100 else f"{hours:,.0f} {unit}"


def _dry_run(spec: SweepSpec, out: Path, cost_tables: Sequence[str]) -> int:
    cells = expand_cells(spec, out)
    tables = load_cost_tables(cost_tables)
    print(f"{'method':<12} {'env':<46} {'variant':<10} {'seeds':<10} {'steps':>9} {'hash':<12} status")
    for cell in cells:
        status, todo = cell_status(cell)
        seeds = _format_seeds(cell.seeds)
        print(f"{cell.method:<12} {cell.env_name:<46} {cell.variant:<10} {seeds:<10} {cell.steps:>9} "
              f"{cell.config_hash[:12]:<12} {status}{f' ({len(todo)} seeds to run)' if status == 'partial' else ''}")
    full = estimate_cost(cells, tables)
    todo = estimate_cost(cells, tables, only_todo=True)
    print(f"\n{len(cells)} cells, {full['runs']} runs ({full['updates']:,} updates) -> {out}")
    print(f"{'method':<12} {'runs':>6} {'CPU-hours':>12} {'GPU-hours':>10}")
    for method, row in full["per_method"].items():
        cpu, gpu = (f"{row[f'{d}_hours']:.1f}" if d in tables and row[f"{d}_hours"] == row[f"{d}_hours"]
                    else "unknown" for d in ("cpu", "gpu"))  # NaN: method missing from the table
        print(f"{method:<12} {row['runs']:>6} {cpu:>12} {gpu:>10}")
    for device in ("cpu", "gpu"):
        print(f"estimated {device.upper()} cost, whole grid: {_format_hours(full[f'{device}_hours'], device)}; "
              f"still to run: {_format_hours(todo[f'{device}_hours'], device)} — {full[f'{device}_note']}")
    print("(training updates only, at the table's network sizes: evaluation, under 1% at the paper's settings, "
          "and online env steps are not included)")
    return 0


def _format_seeds(seeds: Sequence[int]) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


# --------------------------------------------------------------------------------------------
# CLI


def _cli_sweep(args: argparse.Namespace) -> int:
    spec = apply_subset(load_spec(args.spec), args.subset)
    out = Path(args.out or spec.out or Path("runs") / spec.name)
    if args.dry_run:
        return _dry_run(spec, out, args.cost_table)
    for flag, value in (("--max-parallel", args.max_parallel), ("--retries", args.retries)):
        if value is not None and value < (1 if flag == "--max-parallel" else 0):
            raise SweepSpecError(f"{flag} {value}: must be >= {1 if flag == '--max-parallel' else 0}")
    if args.engine == "serial" and args.address:
        raise SweepSpecError("--address needs --engine ray")
    summary = run_sweep(spec, out, engine=args.engine, address=args.address, max_parallel=args.max_parallel,
                        retries=args.retries, cpus=args.cpus_per_task, gpus=args.gpus_per_task)
    return 1 if summary["counts"]["failed"] else 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("sweep", help="run a grid of methods x tasks x seeds on Ray (or in-process)",
                                   description="Run a sweep spec (docs/sweeps.md). Finished cells are skipped, "
                                   "partial ones resumed, failed ones retried.")
    parser.add_argument("spec", metavar="SPEC.yaml", help="sweep spec, e.g. experiments/paper/grid.yaml")
    parser.add_argument("--engine", choices=("ray", "serial"), default="ray",
                        help="ray: one Ray task per cell (default); serial: in this process, one cell at a time")
    parser.add_argument("--address", help="Ray cluster to attach to (e.g. auto, HOST:6379); default: start a "
                        "local Ray instance")
    parser.add_argument("--max-parallel", type=int, help="at most N cells in flight (default: as many as fit)")
    parser.add_argument("--out", help="output directory (default: the spec's 'out', else runs/<spec name>)")
    parser.add_argument("--subset", action="append", default=[], metavar="KEY=V1,V2",
                        help="keep only these methods, domains, tasks, seeds or variants (repeatable)")
    parser.add_argument("--retries", type=int, help="retries of a failed cell within this invocation "
                        "(default: the spec's 'retries', else 2)")
    parser.add_argument("--cpus-per-task", type=float, help="CPUs each cell requests (default: spec resources.cpus)")
    parser.add_argument("--gpus-per-task", type=float, help="GPUs each cell requests, may be fractional "
                        "(default: spec resources.gpus); JAX's GPU memory fraction follows it")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their estimated cost, run nothing")
    parser.add_argument("--cost-table", action="append", default=[], metavar="BENCH.json",
                        help="`flowrl bench --json` output to estimate costs with (CPU or GPU; repeatable)")
    parser.set_defaults(func=_cli_sweep)
    return parser
