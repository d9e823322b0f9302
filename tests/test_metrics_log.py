"""Metrics logs: exact round trips, repair on resume, no duplicate/missing rows after a crash."""

from __future__ import annotations

import math
import sys
import types
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from flowrl.errors import MetricsError
from flowrl.metrics_log import MetricsLogger, MetricsWarning, read_metrics

# Floats whose shortest repr needs up to 17 significant digits, extremes and a float32 value.
TRICKY = [0.1 + 0.2, 1 / 3, 2.0**-1074, 1.7976931348623157e308, -0.0, 123456789.12345679]


def train_record(step: int) -> dict:
    """A deterministic record per step, so an interrupted run must reproduce it exactly."""
    return {"step": step, "loss": TRICKY[step % len(TRICKY)] * (step + 1), "lr": 3e-4}


def test_round_trip_jsonl_and_csv(tmp_path):
    records = [
        {"step": 0, "loss": v, "f32": np.float32(0.1), "jax": jnp.asarray(2.5), "n": np.int64(7),
         "ok": True, "name": "a,b \"c\""}
        for v in TRICKY
    ]
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        for r in records:
            logger.log(r)
        logger.log({"step": 5, "success": 0.02}, kind="eval")
    jsonl_path, csv_path = logger.paths("train")
    want = [
        {"step": 0, "loss": v, "f32": float(np.float32(0.1)), "jax": 2.5, "n": 7, "ok": True,
         "name": "a,b \"c\""}
        for v in TRICKY
    ]
    for got in (read_metrics(jsonl_path), read_metrics(csv_path)):
        assert got == want
        # == treats -0.0 == 0.0 and 1 == 1.0; check the exact bits and types too.
        assert [math.copysign(1, r["loss"]) for r in got] == [math.copysign(1, v) for v in TRICKY]
        assert all(type(r["loss"]) is float and type(r["n"]) is int for r in got)
    assert read_metrics(tmp_path / "logs" / "eval.csv") == [{"step": 5, "success": 0.02}]
    assert csv_path.read_text().splitlines()[0] == "step,loss,f32,jax,n,ok,name"


def test_nan_and_inf_round_trip(tmp_path):
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        logger.log({"step": 1, "a": float("nan"), "b": float("inf"), "c": -float("inf")})
    for path in logger.paths():
        (r,) = read_metrics(path)
        assert math.isnan(r["a"]) and r["b"] == math.inf and r["c"] == -math.inf


def test_resume_truncates_after_checkpoint_and_partial_line(tmp_path):
    logger = MetricsLogger(tmp_path, resume_from_step=None)
    for step in range(11):
        logger.log(train_record(step))
    jsonl_path, csv_path = logger.paths()
    # Crash mid-write: half a line in each file, no close().
    with open(jsonl_path, "a") as f:
        f.write('{"step": 11, "loss": 0.12')
    with open(csv_path, "a") as f:
        f.write("11,0.12")
    logger.close()

    resumed = MetricsLogger(tmp_path, resume_from_step=5)
    assert resumed.dropped_rows == {"train": 5 + 1}
    want = [train_record(s) for s in range(6)]
    assert read_metrics(jsonl_path) == want
    assert read_metrics(csv_path) == want
    assert jsonl_path.read_text().endswith("\n") and csv_path.read_text().endswith("\n")
    resumed.log(train_record(6))
    resumed.close()
    assert [r["step"] for r in read_metrics(csv_path)] == list(range(7))


def _train(run_dir, steps: int, *, crash_at: int | None = None, checkpoint_every: int = 4):
    """A tiny driver: logs every step, evaluates every 3, checkpoints every `checkpoint_every`.

    Follows the documented contract: log step S, `sync()`, then checkpoint S; resume at S + 1.
    Returns the last checkpointed step when it "crashes" (leaving a partial line behind).
    """
    checkpoint = run_dir / "checkpoint_step.txt"
    resume = int(checkpoint.read_text()) if checkpoint.exists() else None
    logger = MetricsLogger(run_dir, resume_from_step=resume)
    for step in range((resume + 1) if resume is not None else 0, steps):
        if step == crash_at:
            with logger.paths()[0].open("a") as f:
                f.write('{"step": %d, "lo' % step)
            logger.close()  # only releases handles: every complete line is already flushed
            return
        logger.log(train_record(step))
        if step % 3 == 0:
            logger.log({"step": step, "success": step / 50}, kind="eval")
        if step % checkpoint_every == 0:
            logger.sync()
            checkpoint.write_text(str(step))
    logger.close()


def test_crash_and_resume_gives_the_same_files_as_an_uninterrupted_run(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    _train(clean, 20)
    _train(crashed, 20, crash_at=10)   # last checkpoint 8; rows 9 and eval 9 were written
    _train(crashed, 20, crash_at=15)   # resumes at 9; last checkpoint 12
    _train(crashed, 20)                # resumes at 13
    for name in ("train.jsonl", "train.csv", "eval.jsonl", "eval.csv"):
        assert (crashed / "logs" / name).read_bytes() == (clean / "logs" / name).read_bytes()
    steps = [r["step"] for r in read_metrics(crashed / "logs" / "train.csv")]
    assert steps == list(range(20))  # no duplicates, none missing


def test_new_key_widens_the_csv(tmp_path):
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        logger.log({"step": 1, "loss": 1.5})
        logger.log({"step": 2, "loss": 0.5, "grad_norm": 3.0})
        logger.log({"step": 3, "grad_norm": 2.0})
    jsonl_path, csv_path = logger.paths()
    want = [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 0.5, "grad_norm": 3.0},
            {"step": 3, "grad_norm": 2.0}]
    assert read_metrics(csv_path) == want == read_metrics(jsonl_path)
    assert csv_path.read_text() == "step,loss,grad_norm\n1,1.5,\n2,0.5,3.0\n3,,2.0\n"


def test_fresh_start_drops_rows_of_a_run_without_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        logger.log(train_record(0))
        logger.log(train_record(1))
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        assert logger.dropped_rows == {"train": 2}
        logger.log(train_record(0))
    assert read_metrics(logger.paths()[1]) == [train_record(0)]


def test_bad_records(tmp_path):
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        with pytest.raises(MetricsError, match="'loss' has shape \\(3,\\)"):
            logger.log({"step": 0, "loss": np.zeros(3)})
        with pytest.raises(MetricsError, match="no 'step'"):
            logger.log({"loss": 1.0})
        with pytest.raises(MetricsError, match="step"):
            logger.log({"step": 1.5})
        with pytest.raises(MetricsError, match="kind"):
            logger.log({"step": 0}, kind="Eval/x")
        logger.log({"step": 4, "loss": 1.0})
        with pytest.raises(MetricsError, match="must not decrease"):
            logger.log({"step": 3, "loss": 1.0})
    assert read_metrics(logger.paths()[0]) == [{"step": 4, "loss": 1.0}]


def test_corrupt_line_is_reported_by_reader_and_repaired_on_resume(tmp_path):
    with MetricsLogger(tmp_path, resume_from_step=None) as logger:
        logger.log(train_record(0))
    jsonl_path = logger.paths()[0]
    with open(jsonl_path, "a") as f:
        f.write("\x00\x00garbage\n")
    with pytest.raises(MetricsError, match="corrupt"):
        read_metrics(jsonl_path)
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(MetricsError, match="not a metrics file"):
        read_metrics(tmp_path / "run.json")
    with pytest.raises(MetricsError, match="does not exist"):
        read_metrics(tmp_path / "logs" / "missing.csv")
    with MetricsLogger(tmp_path, resume_from_step=0) as logger:
        assert logger.dropped_rows == {"train": 1}
    assert read_metrics(jsonl_path) == [train_record(0)]


def test_wandb_asked_but_missing_warns_once_and_still_writes_files(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(MetricsWarning, match="wandb is not installed") as record:
        logger = MetricsLogger(tmp_path, resume_from_step=None, use_wandb=True)
        logger.log(train_record(0))
        logger.log(train_record(1))
        logger.close()
    assert len(record) == 1
    assert read_metrics(logger.paths()[1]) == [train_record(0), train_record(1)]


def test_wandb_used_only_when_asked(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with MetricsLogger(tmp_path / "a", resume_from_step=None) as logger:
        logger.log(train_record(0))
    assert calls == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with MetricsLogger(tmp_path / "b", resume_from_step=None, use_wandb=True,
                           wandb_kwargs={"project": "p"}) as logger:
            logger.log({"step": 3, "success": 0.5}, kind="eval")
    assert calls == [("init", {"project": "p"}), ("log", {"eval/success": 0.5}, 3), ("finish",)]
