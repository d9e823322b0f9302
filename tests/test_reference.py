"""The shipped paper tables (flowrl/resources) reproduce the published numbers (METHODS.md §10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowrl import reference
from flowrl.reference import (
    REGISTRY_TO_PAPER,
    PaperReferenceError,
    UnknownMethodError,
    load_paper_curves,
    paper_curve,
    paper_final,
    resolve_key,
    resolve_method,
)

TASK = "cube-double-play-singletask-task2-v0"
SHARED_REFERENCE = Path("/work/shared/reference")

# Paper Fig. 1 (right) / shared/reference/README.md: 100 × mean of key "all" at point 19 (1M offline steps),
# and at the end of online training (point 29).
HEADLINE_OFFLINE = {
    "QAM-E": 45.71, "QAM-F": 45.40, "QAM": 44.39, "QSM": 41.55, "ReBRAC": 39.99, "DSRL": 38.39,
    "CGQL-L": 36.83, "DAC": 36.49, "FQL": 35.74, "BAM": 35.38, "CGQL-M": 34.62, "IFQL": 34.42,
    "FEdit": 32.64, "CGQL": 29.79, "FBRAC": 10.77, "FAWAC": 8.42,
}  # fmt: skip
HEADLINE_ONLINE = {"QAM-E": 84.68, "FQL": 82.49, "QAM": 69.85, "FAWAC": 17.26, "RLPD": 60.02}


@pytest.mark.parametrize("method", sorted(HEADLINE_OFFLINE))
def test_headline_offline_scores_reproduce(method):
    steps, per_seed = paper_curve("all", method)
    assert steps[reference.OFFLINE_END_INDEX] == 1_000_000
    assert 100 * per_seed[reference.OFFLINE_END_INDEX].mean() == pytest.approx(HEADLINE_OFFLINE[method], abs=5e-3)


def test_headline_exact_values_and_online_end():
    assert paper_curve("all", "QAM")[1][19].mean() == pytest.approx(0.4439, abs=1e-9)
    assert paper_curve("all", "QAM-E")[1][19].mean() == pytest.approx(0.4571, abs=1e-9)
    for method, score in HEADLINE_ONLINE.items():
        assert 100 * paper_curve("all", method)[1][-1].mean() == pytest.approx(score, abs=5e-3), method


def test_task_entry_shape_axis_and_grid():
    steps, per_seed = paper_curve(TASK, "QAM")
    assert per_seed.shape == (30, 12)
    np.testing.assert_array_equal(steps, 50_000 * np.arange(1, 31))
    # 50 evaluation episodes: every task-level value is a multiple of 0.02 in [0, 1].
    np.testing.assert_allclose(per_seed / 0.02, np.round(per_seed / 0.02), atol=1e-9)
    assert per_seed.min() >= 0.0 and per_seed.max() <= 1.0


def test_rlpd_is_online_only():
    curve = load_paper_curves()[(TASK, "RLPD")]
    assert curve.success.shape == (10, 12)
    assert curve.online_only
    np.testing.assert_array_equal(curve.steps, 1_000_000 + 50_000 * np.arange(1, 11))
    final = paper_final(TASK, "rlpd")
    assert final.offline_mean is None
    assert final.online_mean == pytest.approx(curve.seed_mean()[-1], rel=1e-5)


def test_final_table_agrees_with_curves_for_every_entry():
    """paper_final_success.csv and the compact curves come from the same arrays: means match everywhere."""
    for source in reference.SOURCES:
        for (key, method), curve in load_paper_curves(source).items():
            final = paper_final(key, method, source)
            assert final is not None and final.n_seeds == curve.n_seeds == 12
            assert final.online_mean == pytest.approx(curve.seed_mean()[-1], rel=1e-5, abs=1e-6)
            if curve.online_only:
                assert final.offline_mean is None
            else:
                mean19 = curve.seed_mean()[reference.OFFLINE_END_INDEX]
                assert final.offline_mean == pytest.approx(mean19, rel=1e-5, abs=1e-6)
                assert final.offline_std == pytest.approx(
                    curve.seed_std()[reference.OFFLINE_END_INDEX], rel=1e-5, abs=1e-6
                )


def test_aggregates_are_means_of_task_seed_means():
    """The compact rounding lost nothing: `all` = mean over 50 tasks, a domain = mean over its 5 tasks."""
    curves = load_paper_curves()
    tasks = sorted({k for k, m in curves if m == "QAM" and "singletask" in k})
    assert len(tasks) == 50
    task_means = np.stack([curves[(k, "QAM")].seed_mean() for k in tasks])
    np.testing.assert_allclose(task_means.mean(axis=0), curves[("all", "QAM")].seed_mean(), atol=1e-9)
    domain = [k for k in tasks if k.startswith("cube-triple-play-")]
    assert len(domain) == 5
    np.testing.assert_allclose(
        np.mean([curves[(k, "QAM")].seed_mean() for k in domain], axis=0),
        curves[("cube-triple-play", "QAM")].seed_mean(),
        atol=1e-9,
    )


@pytest.mark.parametrize("registry_name, paper_name", sorted(REGISTRY_TO_PAPER.items()))
def test_registry_names_map_to_paper_curves(registry_name, paper_name):
    assert resolve_method(registry_name) == paper_name
    np.testing.assert_array_equal(paper_curve(TASK, registry_name)[1], paper_curve(TASK, paper_name)[1])


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("cube-double-play-singletask-task2-v0", TASK),
        ("cube-double-play-singletask-task2", TASK),
        ("cube-double-play-task2", TASK),
        ("Cube-Double-Play-SingleTask-Task2-v0", TASK),
        ("cube-double-play-singletask-v0", TASK),  # OGBench default task of cube: task2
        ("antmaze-large-navigate-singletask-v0", "antmaze-large-navigate-singletask-task1-v0"),
        ("puzzle-4x4-play-sparse-singletask-task3-v0", "puzzle-4x4-play-singletask-task3-v0"),
        ("puzzle-4x4-play-sparse-singletask-v0", "puzzle-4x4-play-singletask-task4-v0"),
        ("scene-play-sparse", "scene-play"),
        ("cube-double-play", "cube-double-play"),
        ("all", "all"),
        ("cube-double-play-v0", None),  # goal-conditioned env: not in the paper
        ("pointmaze-medium-navigate-singletask-task1-v0", None),
    ],
)
def test_key_spellings(spelling, expected):
    assert resolve_key(spelling) == expected


def test_method_spellings_and_unknown_method_error():
    assert resolve_method("QAM-E") == "QAM-E"
    assert resolve_method("qam_e") == "QAM-E"
    assert resolve_method("rebrac") == "ReBRAC"
    assert resolve_method("QAM-E (T=1)") == "QAM-E (T=1)"
    with pytest.raises(UnknownMethodError) as info:
        paper_curve(TASK, "qam-turbo")
    message = str(info.value)
    assert "\n" not in message and "qam-turbo" in message
    for valid in ("QAM-E", "FEdit", "RLPD", "qam-edit", "cgql-linex"):
        assert valid in message


def test_missing_data_gives_none():
    assert paper_curve(TASK, "CGQL", source="quality") is None  # CGQL not in the data-quality study
    assert paper_curve("pointmaze-medium-navigate-singletask-task1-v0", "qam") is None
    assert paper_curve("all-rep", "QAM-E (T=1)") is None  # only in the sensitivity study
    assert paper_curve("all-rep", "QAM-E (T=1)", source="sensitivity")[1].shape == (30, 12)
    assert paper_final("no-such-task-singletask-task1-v0", "qam") is None
    with pytest.raises(PaperReferenceError, match="unknown paper data source"):
        paper_curve(TASK, "qam", source="appendix")


def test_cached_arrays_are_protected():
    curve = load_paper_curves()[(TASK, "QAM")]
    with pytest.raises(ValueError):
        curve.success[0, 0] = 0.5
    _, per_seed = paper_curve(TASK, "QAM")
    per_seed[:] = -1.0  # a returned copy: the cache must not change
    assert paper_curve(TASK, "QAM")[1].min() >= 0.0


def test_format_success_is_exact_and_rejects_off_grid():
    from flowrl.resources.build_reference import format_success

    assert [format_success(v) for v in ("0.0784", "0.5", "1", "0", "0.02", "0.0200000001")] == [
        "0.0784", "0.5", "1", "0", "0.02", "0.02",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not on the"):
        format_success("0.12345")


@pytest.mark.skipif(not (SHARED_REFERENCE / "paper_curves.csv.gz").is_file(), reason="needs /work/shared")
def test_build_reproduces_shipped_files(tmp_path):
    from importlib import resources

    from flowrl.resources.build_reference import build

    build(SHARED_REFERENCE, tmp_path)
    shipped = resources.files("flowrl.resources")
    for name in ("paper_curves.csv.gz", "paper_final_success.csv"):
        assert (tmp_path / name).read_bytes() == shipped.joinpath(name).read_bytes(), name
    assert sum((tmp_path / n).stat().st_size for n in ("paper_curves.csv.gz", "paper_final_success.csv")) < 3e6
