"""Online phase (METHODS.md §1.3): buffer growth, balanced sampling, action queue, sparse rewards,
offline-then-online runs through `flowrl.train.train`, and exact resume inside the online phase.

Tiny networks, a 3-episode generated dataset, 20–40-step episodes; the online block compiles once
per configuration (module-level jit), so a resumed run reuses the uninterrupted run's compile.
"""

import csv
import math

import equinox as eqx
import jax
import numpy as np
import pytest

import flowrl.train as train_module
from flowrl.checkpoint import list_checkpoints, load_checkpoint
from flowrl.cli import build_parser, online_bindings, parse_gin
from flowrl.errors import ConfigError
from flowrl.ogbench import generate_dataset, load_dataset
from flowrl.online import (
    ActionQueue,
    OnlinePhase,
    ReplayBufferTooLargeError,
    append_rows,
    balanced_sample,
    check_buffer_fits,
    empty_buffer,
    extend_buffer,
    online_checkpoint_template,
    sparse_rewards,
    transition_bytes,
)
from flowrl.replay import SequenceDataset

ENV = "cube-double-play-singletask-task2-v0"
TINY_AGENT = [
    "flowrl.AgentConfig.actor_hidden_dims=(16, 16)",
    "flowrl.AgentConfig.critic_hidden_dims=(16, 16)",
    "flowrl.AgentConfig.num_critics=2",
    "flowrl.AgentConfig.batch_size=8",
    "train.steps_per_call=50",
    "train.log_interval=50",
    "train.save_interval=50",
    "train.eval_interval=100",
    "train.eval_episodes=2",
    "train.eval_max_episode_steps=20",
    "train.online_max_episode_steps=23",  # not a multiple of H = 5: the last chunk is cut by the time limit
]
QAM = ["qam.hidden_dims=(16, 16)", "qam.flow_steps=3", "train.sparse=True"]  # online rewards converted too
RLPD = ["rlpd.hidden_dims=(16, 16)", "train.online_steps=150", "train.random_action_steps=30",
        "train.start_training=30"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ogbench-data")
    generate_dataset("cube-double-play", episodes=3, workers=1, directory=directory, seed=0,
                     max_episode_steps=61, progress=False)
    return directory


def run(config, data_dir, out, *extra, resume=False):
    config_text = parse_gin([config], [*TINY_AGENT, f"train.data_dir='{data_dir}'", *extra])
    return train_module.train(out, seed=0, resume=resume, config_text=config_text, progress=False)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timing(rows):
    return [{k: v for k, v in r.items() if "second" not in k and not k.startswith("time/")} for r in rows]


def params_equal(a, b):
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), eqx.filter(a, eqx.is_array), eqx.filter(b, eqx.is_array))
    return all(jax.tree.leaves(same))


# --------------------------------------------------------------------------------------------------
# Units


def test_sparse_conversion_is_the_dataset_rule(data_dir):
    assert sparse_rewards(np.array([-2.0, 0.0, -1.0, 0.5], np.float32)).tolist() == [-1.0, 0.0, -1.0, -1.0]
    assert sparse_rewards(-0.0) == 0.0 and sparse_rewards(0.0).dtype == np.float32
    dense = load_dataset(ENV, data_dir, sparse=False)
    sparse = load_dataset(ENV, data_dir, sparse=True)
    np.testing.assert_array_equal(sparse_rewards(dense["rewards"]), sparse["rewards"])


def test_action_queue_is_time_major_and_clears():
    queue = ActionQueue(horizon=3, action_dim=2)
    assert len(queue) == 0
    queue.fill(np.arange(6, dtype=np.float32))  # a_0 = (0, 1), a_1 = (2, 3), a_2 = (4, 5)
    assert queue.pop().tolist() == [0.0, 1.0] and len(queue) == 2
    actions, queued = queue.state()
    restored = ActionQueue(3, 2)
    restored.restore(actions, queued)
    assert restored.pop().tolist() == [2.0, 3.0] and queue.pop().tolist() == [2.0, 3.0]
    queue.clear()
    assert len(queue) == 0
    with pytest.raises(RuntimeError):
        queue.pop()


def test_buffer_appends_without_losing_rows_and_balanced_halves():
    horizon = 2
    offline = SequenceDataset.from_numpy({
        "observations": np.arange(8, dtype=np.float32).reshape(4, 2), "actions": np.zeros((4, 1), np.float32),
        "rewards": np.zeros(4, np.float32), "masks": np.ones(4, np.float32),
        "terminals": np.array([0, 0, 0, 1], np.float32), "next_observations": np.zeros((4, 2), np.float32),
    })
    buffer = extend_buffer(offline, 3, horizon)
    assert buffer.capacity == 4 + 3 + horizon - 1 and int(buffer.size) == 4

    def rows(values):
        k = horizon
        obs = np.full((k, 2), -1.0, np.float32)
        obs[: len(values)] = np.asarray(values, np.float32)[:, None]
        return {"observations": obs, "actions": np.zeros((k, 1), np.float32), "rewards": np.zeros(k, np.float32),
                "masks": np.ones(k, np.float32), "terminals": np.zeros(k, np.float32),
                "next_observations": obs}

    buffer = append_rows(buffer, rows([100.0]), 1)  # one real row; the padding row must not land
    buffer = append_rows(buffer, rows([101.0, 102.0]), 2)
    assert int(buffer.size) == 7
    np.testing.assert_array_equal(np.asarray(buffer.observations[:, 0]), [0, 2, 4, 6, 100, 101, 102, 0])

    online = append_rows(empty_buffer(4, 2, 1, horizon), rows([7.0, 7.0]), 2)
    batch = balanced_sample(offline, online, jax.random.key(0), 6, horizon, 0.9)
    assert batch.observations.shape == (6, 2)
    assert np.all(np.asarray(batch.observations[:3, 0]) <= 4) and np.all(np.asarray(batch.observations[3:, 0]) == 7)


def test_buffer_memory_and_too_big_message():
    assert transition_bytes(40, 5) == 352  # cube-double shapes: 352 MB per million transitions
    fits = check_buffer_fits(1_000_000, 40, 5, available=2**40)
    assert "1,000,000 transitions" in fits and "352 MB per million" in fits and "cpu" in fits
    with pytest.raises(ReplayBufferTooLargeError) as error:
        check_buffer_fits(1_500_000, 40, 5, available=100 * 2**20)
    message = str(error.value)
    assert "\n" not in message and f"{1_500_000 * 352 / 2**20:,.0f} MiB" in message and "100 MiB" in message and "online_steps" in message


def test_too_big_buffer_is_refused_before_the_run_starts(data_dir, tmp_path, monkeypatch):
    import flowrl.online

    monkeypatch.setattr(flowrl.online, "available_bytes", lambda device=None: 1000)
    with pytest.raises(ReplayBufferTooLargeError, match="train.online_steps"):
        run("rlpd/cube-double-play.gin", data_dir, tmp_path / "r", *RLPD)
    assert not (tmp_path / "r").exists()


def test_cli_flags_become_bindings():
    args = build_parser().parse_args(["train", "x.gin", "--online-steps", "300", "--online-only"])
    assert online_bindings(args) == ["train.online_steps=300", "train.offline_steps=0"]
    assert online_bindings(build_parser().parse_args(["train", "x.gin"])) == []


def test_balanced_sampling_needs_start_training_of_a_chunk(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="start_training"):
        run("rlpd/cube-double-play.gin", data_dir, tmp_path / "r", *RLPD, "train.start_training=2")
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# End to end


def _check_buffer_chain(rows, extra, max_episode_steps):
    """Every online transition once, in order: next_obs of row t is obs of row t + 1 inside an episode."""
    n = rows["observations"].shape[0]
    assert n == extra["online_step"]
    terminals = rows["terminals"]
    inside = terminals[:-1] == 0
    np.testing.assert_array_equal(rows["next_observations"][:-1][inside], rows["observations"][1:][inside])
    ends = np.flatnonzero(terminals)
    lengths = np.diff(np.concatenate([[-1], ends]))
    assert np.all(lengths <= max_episode_steps) and np.all(lengths[rows["masks"][ends] == 1] == max_episode_steps)


def test_qam_offline_then_online_and_queue_semantics(data_dir, tmp_path, monkeypatch):
    calls = []
    real_policy = OnlinePhase._policy

    def counting_policy(self, state, observation, step):
        calls.append((step, self.progress.episode_start))
        return real_policy(self, state, observation, step)

    monkeypatch.setattr(OnlinePhase, "_policy", counting_policy)
    summary = run("qam/cube-double-play.gin", data_dir, tmp_path / "q", *QAM, "train.offline_steps=100",
                  "train.online_steps=100", "train.start_training=10")
    out = tmp_path / "q"
    train_rows, eval_rows = read_csv(out / "logs" / "train.csv"), read_csv(out / "logs" / "eval.csv")
    assert [int(r["step"]) for r in train_rows] == [50, 100, 150, 200]  # one step axis: offline, then online
    assert [int(r["step"]) for r in eval_rows] == [100, 200]
    online_rows = train_rows[2:]
    assert [float(r["online/updates"]) for r in online_rows] == [40.0, 50.0]  # none before start_training
    assert all(math.isfinite(float(r["critic/loss"])) for r in online_rows)
    assert float(online_rows[-1]["online/buffer_size"]) == float(online_rows[0]["online/buffer_size"]) + 50
    assert summary["final_step"] == 200 and summary["online"]["env_steps"] == 100
    # One policy call per H = 5 steps, restarted at each episode start (23-step episodes: 5 calls each).
    offsets = [step - start for step, start in calls]
    assert all(offset % 5 == 0 for offset in offsets) and sorted(set(offsets)) == [0, 5, 10, 15, 20]
    assert len(calls) == 4 * 5 + 2  # episodes of 23, 23, 23, 23 and 8 steps: 5 + 5 + 5 + 5 + 2 calls
    info = list_checkpoints(out / "checkpoints")[-1]
    _, tree, _ = load_checkpoint(info.metadata_path, online_checkpoint_template(summary["state"], info.extra, 37, 5, 5))
    assert set(np.unique(tree["rows"]["rewards"]).tolist()) <= {-1.0, 0.0}  # sparse: −1 unless all cubes placed

    # Killed after the online checkpoint at step 150 (online step 50: mid-episode, mid-chunk), resumed.
    real_save = train_module.save_checkpoint

    def save_then_die(directory, step, tree, **kwargs):
        path = real_save(directory, step, tree, **kwargs)
        if step == 150:
            raise KeyboardInterrupt("simulated preemption in the online phase")
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run("qam/cube-double-play.gin", data_dir, tmp_path / "k", *QAM, "train.offline_steps=100",
            "train.online_steps=100", "train.start_training=10")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    extra = list_checkpoints(tmp_path / "k" / "checkpoints")[-1].extra
    assert extra["queued"] > 0 and not extra["progress"]["needs_reset"]
    resumed = run("qam/cube-double-play.gin", data_dir, tmp_path / "k", *QAM, "train.offline_steps=100",
                  "train.online_steps=100", "train.start_training=10", resume=True)
    assert resumed["start_step"] == 150
    assert params_equal(summary["state"], resumed["state"])
    assert without_timing(read_csv(tmp_path / "k" / "logs" / "train.csv")) == without_timing(train_rows)
    assert without_timing(read_csv(tmp_path / "k" / "logs" / "eval.csv")) == without_timing(eval_rows)


def test_rlpd_online_only_resume_is_exact(data_dir, tmp_path, monkeypatch):
    config = "rlpd/cube-double-play.gin"
    full = run(config, data_dir, tmp_path / "full", *RLPD)
    assert full["start_step"] == 0 and full["final_step"] == 150
    full_train = read_csv(tmp_path / "full" / "logs" / "train.csv")
    assert [int(r["step"]) for r in full_train] == [50, 100, 150]
    assert float(full_train[0]["online/updates"]) == 20.0  # updates from step 30 on
    assert "154 transitions" in full["online"]["buffer"]  # online only (balanced): 150 rows + H − 1 spare

    real_save = train_module.save_checkpoint

    def save_then_die(directory, step, tree, **kwargs):
        path = real_save(directory, step, tree, **kwargs)
        if step == 100:
            raise KeyboardInterrupt("simulated preemption in the online phase")
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(config, data_dir, tmp_path / "resumed", *RLPD)
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    info = list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]
    assert info.step == 100 and info.extra["phase"] == "online" and not info.extra["progress"]["needs_reset"]
    resumed = run(config, data_dir, tmp_path / "resumed", *RLPD, resume=True)
    assert resumed["start_step"] == 100

    assert params_equal(full["state"], resumed["state"]), "resumed parameters differ from the uninterrupted run"
    assert without_timing(read_csv(tmp_path / "resumed" / "logs" / "train.csv")) == without_timing(full_train)
    assert without_timing(read_csv(tmp_path / "resumed" / "logs" / "eval.csv")) == without_timing(
        read_csv(tmp_path / "full" / "logs" / "eval.csv"))

    # The final checkpoints hold every online transition: identical, each exactly once, chained.
    like = lambda extra: online_checkpoint_template(full["state"], extra, 37, 5, 5)  # noqa: E731
    last = {}
    for name in ("full", "resumed"):
        info = list_checkpoints(tmp_path / name / "checkpoints")[-1]
        assert info.step == 150
        _, tree, extra = load_checkpoint(info.metadata_path, like(info.extra))
        last[name] = (tree["rows"], extra)
    for field, values in last["full"][0].items():
        np.testing.assert_array_equal(values, last["resumed"][0][field], err_msg=field)
    _check_buffer_chain(*last["resumed"], max_episode_steps=23)
    assert -2.0 in last["full"][0]["rewards"]  # dense cube-double rewards (−#cubes misplaced), not converted
    assert np.all(np.abs(last["full"][0]["actions"][:30]) <= 1.0)  # uniform warm-up actions
