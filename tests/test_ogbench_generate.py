"""`flowrl.ogbench.generate` and the `flowrl data generate` CLI (tiny datasets: 2 episodes of 51 steps)."""

import argparse
import hashlib
import socket
import urllib.request

import numpy as np
import pytest

from flowrl.ogbench import generate as generate_module
from flowrl.ogbench.commands import register_cli
from flowrl.ogbench.domains import DOMAINS, NotGenerableError, UnknownEnvError
from flowrl.ogbench.generate import DatasetExistsError, generate_dataset

STEPS = 51  # rows per episode in these tests (official: 1001)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def tiny(domain, directory, **kwargs):
    options = dict(episodes=2, workers=1, directory=directory, max_episode_steps=STEPS, progress=False)
    return generate_dataset(domain, **{**options, **kwargs})


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("domain", ["cube-double-play", "scene-play", "puzzle-3x3-play"])
def test_generated_files_have_official_format_and_load_in_ogbench(tmp_path, no_network, domain):
    import ogbench

    spec = DOMAINS[domain]
    result = tiny(domain, tmp_path)
    assert result.train_path == tmp_path / f"{domain}-v0.npz"
    assert result.val_path == tmp_path / f"{domain}-v0-val.npz"
    assert (result.train_episodes, result.val_episodes, result.transitions) == (2, 1, 3 * STEPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([result.train_path.name, result.val_path.name])

    expected = {
        "observations": (np.float32, spec.ob_dim),
        "actions": (np.float32, 5),
        "terminals": (np.bool_, None),
        "qpos": (np.float32, spec.nq),
        "qvel": (np.float32, spec.nv),
    }
    if spec.n_buttons:
        expected["button_states"] = (np.int64, spec.n_buttons)
    for path, episodes in ((result.train_path, 2), (result.val_path, 1)):
        with np.load(path, allow_pickle=False) as archive:
            assert sorted(archive.files) == sorted(expected)
            for key, (dtype, width) in expected.items():
                array = archive[key]
                assert array.dtype == dtype, key
                assert array.shape == ((episodes * STEPS,) if width is None else (episodes * STEPS, width)), key
            # terminals only on each episode's last row (time-limit truncation).
            np.testing.assert_array_equal(np.flatnonzero(archive["terminals"]), np.arange(1, episodes + 1) * STEPS - 1)
            assert np.abs(archive["actions"]).max() <= 1.0
            # qpos is the pre-step state s_t: the first 6 observation entries are the arm joint positions.
            np.testing.assert_array_equal(archive["observations"][:, :6], archive["qpos"][:, :6])

    env_name = f"{domain}-singletask-v0"
    env, train, val = ogbench.make_env_and_datasets(env_name, dataset_path=str(result.train_path))
    assert train["observations"].shape == (2 * (STEPS - 1), spec.ob_dim)
    assert val["observations"].shape == (STEPS - 1, spec.ob_dim)
    assert set(np.unique(train["rewards"])) <= set(np.arange(-50, 1, dtype=np.float32))
    env.close()


def test_output_depends_only_on_seed_not_on_worker_count(tmp_path):
    first = tiny("cube-double", tmp_path / "a", seed=3)
    again = tiny("cube-double", tmp_path / "b", seed=3)
    two_workers = tiny("cube-double", tmp_path / "c", seed=3, workers=2)
    other_seed = tiny("cube-double", tmp_path / "d", seed=4)
    for a, b, c in zip(first.paths, again.paths, two_workers.paths):
        assert digest(a) == digest(b) == digest(c)  # byte-equal files, not only equal arrays
    with np.load(first.train_path) as x, np.load(other_seed.train_path) as y:
        assert not np.array_equal(x["observations"], y["observations"])


def test_episode_i_is_a_function_of_seed_and_i_only(tmp_path):
    small = tiny("puzzle-3x3", tmp_path / "small", episodes=2)
    large = tiny("puzzle-3x3", tmp_path / "large", episodes=3)
    with np.load(small.train_path) as a, np.load(large.train_path) as b:
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key][: 2 * STEPS], err_msg=key)


def test_interrupted_generation_leaves_no_file_under_final_name(tmp_path, monkeypatch):
    real_write = generate_module._write_npz

    def write_then_crash(path, arrays):
        real_write(path, arrays)
        with open(path, "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt("simulated Ctrl-C while writing")

    monkeypatch.setattr(generate_module, "_write_npz", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        tiny("cube-double", tmp_path)
    assert list(tmp_path.iterdir()) == []  # no final file, no leftover scratch directory

    def crash_in_episode(self, seed, index):
        raise RuntimeError("simulated crash in episode")

    monkeypatch.setattr(generate_module, "_write_npz", real_write)
    monkeypatch.setattr(generate_module._EpisodeRunner, "run", crash_in_episode)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny("cube-double", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_dataset_is_not_overwritten_unless_asked(tmp_path):
    existing = tmp_path / "cube-double-play-v0-val.npz"
    existing.write_bytes(b"precious")
    with pytest.raises(DatasetExistsError, match="already exists.*overwrite"):
        tiny("cube-double", tmp_path)
    assert existing.read_bytes() == b"precious"
    assert not (tmp_path / "cube-double-play-v0.npz").exists()

    result = tiny("cube-double", tmp_path, overwrite=True)
    with np.load(result.val_path) as archive:
        assert archive["observations"].shape == (STEPS, 37)


def test_bad_domains_and_arguments(tmp_path):
    with pytest.raises(UnknownEnvError, match="cube-double-play.*puzzle-4x4-play"):
        tiny("cube-octuple", tmp_path)
    with pytest.raises(NotGenerableError, match="antmaze-large-navigate cannot be generated locally.*SAC expert"):
        tiny("antmaze-large-navigate", tmp_path)
    with pytest.raises(ValueError, match="episodes must be >= 1"):
        tiny("scene", tmp_path, episodes=0)
    assert list(tmp_path.iterdir()) == []


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="flowrl")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_generate_writes_to_flowrl_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWRL_DATA_DIR", str(tmp_path))
    code = run_cli(["data", "generate", "puzzle-3x3", "--episodes", "1", "--workers", "1",
                    "--max-episode-steps", str(STEPS), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "puzzle-3x3-play-v0.npz") in out and "steps/s" in out
    assert (tmp_path / "puzzle-3x3-play-v0-val.npz").is_file()

    # Second run without --overwrite refuses with exit code 1 and one line.
    code = run_cli(["data", "generate", "puzzle-3x3", "--episodes", "1", "--workers", "1",
                    "--max-episode-steps", str(STEPS), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "already exists" in err and err.count("\n") == 1


def test_cli_unknown_domain_lists_valid_ones_with_exit_code_2(tmp_path, capsys):
    assert run_cli(["data", "generate", "kitchen", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert all(name in err for name in ("cube-single-play", "cube-quadruple-play", "scene-play", "puzzle-4x4-play"))
    assert "antmaze" not in err  # only domains that can be generated are offered
    assert run_cli(["data", "generate", "humanoidmaze-large-navigate", "--dir", str(tmp_path)]) == 2
    assert "cannot be generated locally" in capsys.readouterr().err
