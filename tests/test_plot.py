"""Success-curve plots of run directories with the paper overlay (flowrl.plot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from flowrl import reference
from flowrl.errors import MetricsError, RunDirError
from flowrl.plot import load_run, plot_runs, prepare_plot, register_cli

TASK = "cube-double-play-singletask-task2-v0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root: Path, name: str, rows: list[tuple[int, str]], meta: dict | None) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    lines = ["step,eval/success,eval/episode.return"] + [f"{step},{success},-1.0" for step, success in rows]
    (run_dir / "eval.csv").write_text("\n".join(lines) + "\n")
    if meta is not None:
        (run_dir / "run.json").write_text(json.dumps(meta))
    return run_dir


def assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01  # something was drawn, not a blank canvas


def test_plot_overlays_the_matching_paper_curve(tmp_path):
    rows = [(50_000 * i, f"{0.02 * i:.2f}") for i in range(1, 31)]
    qam = make_run(tmp_path, "qam_seed0", rows, {"env_name": TASK, "extractor": "qam-edit"})
    out = plot_runs([qam], tmp_path / "plots" / "success.png")
    assert out == tmp_path / "plots" / "success.png"
    assert_valid_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["success.png"]  # no temp file left behind

    data = prepare_plot([qam])
    (overlay,) = data.overlays
    assert (overlay.key, overlay.method, overlay.n_seeds) == (TASK, "QAM-E", 12)
    steps, per_seed = reference.paper_curve(TASK, "QAM-E")
    np.testing.assert_array_equal(overlay.steps, steps)
    np.testing.assert_allclose(overlay.mean, per_seed.mean(axis=1))
    np.testing.assert_allclose(overlay.upper, np.clip(per_seed.mean(1) + per_seed.std(1, ddof=1), 0, 1))
    assert overlay.offline_end_mean == pytest.approx(per_seed[19].mean())
    (run,) = data.runs
    assert run.label == "qam_seed0" and run.extractor == "qam-edit"
    np.testing.assert_allclose(run.success, 0.02 * np.arange(1, 31))


def test_short_runs_and_shared_overlay(tmp_path):
    """Two short runs of the same task/method share one overlay; the PNG still renders (zoomed layout)."""
    meta = {"env_name": "scene-play-sparse-singletask-task2-v0", "extractor": "fql", "offline_steps": 2000}
    rows = [(1000, "0.1"), (2000, "0.2"), (3000, "0.26")]
    a = make_run(tmp_path / "a", "seed0", rows, meta)
    b = make_run(tmp_path / "b", "seed0", rows[:2], meta)
    data = prepare_plot([a, b])
    assert [r.label for r in data.runs] == ["a/seed0", "b/seed0"]  # colliding names disambiguated
    (overlay,) = data.overlays
    assert (overlay.key, overlay.method) == ("scene-play-singletask-task2-v0", "FQL")
    assert overlay.run_labels == ("a/seed0", "b/seed0")
    assert_valid_png(plot_runs([a, b], tmp_path / "short.png"))


def test_online_only_paper_curve_starts_at_the_runs_online_phase(tmp_path):
    rows = [(50_000 * i, "0.5") for i in range(1, 11)]
    run = make_run(tmp_path, "rlpd", rows, {"env_name": TASK, "extractor": "rlpd", "offline_steps": 0})
    (overlay,) = prepare_plot([run]).overlays
    np.testing.assert_array_equal(overlay.steps, 50_000 * np.arange(1, 11))
    assert overlay.offline_end_mean is None


def test_eval_csv_parsing_skips_blank_and_sorts(tmp_path):
    run = make_run(tmp_path, "r", [(300, "0.3"), (100, "0.1"), (200, "")], None)
    series, note = load_run(run)
    np.testing.assert_array_equal(series.steps, [100, 300])
    np.testing.assert_allclose(series.success, [0.1, 0.3])
    assert series.env_name is None and "run.json" in note


def test_metrics_log_layout_is_found(tmp_path):
    """flowrl.metrics_log writes <run>/logs/eval.csv with the kind prefix dropped (`success`)."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "eval.csv").write_text("step,success,return\n50000,0.04,1.0\n100000,0.1,2.0\n")
    (run / "run.json").write_text(json.dumps({"env_name": TASK, "extractor": "qam"}))
    data = prepare_plot([run])
    np.testing.assert_allclose(data.runs[0].success, [0.04, 0.1])
    assert [(o.key, o.method) for o in data.overlays] == [(TASK, "QAM")]


def test_no_overlay_without_metadata_or_when_disabled(tmp_path):
    rows = [(1000, "0.1"), (2000, "0.3")]
    bare = make_run(tmp_path, "bare", rows, None)
    unknown = make_run(tmp_path, "new_method", rows, {"env_name": TASK, "extractor": "my-new-extractor"})
    data = prepare_plot([bare, unknown])
    assert data.overlays == ()
    assert len(data.notes) == 2 and "my-new-extractor" in data.notes[1]
    full = make_run(tmp_path, "full", rows, {"env_name": TASK, "extractor": "qam"})
    assert prepare_plot([full], overlay_paper=False).overlays == ()
    assert_valid_png(plot_runs([bare], tmp_path / "bare.png"))


def test_bad_run_dirs_raise_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="eval.csv not found") as info:
        prepare_plot([empty])
    assert "\n" not in str(info.value)
    no_column = tmp_path / "nocol"
    no_column.mkdir()
    (no_column / "eval.csv").write_text("step,eval/return\n1000,3.0\n")
    with pytest.raises(MetricsError, match="needs columns 'step' and 'eval/success'"):
        prepare_plot([no_column])
    (no_column / "eval.csv").write_text("step,eval/success\n1000,half\n")
    with pytest.raises(MetricsError, match="line 2"):
        prepare_plot([no_column])
    with pytest.raises(RunDirError, match="is not a directory"):
        prepare_plot([tmp_path / "missing"])


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="flowrl")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_default_output_and_exit_codes(tmp_path, capsys):
    run = make_run(tmp_path, "run0", [(1000, "0.1"), (2000, "0.3")], {"env_name": TASK, "extractor": "qam"})
    assert _cli(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "success.png")
    assert_valid_png(run / "success.png")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert _cli(["plot", str(run), str(empty), "--out", str(tmp_path / "x.png"), "--no-paper"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "eval.csv" in err and str(empty) in err
    assert not (tmp_path / "x.png").exists()
