"""`flowrl report RUNS_DIR`: success of finished runs per task, domain and method, beside the paper.

    flowrl report RUNS_DIR [--out DIR] [--steps S1,S2] [--reps N] [--seed S] [--no-paper]

Runs are found anywhere under RUNS_DIR (a `flowrl sweep` output or any tree of `flowrl train` run
directories): a directory with `run.json` and an evaluation log (`logs/eval.csv`, read by
`flowrl.plot.load_run`). A run is *finished* when it has the sweep's `done.json` or an evaluation
at its `offline_steps`; unfinished runs are listed and left out. The method of a run is the sweep
cell's method (`cell.json` beside the seed directories; a non-default variant is appended as
`method[variant]`), else the `extractor` of its run.json. Domain: the env name without
`-singletask-taskN-vK`.

At each chosen step (`--steps`; default: the last step every finished run has evaluated) the score
of a run is its `eval/success` logged at exactly that step. Reported:

- per task and method: mean, std (ddof=1) over seeds, the per-seed values, and the paper's seed
  mean at the same step (when the paper evaluated it: multiples of 50K) and at the end of its 1M
  offline steps (`flowrl.reference`, METHODS.md §10);
- per domain and method: the mean over the domain's tasks of the per-task seed means;
- per method, across tasks: mean and interquartile mean (IQM) with 95% stratified-bootstrap
  confidence intervals (bootstrap over runs within each task), and the performance profile
  (fraction of runs with success > τ) with its bootstrap band — computed with `rliable`
  (Agarwal et al., NeurIPS 2021), on the tasks every method has, with the same number of seeds
  per task (the lowest seeds kept; what is dropped is listed);
- learning curves per domain: each method's seed mean (band: min–max over seeds) with the paper's
  seed mean ± 1 std dashed; runs much shorter than the paper's 1M offline steps instead get the
  paper's 1M value as a dotted line for scale.

Output in `--out` (default RUNS_DIR/report): `report.md` (tables + PNG figures, readable without
running anything), `scores.csv` (one row per run and chosen step: the numbers every table is built
from), `aggregates.json` and the PNGs. All files are written atomically. rliable's bootstrap draws
from NumPy's global RNG; it is seeded with `--seed` and restored afterwards, so a report is
reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowrl import reference
from flowrl.errors import FlowRLError, MetricsError, RunDirError
from flowrl.rundir import RUN_FILE, atomic_write_bytes, write_json_atomic, write_text_atomic

__all__ = ["ReportError", "RunResult", "build_report", "find_runs", "register_cli"]

DEFAULT_REPS = 2000
PROFILE_THRESHOLDS = np.linspace(0.0, 1.0, 41)
_TASK_SUFFIX = re.compile(r"-singletask(-task\d+)?-v\d+$")


class ReportError(FlowRLError):
    """No runs to report on, or a report option that does not fit the runs."""


@dataclass(frozen=True, eq=False)
class RunResult:
    """One run's evaluation curve and what identifies it in the report."""

    run_dir: Path
    method: str  # report label: method, or method[variant]
    base_method: str  # for the paper lookup
    env_name: str
    domain: str
    seed: int
    steps: np.ndarray  # (n,) int64 ascending
    success: np.ndarray  # (n,) float64
    offline_steps: int | None
    finished: bool

    def score_at(self, step: int) -> float | None:
        hits = np.flatnonzero(self.steps == step)
        return None if hits.size == 0 else float(self.success[hits[-1]])


def domain_of(env_name: str) -> str:
    return _TASK_SUFFIX.sub("", env_name)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def find_runs(runs_dir: str | Path) -> tuple[list[RunResult], list[str]]:
    """All run directories under `runs_dir` (sorted by method, env, seed) and notes on skipped ones."""
    from flowrl.plot import load_run

    root = Path(runs_dir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory; pass the output directory of `flowrl sweep` or a "
                          "directory holding run directories")
    runs, notes = [], []
    for run_file in sorted(root.rglob(RUN_FILE)):
        run_dir = run_file.parent
        if any(part.startswith(".") or ".old-" in part for part in run_dir.relative_to(root).parts):
            continue  # moved-aside runs and hidden directories
        info = _read_json(run_file) or {}
        try:
            series, _ = load_run(run_dir)
        except (RunDirError, MetricsError) as e:
            notes.append(f"{run_dir}: skipped ({e})")
            continue
        cell = _read_json(run_dir.parent / "cell.json")
        extractor = info.get("extractor") if isinstance(info.get("extractor"), str) else None
        base = (cell or {}).get("method") or extractor or "unknown"
        variant = (cell or {}).get("variant", "default")
        method = base if variant in ("default", None) else f"{base}[{variant}]"
        env_name = info.get("env_name") if isinstance(info.get("env_name"), str) else None
        seed = info.get("seed")
        if env_name is None or not isinstance(seed, int):
            notes.append(f"{run_file} lacks env_name or seed: skipped")
            continue
        offline, online = (_int_or_none(info.get(k)) for k in ("offline_steps", "online_steps"))
        total = None if offline is None else offline + (online or 0)
        finished = (run_dir / "done.json").is_file() or (
            total is not None and series.steps.size > 0 and int(series.steps[-1]) >= total)
        run = RunResult(run_dir, method, base, env_name, domain_of(env_name), seed, series.steps,
                        series.success, offline, finished)
        if not finished:
            last = int(series.steps[-1]) if series.steps.size else 0
            notes.append(f"{run_dir}: unfinished (last evaluation at step {last} of {total}): left out")
            continue
        runs.append(run)
    runs.sort(key=lambda r: (r.method, r.env_name, r.seed))
    return runs, notes


# --------------------------------------------------------------------------------------------
# Numbers


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """rliable's bootstrap uses np.random's global state: seed it, then put the caller's state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _paper_curve(env_or_key: str, method: str, offline_steps: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The paper's (steps, per-seed success) on this run's step axis, or None.

    The paper's online-only runs (RLPD) sit at 1M + online step on its shared axis; as in
    `flowrl.plot`, they are moved to start where this run's offline phase ends.
    """
    try:
        curve = reference.paper_curve(env_or_key, method)
        paper_method = reference.resolve_method(method)
    except reference.UnknownMethodError:
        return None
    if curve is None:
        return None
    steps, success = curve
    key = reference.resolve_key(env_or_key)
    entry = reference.load_paper_curves().get((key, paper_method)) if key is not None else None
    if entry is not None and entry.online_only:
        steps = steps + (offline_steps or 0) - reference.PAPER_OFFLINE_STEPS
    return steps, success


def _paper_mean(env_or_key: str, method: str, step: int, offline_steps: int | None = None) -> float | None:
    curve = _paper_curve(env_or_key, method, offline_steps)
    if curve is None:
        return None
    steps, success = curve
    hits = np.flatnonzero(steps == step)
    return None if hits.size == 0 else float(success[hits[0]].mean())


def _paper_task_count(domain: str) -> int:
    key = reference.resolve_key(domain)
    if key is None:
        return -1
    return sum(1 for k in reference.paper_keys() if k.startswith(f"{key}-singletask-task"))


def _paper_offline_end(env_or_key: str, method: str) -> float | None:
    try:
        final = reference.paper_final(env_or_key, method)
    except reference.UnknownMethodError:
        return None
    return None if final is None else final.offline_mean


def _score_matrices(runs: Sequence[RunResult], step: int) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """{method: (seeds, tasks) scores at `step`} on common tasks and seed counts; (matrices, tasks, notes)."""
    notes = []
    by_method: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for run in runs:
        score = run.score_at(step)
        if score is not None:
            by_method.setdefault(run.method, {}).setdefault(run.env_name, []).append((run.seed, score))
    if not by_method:
        return {}, [], notes
    all_tasks = sorted({t for tasks in by_method.values() for t in tasks})
    common = [t for t in all_tasks if all(t in tasks for tasks in by_method.values())]
    if len(common) < len(all_tasks):
        notes.append(f"step {step}: aggregates use the {len(common)} tasks every method has; left out: "
                     + ", ".join(t for t in all_tasks if t not in common))
    matrices = {}
    for method, tasks in by_method.items():
        if not common:
            break
        n = min(len(tasks[t]) for t in common)
        if any(len(tasks[t]) > n for t in common):
            notes.append(f"step {step}: {method}: {n} seeds per task used (the lowest seed ids) so every task "
                         "has the same number of runs")
        matrices[method] = np.array([[score for _, score in sorted(tasks[t])[:n]] for t in common]).T
    return matrices, common, notes


def _aggregates(matrices: dict[str, np.ndarray], reps: int, seed: int) -> dict[str, dict[str, Any]]:
    from rliable import library as rly
    from rliable import metrics

    def mean_and_iqm(scores: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(scores), metrics.aggregate_iqm(scores)])

    out: dict[str, dict[str, Any]] = {}
    if not matrices:
        return out
    with _seeded_global_rng(seed):
        points, intervals = rly.get_interval_estimates(matrices, mean_and_iqm, reps=reps)
        profiles, profile_cis = rly.create_performance_profile(matrices, PROFILE_THRESHOLDS, reps=reps)
    for method, scores in matrices.items():
        point, ci = points[method], intervals[method]
        out[method] = {
            "runs_per_task": int(scores.shape[0]), "tasks": int(scores.shape[1]),
            "mean": float(point[0]), "mean_ci": [float(ci[0, 0]), float(ci[1, 0])],
            "iqm": float(point[1]), "iqm_ci": [float(ci[0, 1]), float(ci[1, 1])],
            "profile_thresholds": PROFILE_THRESHOLDS.tolist(),
            "profile": np.asarray(profiles[method], dtype=float).tolist(),
            "profile_ci": np.asarray(profile_cis[method], dtype=float).tolist(),
        }
    return out


# --------------------------------------------------------------------------------------------
# Figures


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _colors(methods: Sequence[str]) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(methods)}


def _plot_aggregates(aggregates: dict[str, dict[str, Any]], step: int, colors: dict[str, str]) -> bytes:
    methods = list(aggregates)
    fig = _figure((9, 0.5 * len(methods) + 1.6))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("mean", "iqm"), ("Mean", "IQM"), strict=True):
        for y, method in enumerate(methods):
            lo, hi = aggregates[method][f"{key}_ci"]
            ax.barh(y, hi - lo, left=lo, height=0.6, color=colors[method], alpha=0.55)
            ax.plot([aggregates[method][key]] * 2, [y - 0.3, y + 0.3], color="k", linewidth=1.5)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xlim(-0.02, 1.02)
        ax.set_title(f"{title} success (95% CI)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"across tasks at step {step:,}", fontsize=11)
    return _png(fig)


def _plot_profiles(aggregates: dict[str, dict[str, Any]], step: int, colors: dict[str, str]) -> bytes:
    fig = _figure((6.5, 4.5))
    ax = fig.subplots()
    for method, agg in aggregates.items():
        tau, profile, ci = np.array(agg["profile_thresholds"]), np.array(agg["profile"]), np.array(agg["profile_ci"])
        ax.plot(tau, profile, color=colors[method], linewidth=2, label=method)
        ax.fill_between(tau, ci[0], ci[1], color=colors[method], alpha=0.2, linewidth=0)
    ax.set_xlabel("success threshold τ")
    ax.set_ylabel("fraction of runs with success > τ")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"performance profile at step {step:,} (95% CI bands)", fontsize=10)
    return _png(fig)


def _plot_domain_curves(runs: Sequence[RunResult], domain: str, colors: dict[str, str], overlay_paper: bool) -> bytes:
    from matplotlib.ticker import FuncFormatter

    from flowrl.plot import _format_step

    envs = sorted({r.env_name for r in runs if r.domain == domain})
    cols = min(len(envs), 5)
    rows = math.ceil(len(envs) / cols)
    fig = _figure((3.6 * cols + 0.4, 3.0 * rows + 1.0))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    run_max = max(int(r.steps[-1]) for r in runs if r.domain == domain and r.steps.size)
    short = run_max < 0.3 * reference.PAPER_OFFLINE_STEPS
    x_max = run_max * 1.03 if short else max(run_max, reference.PAPER_OFFLINE_STEPS) * 1.02
    for ax, env in zip(axes, envs, strict=False):
        methods = sorted({r.method for r in runs if r.env_name == env})
        for method in methods:
            group = [r for r in runs if r.env_name == env and r.method == method]
            steps = sorted(set.intersection(*(set(r.steps.tolist()) for r in group)))
            values = np.array([[r.score_at(s) for s in steps] for r in group], dtype=float)
            ax.plot(steps, values.mean(axis=0), color=colors[method], linewidth=2, marker="o", markersize=3,
                    label=f"{method} ({len(group)} seeds)")
            if len(group) > 1:
                ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=colors[method], alpha=0.2,
                                linewidth=0)
            if not overlay_paper:
                continue
            base = group[0].base_method
            curve = _paper_curve(env, base, group[0].offline_steps)
            if curve is None:
                continue
            paper_steps, paper_success = curve
            if short:
                end = _paper_offline_end(env, base)
                if end is not None:
                    ax.axhline(end, color=colors[method], linestyle=":", linewidth=1.2,
                               label=f"paper {reference.resolve_method(base)} at 1M: {end:.2f}")
            else:
                keep = paper_steps <= x_max
                mean, std = paper_success.mean(axis=1)[keep], paper_success.std(axis=1, ddof=1)[keep]
                ax.plot(paper_steps[keep], mean, color=colors[method], linestyle="--", linewidth=1.3,
                        label=f"paper {reference.resolve_method(base)} (mean ± std)")
                ax.fill_between(paper_steps[keep], np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1),
                                color=colors[method], alpha=0.1, linewidth=0)
        ax.set_title(env.replace(f"{domain}-singletask-", "").replace("-v0", ""), fontsize=9)
        ax.set_xlim(0, x_max)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("training step", fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(_format_step))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6.5, loc="best")
    for ax in axes[len(envs):]:
        ax.set_visible(False)
    axes[0].set_ylabel("eval success rate")
    fig.suptitle(domain, fontsize=11)
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _choose_steps(runs: Sequence[RunResult], steps: Sequence[int] | None) -> list[int]:
    if steps:
        present = set().union(*(set(r.steps.tolist()) for r in runs))
        missing = [s for s in steps if s not in present]
        if missing:
            raise ReportError(f"--steps {missing[0]}: no run evaluated at that step; evaluated steps: "
                              + ", ".join(str(s) for s in sorted(present)[:20]))
        return sorted(steps)
    common = set.intersection(*(set(r.steps.tolist()) for r in runs))
    if not common:
        raise ReportError("the runs share no evaluation step; pass --steps with steps some runs evaluated at")
    return [max(common)]


def build_report(runs_dir: str | Path, out: str | Path | None = None, *, steps: Sequence[int] | None = None,
                 reps: int = DEFAULT_REPS, seed: int = 0, overlay_paper: bool = True) -> Path:
    """Write the report of the finished runs under `runs_dir` into `out` (module docstring); returns report.md."""
    runs_dir = Path(runs_dir)
    out = Path(out) if out is not None else runs_dir / "report"
    runs, notes = find_runs(runs_dir)
    if not runs:
        raise ReportError(f"no finished runs under {runs_dir} (a run needs run.json and logs/eval.csv with an "
                          "evaluation at its offline_steps); run `flowrl sweep` or `flowrl train` first")
    if reps < 10:
        raise ReportError(f"--reps {reps}: use at least 10 bootstrap replications (default {DEFAULT_REPS})")
    chosen = _choose_steps(runs, steps)
    out.mkdir(parents=True, exist_ok=True)
    methods = sorted({r.method for r in runs})
    domains = sorted({r.domain for r in runs})
    envs = sorted({r.env_name for r in runs})
    colors = _colors(methods)

    # scores.csv: the numbers everything else is computed from.
    rows = [{"method": r.method, "domain": r.domain, "env_name": r.env_name, "seed": r.seed, "step": step,
             "success": r.score_at(step), "run_dir": str(r.run_dir)} for step in chosen for r in runs
            if r.score_at(step) is not None]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["method", "domain", "env_name", "seed", "step", "success", "run_dir"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "scores.csv", buffer.getvalue())

    md = [f"# flowrl report: `{runs_dir}`", "",
          f"Built by `flowrl report` on {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC from "
          f"{_count(len(runs), 'finished run')}: {_count(len(methods), 'method')} ({', '.join(methods)}), "
          f"{_count(len(envs), 'task')} in {_count(len(domains), 'domain')}. Scores are `eval/success` at the "
          "step shown; every number below is computed from `scores.csv` in this folder.", ""]
    aggregates_json: dict[str, Any] = {"runs_dir": str(runs_dir), "steps": chosen, "reps": reps, "seed": seed,
                                       "per_step": {}}
    for step in chosen:
        matrices, common, agg_notes = _score_matrices(runs, step)
        notes.extend(agg_notes)
        aggregates = _aggregates(matrices, reps, seed)
        per_task: dict[str, dict[str, Any]] = {}
        for env in envs:
            for method in methods:
                values = [(r.seed, r.score_at(step)) for r in runs if r.env_name == env and r.method == method]
                values = [(s, v) for s, v in values if v is not None]
                if not values:
                    continue
                scores = np.array([v for _, v in values])
                first = next(r for r in runs if r.method == method)
                base = first.base_method
                per_task.setdefault(env, {})[method] = {
                    "seeds": [s for s, _ in values], "scores": scores.tolist(), "mean": float(scores.mean()),
                    "std": float(scores.std(ddof=1)) if scores.size > 1 else None,
                    "paper_same_step": _paper_mean(env, base, step, first.offline_steps) if overlay_paper else None,
                    "paper_offline_end": _paper_offline_end(env, base) if overlay_paper else None,
                }
        per_domain: dict[str, dict[str, float]] = {}
        for domain in domains:
            for method in methods:
                means = [per_task[e][method]["mean"] for e in envs if domain_of(e) == domain and method in per_task[e]]
                if means:
                    per_domain.setdefault(domain, {})[method] = float(np.mean(means))
        aggregates_json["per_step"][str(step)] = {"tasks_in_aggregates": common, "methods": aggregates,
                                                  "per_task": per_task, "per_domain": per_domain}

        md += [f"## Step {step:,}", ""]
        if aggregates:
            md += [f"### Across tasks ({_count(len(common), 'task')}; 95% stratified-bootstrap CIs over runs, rliable, "
                   f"{reps} replications)", "",
                   "| method | tasks | runs/task | mean | mean 95% CI | IQM | IQM 95% CI |",
                   "|---|---|---|---|---|---|---|"]
            for method, agg in aggregates.items():
                md.append(f"| {method} | {agg['tasks']} | {agg['runs_per_task']} | {_fmt(agg['mean'])} | "
                          f"[{_fmt(agg['mean_ci'][0])}, {_fmt(agg['mean_ci'][1])}] | {_fmt(agg['iqm'])} | "
                          f"[{_fmt(agg['iqm_ci'][0])}, {_fmt(agg['iqm_ci'][1])}] |")
            agg_png, prof_png = f"aggregate_step{step}.png", f"profile_step{step}.png"
            atomic_write_bytes(out / agg_png, _plot_aggregates(aggregates, step, colors))
            atomic_write_bytes(out / prof_png, _plot_profiles(aggregates, step, colors))
            md += ["", f"![mean and IQM at step {step}]({agg_png})", "",
                   f"![performance profile at step {step}]({prof_png})", ""]
        md += ["### Per domain (mean over the domain's tasks of the seed means; the paper's domain mean at the "
               "same step in parentheses where it evaluated that step)", "",
               "| domain | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for domain in domains:
            cells = []
            for method in methods:
                ours = per_domain.get(domain, {}).get(method)
                first = next(r for r in runs if r.method == method)
                base = first.base_method
                n_ours = sum(1 for e in envs if domain_of(e) == domain and method in per_task.get(e, {}))
                # The paper's domain mean averages all its tasks: comparable only when we ran them all.
                paper = (_paper_mean(domain, base, step, first.offline_steps) if overlay_paper and ours is not None
                         and n_ours == _paper_task_count(domain) else None)
                cells.append(_fmt(ours) + ("" if paper is None else f" ({_fmt(paper)})"))
            md.append(f"| {domain} | " + " | ".join(cells) + " |")
        md += ["", "### Per task", "",
               "| task | method | seeds | mean | std | per seed | paper, same step | paper, 1M offline |",
               "|---|---|---|---|---|---|---|---|"]
        for env in envs:
            for method, entry in per_task.get(env, {}).items():
                per_seed = ", ".join(f"s{s}: {v:.3f}" for s, v in zip(entry["seeds"], entry["scores"], strict=True))
                md.append(f"| {env} | {method} | {len(entry['seeds'])} | {_fmt(entry['mean'])} | {_fmt(entry['std'])} "
                          f"| {per_seed} | {_fmt(entry['paper_same_step'])} | {_fmt(entry['paper_offline_end'])} |")
        md.append("")
    write_json_atomic(out / "aggregates.json", aggregates_json)

    md += ["## Learning curves", "",
           "Seed mean per method (band: min–max over seeds)"
           + ("; the paper's seed mean ± 1 std dashed, or its 1M-step value dotted when the runs are much "
              "shorter than the paper's." if overlay_paper else "."), ""]
    for domain in domains:
        name = f"curves_{domain}.png"
        atomic_write_bytes(out / name, _plot_domain_curves(runs, domain, colors, overlay_paper))
        md += [f"![{domain}]({name})", ""]
    if notes:
        md += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(md))
    return report


def _cli_report(args: argparse.Namespace) -> int:
    steps = None
    if args.steps:
        try:
            steps = [int(s) for s in args.steps.split(",") if s.strip()]
        except ValueError:
            raise ReportError(f"--steps {args.steps!r}: give comma-separated integers, e.g. 500000,1000000") from None
    report = build_report(args.runs_dir, args.out, steps=steps, reps=args.reps, seed=args.seed,
                          overlay_paper=not args.no_paper)
    print(report)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("report", help="aggregate finished runs: per task/domain/method, IQM with "
                                   "bootstrap CIs, profiles, curves beside the paper; Markdown + PNGs",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", metavar="RUNS_DIR", help="output of `flowrl sweep` (or any tree of runs)")
    parser.add_argument("--out", help="output directory (default: RUNS_DIR/report)")
    parser.add_argument("--steps", help="comma-separated steps to report at (default: the last common one)")
    parser.add_argument("--reps", type=int, default=DEFAULT_REPS, help="bootstrap replications")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's numbers and curves")
    parser.set_defaults(func=_cli_report)
    return parser
