"""Every registered extractor trains end to end on a tiny generated dataset (no per-method code).

Through `flowrl.train.train` with tiny networks: 100 updates in 2 fused chunks, a checkpoint, one
short evaluation episode; the logged losses must be finite.
"""

import csv

import numpy as np
import pytest

import extractors  # noqa: F401
from flowrl.agent import AgentConfig
from flowrl.ogbench import generate_dataset
from flowrl.registry import REGISTRY
from flowrl.train import train
from tests.test_extractor_contract import shrink

ENV = "cube-double-play-singletask-task2-v0"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smoke-data")
    generate_dataset("cube-double-play", episodes=2, workers=1, directory=directory, seed=1,
                     max_episode_steps=41, progress=False)
    return directory


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_extractor_trains_on_tiny_dataset(name, data_dir, tmp_path):
    config = AgentConfig(horizon=5, batch_size=8, num_critics=2, actor_hidden_dims=(16, 16),
                         critic_hidden_dims=(16, 16))
    summary = train(
        tmp_path / name, env_name=ENV, extractor=shrink(REGISTRY[name]()), agent=config,
        data_dir=str(data_dir), offline_steps=100, steps_per_call=50, log_interval=50,
        eval_interval=100, save_interval=100, eval_episodes=1, eval_max_episode_steps=10,
        progress=False,
    )
    with open(tmp_path / name / "logs" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [50, 100]
    for row in rows:
        for key in ("loss/total", "critic/loss"):
            assert np.isfinite(float(row[key])), (name, key, row[key])
    assert summary["success"] is not None
    assert list((tmp_path / name / "checkpoints").glob("*.json"))
