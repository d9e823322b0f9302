"""Success-rate curves of flowrl runs, overlaid on the published QAM curves (METHODS.md §10).

A run directory holds `eval.csv` (written by the training loop, at the top level or in `logs/` as
`flowrl.metrics_log` lays it out; columns include `step` and `eval/success`, or `success` when the
kind prefix is dropped) and, usually, `run.json` (with `env_name` and `extractor`, the registry name,
and optionally `offline_steps`). `plot_runs` draws success vs training step, one line per run, and — for
each distinct (task, method) among the runs — the paper's seed-mean curve with a ±1 std band over its
12 seeds (`flowrl.reference`), all on the paper's step axis: offline steps, then online steps counted on
from the end of the offline phase (qam `main.py` logs `offline_steps + i`, METHODS.md §1.3). The paper's
offline phase ends at 1M steps (marked); RLPD ran online only, so its curve is placed at the run's
`offline_steps` (0 if unknown) + online step.

When the runs are short compared with the paper's 1.5M steps, a second panel zooms in on the runs and
shows, as a dotted line, each paper curve's seed-mean at the end of its offline phase for scale.

Rendering uses matplotlib's Agg canvas directly (no pyplot state); the PNG is written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowrl import reference
from flowrl.errors import FlowRLError, MetricsError, RunDirError
from flowrl.rundir import LOG_DIR, RUN_FILE, atomic_write_bytes, os_error_message

__all__ = [
    "PaperOverlay",
    "PlotData",
    "RunSeries",
    "load_run",
    "plot_runs",
    "prepare_plot",
    "register_cli",
]

EVAL_FILE = "eval.csv"
STEP_COLUMN = "step"
SUCCESS_COLUMNS = ("eval/success", "success")  # first present wins
# Below this fraction of the full x-range, runs get their own zoomed panel to stay readable.
ZOOM_FRACTION = 0.3


@dataclass(frozen=True, eq=False)
class RunSeries:
    """One run's evaluation curve and the metadata used to find its paper counterpart."""

    run_dir: Path
    label: str
    steps: np.ndarray  # (n,) int64, ascending
    success: np.ndarray  # (n,) float64
    env_name: str | None
    extractor: str | None
    offline_steps: int | None


@dataclass(frozen=True, eq=False)
class PaperOverlay:
    """The paper's curve drawn for one (key, method): seed mean and mean ± 1 std (clipped to [0, 1])."""

    key: str
    method: str  # paper method name
    steps: np.ndarray  # (points,) x positions on the plot's step axis
    mean: np.ndarray  # (points,)
    lower: np.ndarray  # (points,)
    upper: np.ndarray  # (points,)
    n_seeds: int
    offline_end_mean: float | None  # seed-mean at 1M offline steps; None for online-only (RLPD)
    run_labels: tuple[str, ...]  # runs this overlay is the reference for


@dataclass(frozen=True, eq=False)
class PlotData:
    """Everything `plot_runs` draws; `notes` say why a run got no paper overlay."""

    runs: tuple[RunSeries, ...]
    overlays: tuple[PaperOverlay, ...]
    notes: tuple[str, ...]


def _find_eval_csv(run_dir: Path) -> Path:
    for candidate in (run_dir / EVAL_FILE, run_dir / LOG_DIR / EVAL_FILE):
        if candidate.is_file():
            return candidate
    raise RunDirError(
        f"{run_dir / EVAL_FILE} not found (nor {Path(LOG_DIR) / EVAL_FILE}); pass a run directory the "
        "training loop has written evaluations to"
    )


def _read_eval_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, success) of the evaluated rows of `path`, sorted by step; rows without a success are skipped."""
    steps, success = [], []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        success_column = next((c for c in SUCCESS_COLUMNS if c in columns), None)
        if STEP_COLUMN not in columns or success_column is None:
            raise MetricsError(
                f"{path} needs columns {STEP_COLUMN!r} and {SUCCESS_COLUMNS[0]!r} (or {SUCCESS_COLUMNS[1]!r}); "
                f"it has: {', '.join(columns) or 'none'}"
            )
        for line_number, row in enumerate(reader, start=2):
            value = (row[success_column] or "").strip()
            if not value:  # a row logged without an evaluation
                continue
            try:
                steps.append(int(float(row[STEP_COLUMN])))
                success.append(float(value))
            except (TypeError, ValueError):
                raise MetricsError(
                    f"{path} line {line_number}: step={row[STEP_COLUMN]!r}, {success_column}={value!r} "
                    "are not numbers; fix or delete that row"
                ) from None
    order = np.argsort(np.asarray(steps, dtype=np.int64), kind="stable")
    return np.asarray(steps, dtype=np.int64)[order], np.asarray(success, dtype=np.float64)[order]


def _read_run_json(path: Path) -> tuple[dict, str | None]:
    """Run metadata, or ({}, note) when it is absent or unreadable (the run is still plotted)."""
    if not path.is_file():
        return {}, f"{path} not found: no paper overlay for this run"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return {}, f"{path} is not valid JSON ({err}): no paper overlay for this run"
    if not isinstance(meta, dict):
        return {}, f"{path} is not a JSON object: no paper overlay for this run"
    return meta, None


def load_run(run_dir: Path, label: str | None = None) -> tuple[RunSeries, str | None]:
    """Read the run's eval.csv (required) and run.json (optional); returns (series, note or None).

    Raises RunDirError / MetricsError (one line) when there is no readable eval.csv.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a directory; pass run directories containing {EVAL_FILE}")
    steps, success = _read_eval_csv(_find_eval_csv(run_dir))
    meta, note = _read_run_json(run_dir / RUN_FILE)
    env_name = meta.get("env_name") if isinstance(meta.get("env_name"), str) else None
    extractor = meta.get("extractor") if isinstance(meta.get("extractor"), str) else None
    offline = meta.get("offline_steps")
    offline_steps = offline if isinstance(offline, int) and not isinstance(offline, bool) else None
    if note is None and (env_name is None or extractor is None):
        note = f"{run_dir / RUN_FILE} lacks 'env_name' or 'extractor': no paper overlay for this run"
    series = RunSeries(run_dir, label or run_dir.name, steps, success, env_name, extractor, offline_steps)
    return series, note


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    """Run dir names, or parent/name where names collide (e.g. several `seed0` dirs)."""
    names = [Path(d).name for d in run_dirs]
    return [
        f"{Path(d).parent.name}/{Path(d).name}" if names.count(Path(d).name) > 1 else Path(d).name
        for d in run_dirs
    ]


def prepare_plot(run_dirs: Sequence[Path], *, overlay_paper: bool = True) -> PlotData:
    """Load the runs and, if `overlay_paper`, the matching paper curves (see module docstring)."""
    if not run_dirs:
        raise RunDirError("no run directories given; pass at least one directory containing eval.csv")
    runs, notes = [], []
    for run_dir, label in zip(run_dirs, _labels(run_dirs), strict=True):
        series, note = load_run(Path(run_dir), label)
        runs.append(series)
        if note is not None and overlay_paper:
            notes.append(note)
    overlays: dict[tuple[str, str, int], dict] = {}
    if overlay_paper:
        for run in runs:
            if run.env_name is None or run.extractor is None:
                continue
            try:
                method = reference.resolve_method(run.extractor)
            except reference.UnknownMethodError:
                notes.append(f"{run.label}: extractor {run.extractor!r} has no paper counterpart: no overlay")
                continue
            key = reference.resolve_key(run.env_name)
            curve = None if key is None else reference.load_paper_curves().get((key, method))
            if curve is None:
                notes.append(f"{run.label}: the paper has no {method} curve for {run.env_name!r}: no overlay")
                continue
            # Online-only paper runs (RLPD) start their online phase at this run's offline_steps.
            shift = (run.offline_steps or 0) - reference.PAPER_OFFLINE_STEPS if curve.online_only else 0
            slot = overlays.setdefault((key, method, shift), {"curve": curve, "shift": shift, "labels": []})
            slot["labels"].append(run.label)
    drawn = []
    for slot in overlays.values():
        curve, mean, std = slot["curve"], slot["curve"].seed_mean(), slot["curve"].seed_std()
        offline_end = None if curve.online_only else float(mean[reference.OFFLINE_END_INDEX])
        drawn.append(
            PaperOverlay(
                key=curve.key,
                method=curve.method,
                steps=curve.steps + slot["shift"],
                mean=mean,
                lower=np.clip(mean - std, 0.0, 1.0),
                upper=np.clip(mean + std, 0.0, 1.0),
                n_seeds=curve.n_seeds,
                offline_end_mean=offline_end,
                run_labels=tuple(slot["labels"]),
            )
        )
    return PlotData(tuple(runs), tuple(drawn), tuple(notes))


def _format_step(x: float, _pos: int | None = None) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:g}K"
    return f"{x:g}"


def _draw_panel(ax, data: PlotData, colors: dict[str, str], *, zoom: bool, x_max: float, single_env: bool) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    paper_axis_drawn = any(o.offline_end_mean is not None for o in data.overlays)
    if paper_axis_drawn and not zoom:
        # The notebook's convention: shade the paper's 1M-step offline phase.
        ax.axvspan(0, reference.PAPER_OFFLINE_STEPS, color="0.93", zorder=0)
        ax.axvline(reference.PAPER_OFFLINE_STEPS, color="0.45", linestyle="--", linewidth=1.0, zorder=1)
        ax.text(reference.PAPER_OFFLINE_STEPS / 2, 1.03, "offline (paper: 1M steps)", ha="center",
                va="bottom", fontsize=8, color="0.35")
        ax.text((reference.PAPER_OFFLINE_STEPS + x_max) / 2, 1.03, "online", ha="center", va="bottom",
                fontsize=8, color="0.35")
    for overlay in data.overlays:
        color = colors[overlay.run_labels[0]]
        where = (" (online only)" if overlay.offline_end_mean is None else "") + (
            "" if single_env else f" on {overlay.key}"
        )
        ax.fill_between(overlay.steps, overlay.lower, overlay.upper, color=color, alpha=0.15, linewidth=0)
        ax.plot(overlay.steps, overlay.mean, color=color, linestyle="--", linewidth=1.6, marker="o",
                markersize=2.5, label=f"paper {overlay.method}{where}: mean ± 1 std, {overlay.n_seeds} seeds")
        if zoom and overlay.offline_end_mean is not None:
            ax.axhline(overlay.offline_end_mean, color=color, linestyle=":", linewidth=1.2,
                       label=f"paper {overlay.method}{where} at 1M offline steps: {overlay.offline_end_mean:.2f}")
    offline_ends: dict[int, list[str]] = {}
    for run in data.runs:
        color = colors[run.label]
        name = run.label if run.extractor is None else f"{run.label} ({run.extractor})"
        ax.plot(run.steps, run.success, color=color, linewidth=2.0, marker="o", markersize=3.5, label=name)
        if run.offline_steps and run.offline_steps != reference.PAPER_OFFLINE_STEPS and run.offline_steps <= x_max:
            offline_ends.setdefault(run.offline_steps, []).append(run.label)
    for step, labels in offline_ends.items():  # one marker per distinct offline length
        who, color = (labels[0], colors[labels[0]]) if len(labels) == 1 else ("runs", "0.2")
        ax.axvline(step, color=color, linestyle=":", linewidth=1.0,
                   label=f"{who}: end of offline ({_format_step(step)})")
    ax.set_xlim(0, x_max)
    ax.set_ylim(-0.02, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FuncFormatter(_format_step))
    ax.set_xlabel("training step (offline, then online)")
    ax.set_ylabel("eval success rate")
    ax.grid(True, alpha=0.3)


def _render(data: PlotData) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    palette = [f"C{i}" for i in range(10)]
    colors = {run.label: palette[i % len(palette)] for i, run in enumerate(data.runs)}
    run_max = max((float(r.steps[-1]) for r in data.runs if r.steps.size), default=0.0)
    paper_max = max((float(o.steps[-1]) for o in data.overlays), default=0.0)
    full_max = max(run_max, paper_max) * 1.02 or 1.0
    zoom = bool(data.overlays) and 0 < run_max < ZOOM_FRACTION * full_max

    envs = sorted({r.env_name for r in data.runs if r.env_name})
    single_env = len(envs) == 1
    title = envs[0] if single_env else "eval success rate"
    fig = Figure(figsize=(14, 5.2) if zoom else (9, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    if zoom:
        ax_zoom, ax_full = fig.subplots(1, 2, width_ratios=[1, 1.3])
        _draw_panel(ax_zoom, data, colors, zoom=True, x_max=run_max * 1.05, single_env=single_env)
        ax_zoom.set_title(f"the runs' range (first {_format_step(run_max)} steps)", fontsize=10)
        _draw_panel(ax_full, data, colors, zoom=False, x_max=full_max, single_env=single_env)
        ax_full.set_title("full paper schedule", fontsize=10, pad=16)
        handles, labels = ax_zoom.get_legend_handles_labels()
        ax_zoom.legend(handles, labels, fontsize=8, loc="best", framealpha=0.9)
    else:
        ax = fig.subplots()
        _draw_panel(ax, data, colors, zoom=False, x_max=full_max, single_env=single_env)
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.suptitle(title, fontsize=12)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def plot_runs(run_dirs: Sequence[Path], out_png: Path, *, overlay_paper: bool = True) -> Path:
    """Draw the runs' success curves (+ the paper's, see module docstring) into `out_png`; returns its path.

    Raises RunDirError / MetricsError (one line) for a run directory without a readable eval.csv.
    """
    data = prepare_plot(run_dirs, overlay_paper=overlay_paper)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_png, _render(data))
    return out_png


def _cli_plot(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path(args.runs[0]) / "success.png"
    try:
        data = prepare_plot(args.runs, overlay_paper=not args.no_paper)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, _render(data))
    except FlowRLError as err:
        print(f"flowrl plot: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # unreadable run files, unwritable output
        print(f"flowrl plot: error: {os_error_message(f'could not plot to {out}', err)}", file=sys.stderr)
        return 2
    for note in data.notes:
        print(f"flowrl plot: note: {note}", file=sys.stderr)
    print(out)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `plot RUN... [--out FILE] [--no-paper]`; the handler (args.func) returns an exit code."""
    parser = subparsers.add_parser(
        "plot",
        help="plot eval success vs step of runs, with the paper's curve for the same task and method",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directory with eval.csv")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <first RUN>/success.png)")
    parser.add_argument("--no-paper", action="store_true", help="do not overlay the paper's curves")
    parser.set_defaults(func=_cli_plot)
    return parser
