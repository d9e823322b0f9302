"""Several seeds in one process (`train --seeds`, `train_many`): one run directory per seed, each
what a single-seed run writes — bit-identical on CPU in sequential mode, close under `vmap`."""

import csv

import equinox as eqx
import gin
import jax
import numpy as np
import pytest

import flowrl.train as train_module
from flowrl.checkpoint import list_checkpoints
from flowrl.cli import main, parse_gin, parse_seeds, seed_run_dirs
from flowrl.errors import ConfigError
from flowrl.ogbench import generate_dataset

TINY = [
    "flowrl.AgentConfig.actor_hidden_dims=(16, 16)",
    "flowrl.AgentConfig.critic_hidden_dims=(16, 16)",
    "flowrl.AgentConfig.num_critics=2",
    "flowrl.AgentConfig.batch_size=8",
    "qam.hidden_dims=(16, 16)",
    "qam.flow_steps=3",
    "train.offline_steps=60",
    "train.steps_per_call=20",
    "train.log_interval=20",
    "train.eval_interval=60",
    "train.save_interval=20",
    "train.eval_episodes=2",
    "train.eval_max_episode_steps=15",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ogbench-data")
    generate_dataset("cube-double-play", episodes=2, workers=1, directory=directory, seed=0,
                     max_episode_steps=41, progress=False)
    return directory


def configure(data_dir, *extra):
    gin.clear_config()
    return parse_gin(["qam/cube-double-play.gin"], [*TINY, f"train.data_dir='{data_dir}'", *extra])


def is_timing(column):
    return column.startswith("time/") or "seconds" in column or "per_second" in column


def rows(path):
    """A log's rows without its wall-clock columns (the only ones allowed to differ)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if not is_timing(k)} for row in csv.DictReader(f)]


def arrays(state):
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(state, eqx.is_inexact_array))]


@pytest.fixture(scope="module")
def singles(data_dir, tmp_path_factory):
    """Seeds 3 and 5 each trained alone (the reference the multi-seed runs must reproduce)."""
    root = tmp_path_factory.mktemp("singles")
    out = {}
    for seed in (3, 5):
        config_text = configure(data_dir)
        out[seed] = train_module.train(root / f"s{seed}", seed=seed, config_text=config_text, progress=False)
    gin.clear_config()
    return out


def test_sequential_seeds_are_bit_identical_to_single_seed_runs(data_dir, singles, tmp_path):
    config_text = configure(data_dir)
    many = train_module.train_many([tmp_path / "a", tmp_path / "b"], [3, 5], config_text=config_text)
    assert [m["seed_parallelism"] for m in many] == ["sequential"] * 2  # 'auto' on CPU
    for summary, seed in zip(many, (3, 5)):
        single = singles[seed]
        for got, want in zip(arrays(summary["state"]), arrays(single["state"])):
            np.testing.assert_array_equal(got, want)
        assert rows(summary["train_csv"]) == rows(single["train_csv"])
        assert rows(summary["eval_csv"]) == rows(single["eval_csv"])
        assert [c.step for c in list_checkpoints(summary["checkpoint_dir"])] == \
               [c.step for c in list_checkpoints(single["checkpoint_dir"])]
    # The two seeds really are different runs.
    assert not np.array_equal(arrays(many[0]["state"])[0], arrays(many[1]["state"])[0])


def test_vmapped_seeds_match_single_seed_runs_to_float_rounding(data_dir, singles, tmp_path):
    config_text = configure(data_dir, "train.seed_parallelism='vmap'")
    many = train_module.train_many([tmp_path / "a", tmp_path / "b"], [3, 5], config_text=config_text)
    assert many[0]["seed_parallelism"] == "vmap"
    for summary, seed in zip(many, (3, 5)):
        got, want = rows(summary["train_csv"]), rows(singles[seed]["train_csv"])
        assert [r["step"] for r in got] == [r["step"] for r in want]
        for g, w in zip(got, want):
            for key in ("critic/loss", "bc/loss", "extractor/loss"):
                np.testing.assert_allclose(float(g[key]), float(w[key]), rtol=2e-3, atol=1e-5)


def test_resume_with_seeds_at_different_steps(data_dir, singles, tmp_path, monkeypatch):
    """Seed 3 was killed after its step-40 checkpoint, seed 5 never started: a resumed
    multi-seed job catches seed 3 up and ends both exactly as the uninterrupted single runs."""
    import flowrl.checkpoint as checkpoint_module

    config_text = configure(data_dir)
    real_save = checkpoint_module.save_checkpoint

    def save_then_die(directory, step, tree, **kwargs):
        real_save(directory, step, tree, **kwargs)
        if step == 40:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(tmp_path / "a", seed=3, config_text=config_text, progress=False)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    many = train_module.train_many([tmp_path / "a", tmp_path / "b"], [3, 5], resume=True,
                                   config_text=config_text)
    assert [m["start_step"] for m in many] == [40, 0]
    for summary, seed in zip(many, (3, 5)):
        for got, want in zip(arrays(summary["state"]), arrays(singles[seed]["state"])):
            np.testing.assert_array_equal(got, want)
        assert rows(summary["train_csv"]) == rows(singles[seed]["train_csv"])


def test_cli_seeds_writes_one_run_directory_per_seed(data_dir, tmp_path, capsys):
    bindings = [arg for b in [*TINY, f"train.data_dir='{data_dir}'", "train.eval_episodes=0"]
                for arg in ("--bind", b)]
    code = main(["train", "qam/cube-double-play.gin", *bindings, "--seeds", "0,1",
                 "--out", str(tmp_path / "run-{seed}"), "--no-progress"])
    assert code == 0
    for seed in (0, 1):
        run = tmp_path / f"run-{seed}"
        assert [r["step"] for r in rows(run / "logs" / "train.csv")] == ["20", "40", "60"]
        assert f'"seed": {seed}' in (run / "run.json").read_text()
    assert "seed 1" in capsys.readouterr().out


def test_seed_parsing_and_directory_naming():
    assert parse_seeds("0,1,2,3") == [0, 1, 2, 3]
    assert parse_seeds("2-4,7") == [2, 3, 4, 7]
    for bad in ("", "a", "1,1", "3-x"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)
    assert seed_run_dirs("out", ["qam/cube.gin"], [4]) == [seed_run_dirs("out", [], [4])[0]]
    assert [p.name for p in seed_run_dirs("out", [], [1, 2])] == ["seed1", "seed2"]
    assert [str(p) for p in seed_run_dirs("r{seed}x", [], [1, 2])] == ["r1x", "r2x"]
    assert [p.name for p in seed_run_dirs(None, ["qam/cube.gin"], [0, 1])] == ["cube-seed0", "cube-seed1"]


def test_a_refused_directory_stops_every_seed_before_anything_is_written(data_dir, tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    config_text = configure(data_dir)
    with pytest.raises(Exception, match="not a flowrl run"):
        train_module.train_many([tmp_path / "a", tmp_path / "b"], [0, 1], config_text=config_text)
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_bad_seed_parallelism_is_a_config_error(data_dir, tmp_path):
    config_text = configure(data_dir, "train.seed_parallelism='threads'")
    with pytest.raises(ConfigError, match="seed_parallelism"):
        train_module.train(tmp_path / "a", seed=0, config_text=config_text, progress=False)
