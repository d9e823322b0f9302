"""`flowrl.ogbench.datasets` / `domains`: loading semantics (METHODS.md §2.1–2.2) and validation errors."""

import shutil
import socket
import urllib.request

import numpy as np
import pytest

from flowrl.errors import DatasetError as FlowRLDatasetError
from flowrl.ogbench.datasets import (
    ACTION_CLIP,
    DatasetError,
    find_shards,
    load_dataset,
    load_shard,
    read_dataset_file,
)
from flowrl.ogbench.domains import DOMAINS, UnknownEnvError, env_dims, parse_env_name
from flowrl.ogbench.generate import generate_dataset

STEPS = 51
KEYS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tiny generated datasets (2 train + 1 val episodes of 51 rows) for three domains."""
    directory = tmp_path_factory.mktemp("ogbench")
    for domain in ("cube-double", "scene", "puzzle-3x3"):
        generate_dataset(domain, episodes=2, workers=1, directory=directory, max_episode_steps=STEPS, progress=False)
    return directory


def raw_arrays(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def ogbench_datasets(env_name, train_path):
    import ogbench

    env, train, val = ogbench.make_env_and_datasets(env_name, dataset_path=str(train_path))
    env.close()
    return train, val


@pytest.mark.parametrize(
    "env_name",
    [
        "cube-double-play-singletask-v0",
        "cube-double-play-singletask-task4-v0",
        "scene-play-singletask-task5-v0",
        "puzzle-3x3-play-singletask-task1-v0",
    ],
)
def test_loader_equals_ogbench_including_relabelled_rewards(data_dir, env_name):
    domain = parse_env_name(env_name).domain
    ours = load_dataset(env_name, data_dir, clip_actions=False)
    ours_val = load_dataset(env_name, data_dir, clip_actions=False, split="val")
    theirs, theirs_val = ogbench_datasets(env_name, data_dir / domain.train_file)
    for mine, reference in ((ours, theirs), (ours_val, theirs_val)):
        assert set(mine) == set(KEYS)
        for key in KEYS:
            assert mine[key].dtype == np.float32, key
            np.testing.assert_array_equal(mine[key], reference[key], err_msg=key)
    assert ours["observations"].shape == (2 * (STEPS - 1), domain.ob_dim)
    # manipulation: mask 0 exactly when every sub-goal holds, i.e. when the reward is 0.
    np.testing.assert_array_equal(ours["masks"], (ours["rewards"] != 0).astype(np.float32))
    # terminals on the last transition of each episode.
    np.testing.assert_array_equal(np.flatnonzero(ours["terminals"]), [STEPS - 2, 2 * STEPS - 3])

    clipped = load_dataset(env_name, data_dir)
    np.testing.assert_array_equal(clipped["actions"], np.clip(theirs["actions"], -1 + ACTION_CLIP, 1 - ACTION_CLIP))
    assert np.abs(clipped["actions"]).max() <= np.float32(1 - ACTION_CLIP)


def test_relabelling_and_sparse_on_crafted_successes(data_dir, tmp_path):
    """cube-double task2 goals are cubes at (0.35, 0.1, 0.02) and (0.5, 0.1, 0.02) (ogbench task_infos)."""
    raw = raw_arrays(data_dir / "cube-double-play-v0.npz")
    cube0, cube1 = slice(14, 17), slice(21, 24)  # xyz of the two cubes' free joints in qpos
    raw["qpos"][10:15, cube0] = (0.35, 0.1, 0.02)
    raw["qpos"][10:15, cube1] = (0.5, 0.1, 0.02)
    raw["qpos"][20, cube0] = (0.36, 0.11, 0.03)  # within 0.04 m: one of two sub-goals holds
    raw["qpos"][20, cube1] = (0.0, 0.0, 0.02)
    np.savez_compressed(tmp_path / "cube-double-play-v0.npz", **raw)
    shutil.copy(data_dir / "cube-double-play-v0-val.npz", tmp_path)

    env_name = "cube-double-play-singletask-task2-v0"
    dense = load_dataset(env_name, tmp_path)
    sparse = load_dataset(env_name, tmp_path, sparse=True)
    theirs, _ = ogbench_datasets(env_name, tmp_path / "cube-double-play-v0.npz")
    np.testing.assert_array_equal(dense["rewards"], theirs["rewards"])
    np.testing.assert_array_equal(dense["masks"], theirs["masks"])
    assert dense["rewards"][10:15].tolist() == [0.0] * 5 and dense["masks"][10:15].tolist() == [0.0] * 5
    assert dense["rewards"][20] == -1.0 and dense["masks"][20] == 1.0
    # Sparse (METHODS.md §2.2): r ← −1 if r ≠ 0 else 0; masks unchanged.
    np.testing.assert_array_equal(sparse["rewards"], np.where(dense["rewards"] != 0, -1.0, 0.0).astype(np.float32))
    assert sparse["rewards"][20] == -1.0 and sparse["rewards"][10] == 0.0
    np.testing.assert_array_equal(sparse["masks"], dense["masks"])


def test_locomotion_file_relabels_like_ogbench_and_missing_file_says_not_generable(tmp_path):
    """A format-valid synthetic antmaze-large file; task1's goal is (36, 24) with tolerance 0.5."""
    rng = np.random.default_rng(0)
    rows = 40
    raw = {
        "observations": rng.normal(size=(rows, 29)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(rows, 8)).astype(np.float32),
        "terminals": np.zeros(rows, bool),
        "qpos": rng.normal(size=(rows, 15)).astype(np.float32),
        "qvel": rng.normal(size=(rows, 14)).astype(np.float32),
    }
    raw["terminals"][[19, 39]] = True
    raw["qpos"][[5, 6, 25], :2] = (36.2, 23.9)  # within 0.5 of the goal
    raw["qpos"][7, :2] = (36.6, 24.0)  # 0.6 away: not a success
    env_name = "antmaze-large-navigate-singletask-task1-v0"
    with pytest.raises(DatasetError, match="cannot be generated locally.*place the official OGBench file at"):
        load_dataset(env_name, tmp_path)
    np.savez_compressed(tmp_path / "antmaze-large-navigate-v0.npz", **raw)
    np.savez_compressed(tmp_path / "antmaze-large-navigate-v0-val.npz", **raw)

    ours = load_dataset(env_name, tmp_path)
    theirs, _ = ogbench_datasets(env_name, tmp_path / "antmaze-large-navigate-v0.npz")
    for key in ("rewards", "masks", "observations", "next_observations", "terminals"):
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # Row 25 is transition 24 after dropping episode 0's last row (19).
    assert np.flatnonzero(ours["rewards"] == 0).tolist() == [5, 6, 24]
    np.testing.assert_array_equal(ours["masks"], -ours["rewards"])


def test_shards_are_found_sorted_and_loaded_without_clipping(data_dir, tmp_path):
    shard_dir = tmp_path / "cube-double-play-100m-v0"
    shard_dir.mkdir()
    other = tmp_path / "other"
    generate_dataset("cube-double", episodes=1, workers=1, directory=other, seed=1, max_episode_steps=STEPS,
                     progress=False)
    shutil.copy(data_dir / "cube-double-play-v0.npz", shard_dir / "cube-double-play-v0-000.npz")
    shutil.copy(data_dir / "cube-double-play-v0-val.npz", shard_dir / "cube-double-play-v0-000-val.npz")
    shutil.copy(other / "cube-double-play-v0.npz", shard_dir / "cube-double-play-v0-001.npz")
    shutil.copy(other / "cube-double-play-v0-val.npz", shard_dir / "cube-double-play-v0-001-val.npz")
    (shard_dir / "notes.npz").write_bytes(b"ignored")

    env_name = "cube-double-play-singletask-v0"
    assert [p.name for p in find_shards(env_name, tmp_path)] == ["cube-double-play-v0-000.npz", "cube-double-play-v0-001.npz"]
    assert find_shards(env_name, shard_dir) == find_shards(env_name, tmp_path)  # the shard dir itself also works

    first = load_shard(env_name, tmp_path, 0)
    standard = load_dataset(env_name, data_dir, clip_actions=False)
    for key in KEYS:
        np.testing.assert_array_equal(first[key], standard[key], err_msg=key)
    assert np.abs(first["actions"]).max() == 1.0  # QAM's 100M path does not clip
    second = load_shard(env_name, tmp_path, 1)
    assert second["observations"].shape == (STEPS - 1, 37)
    np.testing.assert_array_equal(load_shard(env_name, tmp_path, 3)["observations"], second["observations"])  # cyclic
    assert load_shard(env_name, tmp_path, 1, split="val")["observations"].shape == (STEPS - 1, 37)
    with pytest.raises(DatasetError, match="no shard files cube-quadruple-play-v0-NNN.npz"):
        load_shard("cube-quadruple-play-singletask-v0", tmp_path, 0)


# --------------------------------------------------------------------------------------------------
# Validation: every bad input gives one DatasetError line naming the problem.


def write_variant(tmp_path, data_dir, mutate, *, domain="cube-double-play", compressed=False):
    raw = raw_arrays(data_dir / f"{domain}-v0.npz")
    mutate(raw)
    path = tmp_path / f"{domain}-v0.npz"
    (np.savez_compressed if compressed else np.savez)(path, **raw)
    return path


def expect_error(directory, pattern, *, domain="cube-double-play"):
    """load_dataset(<domain>-singletask-v0, directory) raises one DatasetError line matching `pattern`."""
    env_name = f"{domain}-singletask-v0"
    with pytest.raises(DatasetError, match=pattern) as info:
        load_dataset(env_name, directory)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_file_and_command(tmp_path):
    message = expect_error(tmp_path, "not found")
    assert str(tmp_path / "cube-double-play-v0.npz") in message
    assert f"flowrl data generate cube-double-play --dir {tmp_path}" in message
    with pytest.raises(DatasetError, match="cube-double-play-v0-val.npz not found"):
        load_dataset("cube-double-play-singletask-v0", tmp_path, split="val")


def test_truncated_and_non_zip_files(tmp_path, data_dir):
    good = (data_dir / "cube-double-play-v0.npz").read_bytes()
    path = tmp_path / "cube-double-play-v0.npz"
    path.write_bytes(good[: len(good) // 2])
    expect_error(tmp_path, r"not a readable \.npz archive .*truncated download")
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    expect_error(tmp_path, r"not an \.npz archive .*pickled or arbitrary data")
    np.save(tmp_path / "single.npy", np.zeros((3, 37), np.float32))
    shutil.move(tmp_path / "single.npy", path)
    expect_error(tmp_path, r"single \.npy array")


def test_bad_crc(tmp_path, data_dir):
    path = write_variant(tmp_path, data_dir, lambda raw: None)  # stored (uncompressed) members
    raw = raw_arrays(path)
    blob = bytearray(path.read_bytes())
    offset = bytes(blob).find(raw["observations"][3].tobytes())
    assert offset > 0
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))
    expect_error(tmp_path, r"key 'observations' is corrupt \(Bad CRC-32")


def test_pickled_object_array_is_refused(tmp_path, data_dir):
    def to_objects(raw):
        raw["observations"] = np.array([{"not": "numbers"}] * raw["terminals"].shape[0], dtype=object)

    write_variant(tmp_path, data_dir, to_objects)
    expect_error(tmp_path, "'observations' holds an object array \\(pickled data\\)")


@pytest.mark.parametrize(
    ("domain", "mutate", "pattern"),
    [
        ("cube-double-play", lambda raw: raw.pop("qpos"), r"lacks required key\(s\) qpos"),
        ("scene-play", lambda raw: raw.pop("button_states"), r"lacks required key\(s\) button_states"),
        ("cube-double-play", lambda raw: raw.update(actions=raw["actions"][:-1]),
         r"disagree on the number of rows \(observations 102, actions 101"),
        ("cube-double-play", lambda raw: raw.update(observations=np.zeros((102, 46), np.float32)),
         r"'observations' has 46 columns but cube-double-play expects 37 \(that is the observation size of "
         r"cube-triple-play"),
        ("cube-double-play", lambda raw: raw.update(actions=raw["actions"][:, :4]),
         r"'actions' has 4 columns but cube-double-play expects 5"),
        ("cube-double-play", lambda raw: raw.update(observations=raw["observations"][:, :, None]),
         r"'observations' has shape \(102, 37, 1\), expected \(rows, 37\)"),
        ("cube-double-play", lambda raw: raw.update(observations=raw["observations"].astype(np.int64)),
         r"'observations' has dtype int64, expected a float dtype"),
        ("puzzle-3x3-play", lambda raw: raw.update(button_states=raw["button_states"].astype(np.float32)),
         r"'button_states' has dtype float32, expected an integer dtype"),
        ("cube-double-play", lambda raw: raw["observations"].__setitem__((17, 4), np.nan),
         r"'observations' has a NaN/inf value at row 17"),
        ("cube-double-play", lambda raw: raw["actions"].__setitem__((80, 0), np.inf),
         r"'actions' has a NaN/inf value at row 80"),
        ("cube-double-play", lambda raw: raw.update(terminals=raw["terminals"].astype(np.int64) * 2),
         r"'terminals' has value 2 at row 50"),
        ("cube-double-play", lambda raw: raw["terminals"].__setitem__(-1, False),
         r"last row \(101\) must end an episode"),
    ],
)
def test_malformed_files_give_one_clear_line(tmp_path, data_dir, domain, mutate, pattern):
    write_variant(tmp_path, data_dir, mutate, domain=domain)
    shutil.copy(data_dir / f"{domain}-v0-val.npz", tmp_path)
    message = expect_error(tmp_path, pattern, domain=domain)
    assert str(tmp_path / f"{domain}-v0.npz") in message


def test_float64_and_float_terminals_are_accepted(tmp_path, data_dir):
    def widen(raw):
        raw["observations"] = raw["observations"].astype(np.float64)
        raw["terminals"] = raw["terminals"].astype(np.float32)

    path = write_variant(tmp_path, data_dir, widen)
    raw = read_dataset_file(path, DOMAINS["cube-double-play"])
    assert raw["terminals"].dtype == np.bool_
    loaded = load_dataset("cube-double-play-singletask-v0", tmp_path)
    assert loaded["observations"].dtype == np.float32


# --------------------------------------------------------------------------------------------------
# Domains and env names.


def test_env_name_parsing():
    parsed = parse_env_name("cube-double-play-singletask-task4-v0")
    assert (parsed.domain.name, parsed.task, parsed.gym_env_name) == ("cube-double-play", 4, "cube-double-singletask-task4-v0")
    assert parse_env_name("puzzle-4x4-play-singletask-v0").task == 4  # OGBench default task
    assert parse_env_name("humanoidmaze-large-navigate-singletask-v0").canonical == (
        "humanoidmaze-large-navigate-singletask-task1-v0"
    )
    with pytest.raises(UnknownEnvError, match="unknown OGBench domain 'cube-octuple-play'.*antmaze-large-navigate"):
        parse_env_name("cube-octuple-play-singletask-v0")
    with pytest.raises(UnknownEnvError, match="unknown task 6 .*task1, task2, task3, task4, task5"):
        parse_env_name("scene-play-singletask-task6-v0")
    with pytest.raises(UnknownEnvError, match="not of the form <domain>-singletask"):
        parse_env_name("cube-double-play-v0")
    assert issubclass(UnknownEnvError, DatasetError) and issubclass(DatasetError, ValueError)
    assert issubclass(DatasetError, FlowRLDatasetError)  # the CLI reports FlowRLErrors as one line


def test_domain_table_covers_the_paper_and_official_file_names():
    assert len(DOMAINS) == 11
    assert DOMAINS["cube-triple-play"].train_episodes == 3000 and DOMAINS["cube-quadruple-play"].default_episodes == 5000
    assert DOMAINS["scene-play"].file_names() == ("scene-play-v0.npz", "scene-play-v0-val.npz")
    assert [name for name, spec in DOMAINS.items() if spec.paper_dataset == "100m"] == [
        "cube-quadruple-play",
        "puzzle-4x4-play",
    ]
    assert [name for name, spec in DOMAINS.items() if not spec.generable] == [
        "antmaze-large-navigate",
        "antmaze-giant-navigate",
        "humanoidmaze-medium-navigate",
        "humanoidmaze-large-navigate",
    ]


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_domain_dimensions_match_the_real_envs(domain):
    import ogbench

    spec = DOMAINS[domain]
    env_name = f"{domain}-singletask-v0"
    env = ogbench.make_env_and_datasets(env_name, env_only=True)
    observation, _ = env.reset(seed=0)
    unwrapped = env.unwrapped
    assert env_dims(env_name) == (observation.shape[0], env.action_space.shape[0])
    assert (spec.nq, spec.nv) == (unwrapped.model.nq, unwrapped.model.nv)
    assert spec.eval_horizon == env.spec.max_episode_steps
    assert spec.default_task == unwrapped._reward_task_id
    assert spec.n_buttons == getattr(unwrapped, "_num_buttons", 0)
    env.close()
