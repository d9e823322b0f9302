"""End to end: tiny generated dataset → train → evaluate → checkpoint → resume, and bad input.

Tiny networks and a 3-episode dataset keep this to about a minute on a 2-core CPU.
"""

import csv
import os

import equinox as eqx
import jax
import numpy as np
import pytest

import flowrl.train as train_module
from flowrl.cli import main, parse_gin
from flowrl.errors import FlowRLError
from flowrl.ogbench import generate_dataset

ENV = "cube-double-play-singletask-task2-v0"
TINY = [
    "flowrl.AgentConfig.actor_hidden_dims=(32, 32)",
    "flowrl.AgentConfig.critic_hidden_dims=(32, 32)",
    "flowrl.AgentConfig.num_critics=2",
    "flowrl.AgentConfig.batch_size=16",
    "qam.hidden_dims=(32, 32)",
    "qam.flow_steps=4",
    "train.offline_steps=200",
    "train.steps_per_call=50",
    "train.log_interval=50",
    "train.eval_interval=100",
    "train.save_interval=100",
    "train.eval_episodes=2",
    "train.eval_max_episode_steps=30",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ogbench-data")
    generate_dataset("cube-double-play", episodes=3, workers=1, directory=directory, seed=0,
                     max_episode_steps=61, progress=False)
    return directory


def tiny_bindings(data_dir, *extra):
    return [*TINY, f"train.data_dir='{data_dir}'", *extra]


def run_train(data_dir, out, *extra, resume=False, seed=0):
    config_text = parse_gin(["qam/cube-double-play.gin"], tiny_bindings(data_dir, *extra))
    return train_module.train(out, seed=seed, resume=resume, config_text=config_text, progress=False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def params_of(state):
    return eqx.filter(state, eqx.is_inexact_array)


def test_train_evaluate_checkpoint_and_resume(data_dir, tmp_path, monkeypatch):
    import gin

    full = run_train(data_dir, tmp_path / "full")
    gin.clear_config()
    run = tmp_path / "full"
    train_rows = read_csv(run / "logs" / "train.csv")
    eval_rows = read_csv(run / "logs" / "eval.csv")
    assert [int(r["step"]) for r in train_rows] == [50, 100, 150, 200]
    assert [int(r["step"]) for r in eval_rows] == [100, 200]
    assert all(0.0 <= float(r["success"] if "success" in r else r["eval/success"]) <= 1.0 for r in eval_rows)
    for row in train_rows:
        assert np.isfinite(float(row["critic/loss"])) and np.isfinite(float(row["extractor/loss"]))
    assert (run / "config.gin").read_text().count("qam.inv_temp") == 1
    assert sorted(p.name for p in (run / "checkpoints").glob("*.json"))[-1].endswith(".json")
    assert full["success"] is not None

    # Kill after the step-100 checkpoint, then resume: same parameters and metrics as `full`.
    real_save = train_module.save_checkpoint

    def save_then_die(directory, step, tree, **kwargs):
        path = real_save(directory, step, tree, **kwargs)
        if step == 100:
            raise KeyboardInterrupt("simulated preemption")
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(data_dir, tmp_path / "resumed")
    gin.clear_config()
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    resumed = run_train(data_dir, tmp_path / "resumed", resume=True)
    assert resumed["start_step"] == 100

    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params_of(full["state"]), params_of(resumed["state"]))
    assert all(jax.tree.leaves(same)), "resumed parameters differ from the uninterrupted run"

    def strip_timing(rows):
        return [{k: v for k, v in r.items() if "second" not in k and "time/" not in k} for r in rows]

    assert strip_timing(read_csv(tmp_path / "resumed" / "logs" / "train.csv")) == strip_timing(train_rows)
    assert strip_timing(read_csv(tmp_path / "resumed" / "logs" / "eval.csv")) == strip_timing(eval_rows)


def _cli(data_dir, out, *extra):
    args = ["train", "qam/cube-double-play.gin", "--out", str(out), "--no-progress"]
    for binding in tiny_bindings(data_dir, *extra):
        args += ["--bind", binding]
    return main(args)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("flowrl: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_missing_dataset_names_file_and_command(tmp_path, capsys):
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert _cli(empty, tmp_path / "run") == 2
    line = _one_error_line(capsys)
    assert "cube-double-play-v0.npz" in line and "flowrl data generate" in line
    assert not (tmp_path / "run").exists(), "a failed start must not create the run directory"


def test_dataset_with_nan_names_key_and_row(data_dir, tmp_path, capsys):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for name in ("cube-double-play-v0.npz", "cube-double-play-v0-val.npz"):
        with np.load(data_dir / name, allow_pickle=False) as f:
            arrays = {k: f[k].copy() for k in f.files}
        arrays["actions"][7, 2] = np.nan
        np.savez(bad_dir / name, **arrays)
    assert _cli(bad_dir, tmp_path / "run") == 2
    line = _one_error_line(capsys)
    assert "actions" in line and "7" in line


def test_dimension_mismatch_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_module, "load_training_data", lambda *a, **k: (
        {"observations": np.zeros((10, 3), np.float32), "actions": np.zeros((10, 5), np.float32)}, {}))
    assert _cli(data_dir, tmp_path / "run") == 2
    line = _one_error_line(capsys)
    assert "observation dim 3" in line and "37" in line


def test_refuses_a_directory_holding_a_different_run(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli(data_dir, out, "train.offline_steps=50", "train.eval_interval=50", "train.save_interval=50") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _cli(data_dir, out, "qam.inv_temp=2.0") == 2
    line = _one_error_line(capsys)
    assert "--overwrite" in line
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after, "a refused start must not touch the existing run"


def test_interval_not_multiple_of_chunk_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(FlowRLError, match="steps_per_call"):
        run_train(data_dir, tmp_path / "run", "train.log_interval=30")
