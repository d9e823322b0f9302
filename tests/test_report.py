"""`flowrl report`: numbers from hand-written run logs (per task, domain, method; mean and IQM with
bootstrap CIs from rliable; paper values), unfinished runs left out, reproducibility, clear errors.

The report built from real runs of a Ray sweep is checked in tests/test_sweep.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from flowrl import reference
from flowrl.cli import main
from flowrl.report import ReportError, build_report, domain_of, find_runs

CUBE1, CUBE2 = "cube-double-play-singletask-task1-v0", "cube-double-play-singletask-task2-v0"
SCENE1 = "scene-play-singletask-task1-v0"
# Success at step 100K per (method, task): one value per seed 0, 1, 2.
FINAL = {
    ("qam", CUBE1): [0.2, 0.4, 0.6],
    ("qam", CUBE2): [0.0, 0.1, 0.2],
    ("qam", SCENE1): [0.9, 1.0, 0.8],
    ("fql", CUBE1): [0.1, 0.1, 0.4],
    ("fql", CUBE2): [0.0, 0.0, 0.3],
    ("fql", SCENE1): [0.5, 0.7, 0.6],
}


def write_run(root: Path, method: str, env: str, seed: int, rows: list[tuple[int, float]],
              offline_steps: int = 100_000, cell: bool = True) -> Path:
    cell_dir = root / method / env / "default-0123456789ab"
    run = cell_dir / f"seed{seed}"
    (run / "logs").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": "flowrl-run", "fingerprint": "x", "env_name": env,
                                              "extractor": method, "seed": seed, "offline_steps": offline_steps}))
    with open(run / "logs" / "eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "eval/success", "eval/episodes"])
        writer.writerows([(step, value, 10) for step, value in rows])
    if cell:
        (cell_dir / "cell.json").write_text(json.dumps({"method": method, "variant": "default"}))
    return run


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for (method, env), values in FINAL.items():
        for seed, value in enumerate(values):
            write_run(root, method, env, seed, [(50_000, value / 2), (100_000, value)])
    # Unfinished: last evaluation at 50K of 100K — left out with a note.
    write_run(root, "qam", CUBE1, 7, [(50_000, 0.9)])
    return root


def test_numbers_match_the_logs(runs, tmp_path):
    report = build_report(runs, tmp_path / "out", reps=500)
    data = json.loads((tmp_path / "out" / "aggregates.json").read_text())
    assert data["steps"] == [100_000]  # default: the last step every finished run evaluated
    step = data["per_step"]["100000"]
    for (method, env), values in FINAL.items():
        entry = step["per_task"][env][method]
        assert entry["seeds"] == [0, 1, 2] and entry["scores"] == values
        assert entry["mean"] == pytest.approx(np.mean(values))
        assert entry["std"] == pytest.approx(np.std(values, ddof=1))
    assert step["per_domain"]["cube-double-play"]["qam"] == pytest.approx((0.4 + 0.1) / 2)
    assert step["per_domain"]["scene-play"]["fql"] == pytest.approx(0.6)

    qam = step["methods"]["qam"]
    assert (qam["tasks"], qam["runs_per_task"]) == (3, 3)
    assert qam["mean"] == pytest.approx((0.4 + 0.1 + 0.9) / 3)
    # IQM of the 9 runs: drop the 2 lowest and 2 highest, mean of 0.2, 0.2, 0.4, 0.6, 0.8.
    assert qam["iqm"] == pytest.approx(0.44)
    for key in ("mean", "iqm"):
        lo, hi = qam[f"{key}_ci"]
        assert 0.0 <= lo <= qam[key] <= hi <= 1.0 and hi > lo
    # Performance profile at τ = 0: fraction of runs with success > 0 (qam: 8 of 9).
    assert qam["profile_thresholds"][0] == 0.0 and qam["profile"][0] == pytest.approx(8 / 9)
    assert np.all(np.diff(qam["profile"]) <= 0)  # a survival function never rises

    # The paper's numbers are the shipped reference's.
    steps, success = reference.paper_curve(CUBE1, "qam")
    assert step["per_task"][CUBE1]["qam"]["paper_same_step"] == pytest.approx(success[steps == 100_000].mean())
    assert step["per_task"][CUBE1]["qam"]["paper_offline_end"] == pytest.approx(
        reference.paper_final(CUBE1, "qam").offline_mean)

    text = report.read_text()
    assert f"| {CUBE1} | qam | 3 | 0.400 | 0.200 | s0: 0.200, s1: 0.400, s2: 0.600 |" in text
    assert "seed7: unfinished (last evaluation at step 50000 of 100000): left out" in text
    for png in ("aggregate_step100000.png", "profile_step100000.png", "curves_cube-double-play.png",
                "curves_scene-play.png"):
        assert f"]({png})" in text and (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    scores = list(csv.DictReader(open(tmp_path / "out" / "scores.csv", newline="")))
    assert len(scores) == 18 and {float(r["success"]) for r in scores} == {v for vs in FINAL.values() for v in vs}


def test_reproducible_and_chosen_steps(runs, tmp_path):
    build_report(runs, tmp_path / "a", steps=[50_000, 100_000], reps=200, seed=3)
    build_report(runs, tmp_path / "b", steps=[50_000, 100_000], reps=200, seed=3)
    a = json.loads((tmp_path / "a" / "aggregates.json").read_text())
    assert a == json.loads((tmp_path / "b" / "aggregates.json").read_text())
    assert a["per_step"]["50000"]["methods"]["fql"]["mean"] == pytest.approx(np.mean(
        [np.mean(v) / 2 for (m, _), v in FINAL.items() if m == "fql"]))
    state = np.random.get_state()[1].copy()
    build_report(runs, tmp_path / "c", reps=50)
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's global RNG is left alone


def test_uneven_seeds_and_missing_tasks_are_noted(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        write_run(root, "qam", CUBE1, seed, [(100, 0.1 * seed)], offline_steps=100)
    for seed in range(2):
        write_run(root, "fql", CUBE1, seed, [(100, 0.5)], offline_steps=100)
    write_run(root, "fql", SCENE1, 0, [(100, 0.5)], offline_steps=100)
    report = build_report(root, tmp_path / "out", reps=100, overlay_paper=False)
    methods = json.loads((tmp_path / "out" / "aggregates.json").read_text())["per_step"]["100"]["methods"]
    assert methods["qam"]["runs_per_task"] == 3 and methods["fql"]["runs_per_task"] == 2
    assert methods["qam"]["tasks"] == 1  # only the task both methods have
    text = report.read_text()
    assert "left out: scene-play-singletask-task1-v0" in text


def test_labels_without_sweep_metadata_and_variants(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "qam", SCENE1, 0, [(100, 1.0)], offline_steps=100, cell=False)
    run = write_run(root, "fql", SCENE1, 0, [(100, 0.0)], offline_steps=100)
    (run.parent / "cell.json").write_text(json.dumps({"method": "fql", "variant": "lowlr"}))
    found, notes = find_runs(root)
    assert [(r.method, r.base_method) for r in found] == [("fql[lowlr]", "fql"), ("qam", "qam")]
    assert domain_of(SCENE1) == "scene-play" and domain_of("puzzle-4x4-play-sparse-singletask-task3-v0") == \
        "puzzle-4x4-play-sparse"


def test_errors_are_one_line(tmp_path, runs, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no finished runs under"):
        build_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="--steps 123: no run evaluated at that step"):
        build_report(runs, tmp_path / "out", steps=[123])
    assert main(["report", str(tmp_path / "missing")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowrl: error:")]
    assert len(errors) == 1 and "is not a directory" in errors[0]
    assert main(["report", str(runs), "--out", str(tmp_path / "cli"), "--reps", "50"]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")


def test_paper_domain_mean_only_when_every_task_ran(tmp_path):
    root = tmp_path / "runs"
    for task in range(1, 6):
        write_run(root, "qam", f"scene-play-singletask-task{task}-v0", 0, [(100_000, 0.5)])
    write_run(root, "qam", CUBE1, 0, [(100_000, 0.25)])
    text = build_report(root, tmp_path / "out", reps=50).read_text()
    steps, success = reference.paper_curve("scene-play", "qam")
    assert f"| scene-play | 0.500 ({success[steps == 100_000].mean():.3f}) |" in text
    assert "| cube-double-play | 0.250 |" in text  # 1 of 5 tasks: the paper's domain mean is not comparable


def test_online_runs_and_online_only_paper_curves(tmp_path):
    """RLPD ran online only in the paper (its points at 1M + online step): aligned to the run's own axis."""
    root = tmp_path / "runs"
    for seed in range(2):
        run = write_run(root, "rlpd", CUBE1, seed, [(50_000, 0.1), (100_000, 0.3)], offline_steps=0)
        info = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**info, "online_steps": 100_000}))
    # Offline done but not its online phase: unfinished.
    run = write_run(root, "qam", CUBE1, 0, [(100_000, 0.5)], offline_steps=100_000)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "online_steps": 50_000}))
    found, notes = find_runs(root)
    assert [r.method for r in found] == ["rlpd", "rlpd"]
    assert any("step 100000 of 150000" in note for note in notes)
    build_report(root, tmp_path / "out", reps=50)
    entry = json.loads((tmp_path / "out" / "aggregates.json").read_text())["per_step"]["100000"]["per_task"][CUBE1]
    steps, success = reference.paper_curve(CUBE1, "rlpd")
    assert entry["rlpd"]["paper_same_step"] == pytest.approx(success[steps == 1_100_000].mean())
    assert entry["rlpd"]["paper_offline_end"] is None
