"""Fit QAM on a closed-form problem and draw behaviour, exact tilted target and QAM side by side.

The behaviour flow is the exact velocity field of a Gaussian mixture and the critic is analytic
(flowrl.analytic; ANALYTIC-CHECK.md §1–§2), so the target π* ∝ π_β·exp(τQ) is known exactly. The
script trains QAM (K = 10, 2x64 MLP, the closed-form test's settings; docs/closed-form.md), samples
it without clipping, prints the closed-form metrics and writes a PNG (four panels: behaviour,
closed-form target, the exact target field sampled with the same K Euler steps, QAM). About 20–40 s
on a laptop CPU with the defaults.

    python experiments/closed_form_demo.py --problem 1d3 --out /tmp/qam_1d3.png
    python experiments/closed_form_demo.py --problem 2d-mild --steps 3000
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from extractors.qam import QAM
from flowrl.analytic import (
    ClosedFormProblem,
    GaussianMixture,
    closed_form_metrics,
    fit_extractor,
    make_problem,
    sample_batch_unclipped,
)
from flowrl.errors import FlowRLError
from flowrl.rundir import atomic_write_bytes, os_error_message

DEMO_PROBLEMS = ("1d3", "2d-mild", "1d3-quad", "2d-mild-quad")
BEHAVIOUR = "behaviour π_β"
TARGET = "closed-form π* ∝ π_β·exp(τQ)"
TARGET_EULER = "exact π* field, Euler-K (the K floor)"
POLICY = "QAM (Euler-K, unclipped)"
# (W1 max, mean-error max, τ_eff/τ band) of tests/test_closed_form.py; 2d-mild: ANALYTIC-CHECK §6 T2b,
# sized there for 3000 steps (at 1000 steps correct runs reach W1 0.106, τ_eff/τ 1.24).
TOLERANCES = {
    "1d3": (0.14, 0.10, (0.65, 1.3)),
    "2d-mild": (0.11, 0.07, (0.65, 1.3)),
    "2d-mild-quad": (0.12, 0.11, (0.65, 1.3)),
}
PANEL_COLORS = {BEHAVIOUR: "0.45", TARGET: "C2", TARGET_EULER: "C1", POLICY: "C0"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fit QAM on a closed-form Gaussian-mixture problem and plot it against the exact "
        "tilted target."
    )
    parser.add_argument(
        "--problem", choices=DEMO_PROBLEMS, default="1d3", help="closed-form problem (default 1d3)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000, as in the tests)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default ./closed_form_<problem>.png)")
    parser.add_argument("--num-samples", type=int, default=4096, help="samples per panel (default 4096)")
    parser.add_argument("--flow-steps", type=int, default=10, help="Euler steps K (default 10)")
    return parser


def _draw_1d(axes, problem: ClosedFormProblem, panels: dict[str, np.ndarray]) -> None:
    behaviour, target = problem.behaviour, problem.target
    everything = np.concatenate([samples[:, 0] for samples in panels.values()])
    low, high = np.percentile(everything, [0.1, 99.9])
    pad = 0.15 * (high - low)
    grid = jnp.linspace(low - pad, high + pad, 600)
    density = lambda mixture: np.exp(np.asarray(jax.vmap(lambda x: mixture.log_prob(x[None]))(grid)))  # noqa: E731
    behaviour_density, target_density = density(behaviour), density(target)
    bins = np.linspace(float(grid[0]), float(grid[-1]), 90)
    for ax, (title, samples) in zip(axes, panels.items()):
        ax.hist(samples[:, 0], bins=bins, density=True, color=PANEL_COLORS[title], alpha=0.45, label="samples")
        ax.plot(grid, behaviour_density, color="0.3", ls="--", lw=1.2, label="π_β density")
        ax.plot(grid, target_density, color="C2", lw=1.8, label="π* density")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("action a")
        ax.set_xlim(float(grid[0]), float(grid[-1]))
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8, loc="upper left")


def _draw_2d(axes, problem: ClosedFormProblem, panels: dict[str, np.ndarray]) -> None:
    everything = np.concatenate(list(panels.values()))
    low, high = np.percentile(everything, [0.2, 99.8], axis=0)
    pad = 0.15 * (high - low)
    xs = np.linspace(low[0] - pad[0], high[0] + pad[0], 160)
    ys = np.linspace(low[1] - pad[1], high[1] + pad[1], 160)
    mesh = jnp.asarray(np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2), jnp.float32)

    def density(mixture: GaussianMixture) -> np.ndarray:
        return np.exp(np.asarray(jax.vmap(mixture.log_prob)(mesh))).reshape(len(ys), len(xs))

    behaviour_density, target_density = density(problem.behaviour), density(problem.target)
    for ax, (title, samples) in zip(axes, panels.items()):
        shown = samples[:2000]
        ax.scatter(shown[:, 0], shown[:, 1], s=3, alpha=0.35, color=PANEL_COLORS[title], rasterized=True)
        contours = behaviour_density if title == BEHAVIOUR else target_density
        ax.contour(xs, ys, contours, levels=6, colors="k", linewidths=0.7, alpha=0.7)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(xs[0], xs[-1])
        ax.set_ylim(ys[0], ys[-1])
        ax.set_xlabel("a₁")
        ax.grid(True, alpha=0.25)
    axes[0].set_ylabel("a₂")


def render(
    problem_name: str,
    problem: ClosedFormProblem,
    panels: dict[str, np.ndarray],
    metrics: dict[str, float],
    steps: int,
    flow_steps: int,
) -> bytes:
    """The three panels as PNG bytes (matplotlib Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(19, 5.0 if problem.behaviour.dim == 1 else 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True)
    if problem.behaviour.dim == 1:
        _draw_1d(axes, problem, panels)
    else:
        _draw_2d(axes, problem, panels)
    legend = "\ncontours: density of π_β (first panel) and of the closed-form π* (others)"
    legend = "" if problem.behaviour.dim == 1 else legend
    fig.suptitle(
        f"QAM on the closed-form problem '{problem_name}' "
        f"(τ = λ = {problem.tau:g}, K = {flow_steps}, {steps} steps)   "
        f"W1 = {metrics['W1']:.3f}   mean error = {metrics['mean_err']:.3f}   "
        f"τ_eff/τ = {metrics['tau_ratio']:.2f}   mode-weight error = {metrics['w_err']:.3f}" + legend,
        fontsize=11,
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.num_samples < 16:
        parser.error(f"--num-samples must be >= 16, got {args.num_samples}")
    if args.flow_steps < 1:
        parser.error(f"--flow-steps must be >= 1, got {args.flow_steps}")
    out = args.out if args.out is not None else Path(f"closed_form_{args.problem}.png")
    if out.parent and not out.parent.is_dir():
        parser.error(f"--out {out}: directory {out.parent} does not exist; create it or choose another path")

    problem = make_problem(args.problem)
    dim = problem.behaviour.dim
    train_key, noise_key, behaviour_key, target_key = jax.random.split(jax.random.key(args.seed), 4)
    extractor = QAM(
        inv_temp=problem.tau, flow_steps=args.flow_steps, hidden_dims=(64, 64), clip_boundary_action=False
    )
    start = time.perf_counter()
    params = fit_extractor(extractor, problem.context(), steps=args.steps, key=train_key)
    noise = jax.random.normal(noise_key, (args.num_samples, dim))
    qam_samples = sample_batch_unclipped(params, noise, args.flow_steps)
    fit_seconds = time.perf_counter() - start

    metrics = closed_form_metrics(qam_samples, problem)
    target = problem.target
    fmt = lambda values: "(" + ", ".join(f"{v:.3f}" for v in np.asarray(values).ravel()) + ")"  # noqa: E731
    print(f"problem {args.problem}: behaviour weights {fmt(problem.behaviour.weights)}, "
          f"target weights {fmt(target.weights)}, target mean {fmt(target.mean())}")
    print(f"QAM (K={args.flow_steps}, {args.steps} steps, seed {args.seed}, {fit_seconds:.1f} s): "
          + "  ".join(f"{name}={value:.3f}" for name, value in metrics.items()))
    if args.problem in TOLERANCES and args.flow_steps == 10:
        w1_max, mean_tol, (low, high) = TOLERANCES[args.problem]
        inside = (
            metrics["W1"] <= w1_max and metrics["mean_err"] <= mean_tol and low <= metrics["tau_ratio"] <= high
        )
        print(f"K = 10 tolerances (docs/closed-form.md): W1 <= {w1_max}, mean error <= {mean_tol}, "
              f"{low} <= tau_eff/tau <= {high}: {'inside' if inside else 'OUTSIDE'}")

    # The exact tilted field sampled with the same Euler-K grid shows how much of QAM's error is K's.
    target_euler = sample_batch_unclipped(target, noise, args.flow_steps)
    floor = closed_form_metrics(target_euler, problem)
    print(f"exact π* field, Euler-{args.flow_steps} (discretisation floor): "
          + "  ".join(f"{name}={value:.3f}" for name, value in floor.items()))
    panels = {
        BEHAVIOUR: np.asarray(problem.behaviour.sample(behaviour_key, args.num_samples)),
        TARGET: np.asarray(target.sample(target_key, args.num_samples)),
        TARGET_EULER: np.asarray(target_euler),
        POLICY: np.asarray(qam_samples),
    }
    png = render(args.problem, problem, panels, metrics, args.steps, args.flow_steps)
    try:
        atomic_write_bytes(out, png)
    except OSError as e:
        print(f"error: {os_error_message(f'could not write {out}', e)}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FlowRLError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
