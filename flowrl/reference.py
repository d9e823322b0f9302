"""The published results of QAM (Li & Levine, ICLR 2026) as a library resource (METHODS.md §10).

Data: the qam repo's `exp_data` (commit f93efd2, MIT), shipped compactly in `flowrl/resources/`
(provenance and format in `flowrl/resources/README.md`). Every entry is a success-rate array of shape
(points, seeds) = (30, 12) — point j at training step (j+1)·50K, j = 19 the end of the 1M-step offline
phase, j = 29 the end of the 500K-step online phase — or (10, 12) for RLPD, which ran online only and
whose points the data places at 1M + online step.

Three studies ("sources"): `main` (50 tasks, 10 domains, `all`), `quality` (stitch / noisy datasets) and
`sensitivity` (QAM-E variants on 10 tasks, `all-rep`).

Names are forgiving: methods may be given as in the paper (`QAM-E`) or as flowrl extractor registry names
(`qam-edit`); keys as OGBench env names (`cube-double-play-singletask-task2-v0`), without the version,
without `singletask` (`cube-double-play-task2`), as the default-task env
(`cube-double-play-singletask-v0` → task2, OGBench's default), as domains (`cube-double-play`) or with
the `-sparse` tag used for sparse-reward runs (dropped: the paper's keys have no "-sparse").

Public API: `load_paper_curves`, `paper_curve`, `paper_final`, `resolve_method`, `resolve_key`,
`paper_methods`, `paper_keys`.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import re
from dataclasses import dataclass
from importlib import resources

import numpy as np

from flowrl.errors import FlowRLError

__all__ = [
    "EVAL_INTERVAL",
    "OFFLINE_END_INDEX",
    "PAPER_OFFLINE_STEPS",
    "PAPER_ONLINE_STEPS",
    "REGISTRY_TO_PAPER",
    "SOURCES",
    "PaperCurve",
    "PaperFinal",
    "PaperReferenceError",
    "UnknownMethodError",
    "load_paper_curves",
    "paper_curve",
    "paper_final",
    "paper_keys",
    "paper_methods",
    "resolve_key",
    "resolve_method",
]

SOURCES = ("main", "quality", "sensitivity")
EVAL_INTERVAL = 50_000  # the paper evaluates every 50K steps (METHODS.md §1.1)
PAPER_OFFLINE_STEPS = 1_000_000
PAPER_ONLINE_STEPS = 500_000
OFFLINE_END_INDEX = 19  # point 19 = step 1M = end of offline training

CURVES_FILE = "paper_curves.csv.gz"
FINAL_FILE = "paper_final_success.csv"
CURVE_COLUMNS = ("source", "key", "method", "step", "phase", "seed", "success")

# flowrl extractor registry name -> method name used in the paper's data (METHODS.md §4-5).
REGISTRY_TO_PAPER: dict[str, str] = {
    "qam": "QAM",
    "qam-edit": "QAM-E",
    "qam-fql": "QAM-F",
    "bam": "BAM",
    "fbrac": "FBRAC",
    "fawac": "FAWAC",
    "cgql": "CGQL",
    "cgql-mse": "CGQL-M",
    "cgql-linex": "CGQL-L",
    "qsm": "QSM",
    "dac": "DAC",
    "dsrl": "DSRL",
    "ifql": "IFQL",
    "fedit": "FEdit",
    "fql": "FQL",
    "rebrac": "ReBRAC",
    "rlpd": "RLPD",
}

# OGBench's default task for `<domain>-singletask-v0` (ogbench 1.2.2: locomaze/maze.py,
# manipspace/envs/{cube,scene,puzzle}_env.py set reward_task_id when it is 0). First matching prefix wins.
_DEFAULT_TASK_BY_PREFIX: tuple[tuple[str, int], ...] = (
    ("pointmaze", 1),
    ("antmaze", 1),
    ("humanoidmaze", 1),
    ("antsoccer", 4),
    ("cube", 2),
    ("scene", 2),
    ("puzzle-3x3", 4),
    ("puzzle-4x4", 4),
    ("puzzle-4x5", 2),
    ("puzzle-4x6", 2),
)


class PaperReferenceError(FlowRLError):
    """Bad request to, or corrupt data in, the shipped paper reference tables."""


class UnknownMethodError(PaperReferenceError):
    """A method name that is neither a paper method nor a flowrl registry name."""


@dataclass(frozen=True, eq=False)
class PaperCurve:
    """One (source, key, method) entry of the paper's data.

    `steps` (points,) int64: training step on the paper's shared axis (see module docstring).
    `phases` (points,): "offline" / "online".
    `success` (points, seeds) float64: evaluation success rate per seed column (read-only).
    """

    source: str
    key: str
    method: str
    steps: np.ndarray
    phases: np.ndarray
    success: np.ndarray

    @property
    def n_points(self) -> int:
        return int(self.success.shape[0])

    @property
    def n_seeds(self) -> int:
        return int(self.success.shape[1])

    @property
    def online_only(self) -> bool:
        """True for runs without an offline phase (RLPD)."""
        return bool(np.all(self.phases == "online"))

    def seed_mean(self) -> np.ndarray:
        """Mean over seeds, shape (points,)."""
        return self.success.mean(axis=1)

    def seed_std(self) -> np.ndarray:
        """Sample std over seeds (ddof=1, as in paper_final_success.csv), shape (points,)."""
        return self.success.std(axis=1, ddof=1)


@dataclass(frozen=True)
class PaperFinal:
    """End-of-phase success of one entry (`paper_final_success.csv`): mean/std(ddof=1)/sem over seeds.

    `offline_*` is at 1M offline steps (point 19) and None for RLPD (online only); `online_*` is at the
    end of 500K online steps (point 29, RLPD point 9).
    """

    source: str
    key: str
    method: str
    n_points: int
    n_seeds: int
    offline_mean: float | None
    offline_std: float | None
    offline_sem: float | None
    online_mean: float
    online_std: float
    online_sem: float


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise PaperReferenceError(f"unknown paper data source {source!r}; use one of {', '.join(SOURCES)}")


def _open_resource_text(name: str) -> io.StringIO:
    """The decoded text of a shipped resource (read whole: works from a zipped wheel, leaves no handle open)."""
    data = resources.files("flowrl.resources").joinpath(name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return io.StringIO(data.decode("utf-8"), newline="")


@functools.cache
def _curves(source: str) -> dict[tuple[str, str], PaperCurve]:
    """Parse one source's rows of the shipped curves file into per-entry arrays (cached per process)."""
    rows: dict[tuple[str, str], list[tuple[int, str, int, float]]] = {}
    with _open_resource_text(CURVES_FILE) as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader))
        if header != CURVE_COLUMNS:
            raise PaperReferenceError(
                f"flowrl/resources/{CURVES_FILE}: header {header} != {CURVE_COLUMNS}; "
                "rebuild it with `python -m flowrl.resources.build_reference`"
            )
        for src, key, method, step, phase, seed, success in reader:
            if src == source:
                rows.setdefault((key, method), []).append((int(step), phase, int(seed), float(success)))
    curves = {}
    for (key, method), entry in sorted(rows.items()):
        steps = np.array(sorted({r[0] for r in entry}), dtype=np.int64)
        n_seeds = max(r[2] for r in entry) + 1
        success = np.full((steps.size, n_seeds), np.nan)
        phases = np.empty(steps.size, dtype=object)
        point_of = {int(s): i for i, s in enumerate(steps)}
        for step, phase, seed, value in entry:
            success[point_of[step], seed] = value
            phases[point_of[step]] = phase
        if len(entry) != success.size or np.isnan(success).any():
            raise PaperReferenceError(
                f"flowrl/resources/{CURVES_FILE}: ({source}, {key}, {method}) is not a complete "
                f"{steps.size}x{n_seeds} grid; rebuild it with `python -m flowrl.resources.build_reference`"
            )
        phases = phases.astype(str)
        for array in (steps, phases, success):
            array.setflags(write=False)  # cached and shared between callers
        curves[(key, method)] = PaperCurve(source, key, method, steps, phases, success)
    return curves


@functools.cache
def _finals() -> dict[tuple[str, str, str], PaperFinal]:
    def opt(text: str) -> float | None:
        return float(text) if text.strip() else None

    finals = {}
    with _open_resource_text(FINAL_FILE) as fh:
        for row in csv.DictReader(fh):
            entry = PaperFinal(
                source=row["source"],
                key=row["key"],
                method=row["method"],
                n_points=int(row["n_points"]),
                n_seeds=int(row["n_seeds"]),
                offline_mean=opt(row["offline_mean"]),
                offline_std=opt(row["offline_std"]),
                offline_sem=opt(row["offline_sem"]),
                online_mean=float(row["online_mean"]),
                online_std=float(row["online_std"]),
                online_sem=float(row["online_sem"]),
            )
            finals[(entry.source, entry.key, entry.method)] = entry
    return finals


def load_paper_curves(source: str = "main") -> dict[tuple[str, str], PaperCurve]:
    """All entries of one study as {(key, paper method name): PaperCurve} (sorted; arrays read-only)."""
    _check_source(source)
    return dict(_curves(source))


def paper_methods(source: str | None = None) -> tuple[str, ...]:
    """Paper method names present in `source` (all sources if None), sorted."""
    if source is not None:
        _check_source(source)
    return tuple(sorted({m for s, _, m in _finals() if source is None or s == source}))


def paper_keys(source: str = "main") -> tuple[str, ...]:
    """Keys (tasks, domains, `all`/`all-rep`) present in `source`, sorted."""
    _check_source(source)
    return tuple(sorted({k for s, k, _ in _finals() if s == source}))


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def resolve_method(method: str) -> str:
    """Paper method name for a paper name (any case, `_` or `-`) or a flowrl registry name.

    Raises UnknownMethodError (one line, listing the valid names) for anything else.
    """
    known = paper_methods()
    if method in known:
        return method
    wanted = _normalise_name(method)
    if wanted in REGISTRY_TO_PAPER:
        return REGISTRY_TO_PAPER[wanted]
    by_normalised = {_normalise_name(m): m for m in known}
    if wanted in by_normalised:
        return by_normalised[wanted]
    raise UnknownMethodError(
        f"unknown method {method!r} for the paper reference; use a paper name "
        f"({', '.join(known)}) or a flowrl registry name ({', '.join(REGISTRY_TO_PAPER)})"
    )


def _default_task(domain: str) -> int | None:
    for prefix, task in _DEFAULT_TASK_BY_PREFIX:
        if domain.startswith(prefix):
            return task
    return None


def _canonical_key(env_or_key: str) -> str | None:
    """Map an env/key spelling to the paper's key convention (not checked against the data).

    `<domain>[-sparse][-singletask][-taskN][-vK]` → `<domain>-singletask-taskN-v0`; without taskN but with
    `singletask`, OGBench's default task; a bare `<domain>` stays the domain. A versioned name without
    `singletask` (`cube-double-play-v0`) is OGBench's goal-conditioned env, which the paper did not run: None.
    """
    tokens = [t for t in env_or_key.strip().lower().split("-") if t and t != "sparse"]
    versioned = bool(tokens) and re.fullmatch(r"v\d+", tokens[-1]) is not None
    if versioned:
        tokens.pop()
    task = tokens.pop() if tokens and re.fullmatch(r"task\d+", tokens[-1]) else None
    singletask = bool(tokens) and tokens[-1] == "singletask"
    if singletask:
        tokens.pop()
    domain = "-".join(tokens)
    if task is None and singletask:
        default = _default_task(domain)
        task = None if default is None else f"task{default}"
    if task is not None:
        return f"{domain}-singletask-{task}-v0"
    return None if versioned or singletask else domain


def resolve_key(env_or_key: str, source: str = "main") -> str | None:
    """The key of `source` that `env_or_key` names (see module docstring for spellings), or None."""
    _check_source(source)
    keys = set(paper_keys(source))
    without_sparse = "-".join(t for t in env_or_key.strip().lower().split("-") if t != "sparse")
    for candidate in (env_or_key, without_sparse, _canonical_key(env_or_key)):
        if candidate in keys:
            return candidate
    return None


def paper_curve(env_or_key: str, method: str, source: str = "main") -> tuple[np.ndarray, np.ndarray] | None:
    """(steps (points,), per-seed success (points, seeds)) of the paper, or None if it has no such entry.

    Steps are on the paper's shared axis (RLPD: 1M + online step). Raises UnknownMethodError for a method
    name that is not known at all; a known method without data for this key/source gives None.
    """
    paper_method = resolve_method(method)
    key = resolve_key(env_or_key, source)
    if key is None:
        return None
    curve = _curves(source).get((key, paper_method))
    if curve is None:
        return None
    return curve.steps.copy(), curve.success.copy()


def paper_final(env_or_key: str, method: str, source: str = "main") -> PaperFinal | None:
    """Success at 1M offline steps / end of online training from `paper_final_success.csv`, or None."""
    paper_method = resolve_method(method)
    key = resolve_key(env_or_key, source)
    if key is None:
        return None
    return _finals().get((source, key, paper_method))

