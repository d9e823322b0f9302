"""Checkpoints: exact round trips, fallback past damaged files, atomicity under disk errors."""

from __future__ import annotations

import ast
import errno
import inspect
import json
import os
import pickle
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flowrl.checkpoint as ckpt
from flowrl.checkpoint import (
    CheckpointFallbackWarning,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from flowrl.errors import CheckpointError, FlowRLError


def make_state(key, step: int):
    """A train-state-like pytree: MLP, Adam state after one update, typed key, Python int."""
    model_key, data_key, rng_key = jax.random.split(key, 3)
    model = eqx.nn.MLP(4, 3, 16, 2, key=model_key)
    optimizer = optax.adam(1e-3)
    params = eqx.filter(model, eqx.is_array)
    opt_state = optimizer.init(params)
    leaves, treedef = jax.tree.flatten(params)
    leaf_keys = jax.random.split(data_key, len(leaves))
    grads = jax.tree.unflatten(
        treedef, [jax.random.normal(k, p.shape) for k, p in zip(leaf_keys, leaves)]
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    model = eqx.apply_updates(model, updates)
    return {"model": model, "opt_state": opt_state, "key": rng_key, "step": step}


def assert_same_state(a, b):
    """Equal leaves, including the raw data and implementation of typed keys."""
    assert jax.random.key_impl(a["key"]) == jax.random.key_impl(b["key"])
    np.testing.assert_array_equal(jax.random.key_data(a["key"]), jax.random.key_data(b["key"]))
    strip = lambda s: {k: v for k, v in s.items() if k != "key"}  # noqa: E731
    assert bool(eqx.tree_equal(strip(a), strip(b)))
    assert type(a["step"]) is type(b["step"]) is int


@pytest.fixture
def states(getkey):
    return [make_state(getkey(), step) for step in range(4)]


@pytest.fixture
def like(getkey):
    return make_state(getkey(), 0)


def test_round_trip_mlp_adam_typed_key(tmp_path, states, like):
    state = states[3]
    path = save_checkpoint(tmp_path, 1000, state, extra={"train_rows": 7, "note": "x"})
    assert path == tmp_path / "step_000001000.eqx"
    meta = json.loads((tmp_path / "step_000001000.json").read_text())
    assert meta["step"] == 1000 and meta["payload_bytes"] == path.stat().st_size

    step, loaded, extra = latest_checkpoint(tmp_path, like)
    assert step == 1000 and extra == {"train_rows": 7, "note": "x"}
    assert_same_state(loaded, state)
    # The loaded Adam state is usable: one more update runs and gives the same result.
    optimizer = optax.adam(1e-3)
    params = eqx.filter(state["model"], eqx.is_array)
    grads = jax.tree.map(jnp.ones_like, params)
    want, _ = optimizer.update(grads, state["opt_state"], params)
    got, _ = optimizer.update(grads, loaded["opt_state"], eqx.filter(loaded["model"], eqx.is_array))
    assert bool(eqx.tree_equal(want, got))


def test_abstract_template_and_other_key_impl(tmp_path, getkey):
    """A template from eqx.filter_eval_shape (no real arrays) works, also for rbg keys."""
    key = jax.random.wrap_key_data(
        jax.random.key_data(jax.random.key(3, impl="rbg")), impl="rbg"
    )
    tree = {
        "w": jax.random.normal(getkey(), (3, 2)),
        "bf16": jnp.arange(4).astype(jnp.bfloat16),
        "np": np.arange(5, dtype=np.int16),
        "keys": jax.random.split(key, 2),
        "scale": 0.25,
    }
    save_checkpoint(tmp_path, 5, tree)
    template = eqx.filter_eval_shape(lambda: tree)
    step, loaded, _ = latest_checkpoint(tmp_path, template)
    assert step == 5
    assert loaded["bf16"].dtype == jnp.bfloat16 and loaded["np"].dtype == np.int16
    assert loaded["keys"].dtype == tree["keys"].dtype and loaded["scale"] == 0.25
    np.testing.assert_array_equal(
        jax.random.key_data(loaded["keys"]), jax.random.key_data(tree["keys"])
    )
    np.testing.assert_array_equal(loaded["w"], tree["w"])
    np.testing.assert_array_equal(loaded["bf16"], tree["bf16"])
    np.testing.assert_array_equal(loaded["np"], tree["np"])
    # A concrete template keeps numpy leaves as numpy (not moved to the device).
    assert isinstance(latest_checkpoint(tmp_path, tree)[1]["np"], np.ndarray)


def _save_two(tmp_path, states):
    save_checkpoint(tmp_path, 1, states[1])
    save_checkpoint(tmp_path, 2, states[2])
    return tmp_path / "step_000000002.eqx"


def _assert_falls_back(tmp_path, states, like, bad_name):
    with pytest.warns(CheckpointFallbackWarning) as record:
        step, loaded, _ = latest_checkpoint(tmp_path, like)
    assert step == 1
    assert_same_state(loaded, states[1])
    message = str(record[0].message)
    assert bad_name in message and "step_000000001.eqx" in message


def test_truncated_payload_falls_back(tmp_path, states, like):
    payload = _save_two(tmp_path, states)
    data = payload.read_bytes()
    payload.write_bytes(data[: len(data) // 2])
    _assert_falls_back(tmp_path, states, like, "step_000000002.eqx")


def test_altered_byte_falls_back(tmp_path, states, like):
    payload = _save_two(tmp_path, states)
    data = bytearray(payload.read_bytes())
    data[len(data) - 5] ^= 0x01  # same size, one bit flipped inside the last array
    payload.write_bytes(bytes(data))
    _assert_falls_back(tmp_path, states, like, "step_000000002.eqx")


def test_unreadable_metadata_falls_back(tmp_path, states, like):
    _save_two(tmp_path, states)
    (tmp_path / "step_000000002.json").write_text('{"format": "flowrl-checkpoint", "st')
    _assert_falls_back(tmp_path, states, like, "step_000000002.json")


def test_missing_metadata_means_no_checkpoint(tmp_path, states, like):
    _save_two(tmp_path, states)
    os.remove(tmp_path / "step_000000002.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a crash between the two writes is not worth a warning
        step, loaded, _ = latest_checkpoint(tmp_path, like)
    assert step == 1
    assert_same_state(loaded, states[1])
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]


def test_no_checkpoints_and_all_damaged(tmp_path, states, like):
    assert latest_checkpoint(tmp_path / "missing", like) is None
    assert latest_checkpoint(tmp_path, like) is None
    payload = save_checkpoint(tmp_path, 1, states[1])
    payload.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path, like)
    with pytest.raises(CheckpointError, match="step_000000001.eqx"):
        load_checkpoint(payload, like)


def test_template_mismatch_is_an_error_not_a_fallback(tmp_path, states, getkey):
    _save_two(tmp_path, states)
    wider = make_state(getkey(), 0)
    wider["model"] = eqx.nn.MLP(4, 3, 32, 2, key=getkey())
    with pytest.raises(CheckpointError, match=r"leaf .*layers\[0\]\.weight.*\[16, 4\].*\[32, 4\]"):
        latest_checkpoint(tmp_path, wider)


def test_keep_prunes_oldest(tmp_path, states):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, states[step % 4], keep=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(os.listdir(tmp_path)) == [
        "step_000000004.eqx", "step_000000004.json", "step_000000005.eqx", "step_000000005.json"
    ]
    with pytest.raises(CheckpointError, match="keep"):
        save_checkpoint(tmp_path, 6, states[0], keep=0)


def test_save_after_fallback_removes_abandoned_newer_ones(tmp_path, states, like):
    """Resumed from step 1 because step 2 was damaged: saving step 2 again replaces it."""
    payload = _save_two(tmp_path, states)
    save_checkpoint(tmp_path, 3, states[3])
    payload.write_bytes(b"garbage")
    os.remove(tmp_path / "step_000000003.json")  # a payload whose metadata never got written
    with pytest.warns(CheckpointFallbackWarning):
        assert latest_checkpoint(tmp_path, like)[0] == 1
    save_checkpoint(tmp_path, 2, states[0], keep=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step, loaded, _ = latest_checkpoint(tmp_path, like)
    assert step == 2
    assert_same_state(loaded, states[0])
    save_checkpoint(tmp_path, 1, states[1], keep=3)  # going back in time drops step 2
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]


def _only_files_of_step_1(tmp_path):
    assert sorted(os.listdir(tmp_path)) == ["step_000000001.eqx", "step_000000001.json"]


def test_disk_full_mid_payload(tmp_path, states, like, monkeypatch):
    save_checkpoint(tmp_path, 1, states[1])
    original_write = ckpt._HashingWriter.write
    calls = []

    def write_then_fail(self, data):
        calls.append(len(data))
        if len(calls) == 3:  # some bytes are already in the temp file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", write_then_fail)
    expected = r"step_000000002\.eqx.*free disk space.*step_000000001\.eqx is intact"
    with pytest.raises(CheckpointError, match=expected):
        save_checkpoint(tmp_path, 2, states[2])
    monkeypatch.undo()
    _only_files_of_step_1(tmp_path)
    step, loaded, _ = latest_checkpoint(tmp_path, like)
    assert step == 1
    assert_same_state(loaded, states[1])


def test_disk_full_on_metadata(tmp_path, states, like, monkeypatch):
    save_checkpoint(tmp_path, 1, states[1])

    def no_space(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "atomic_write_bytes", no_space)
    with pytest.raises(CheckpointError, match="free disk space"):
        save_checkpoint(tmp_path, 2, states[2])
    monkeypatch.undo()
    _only_files_of_step_1(tmp_path)  # the orphan payload is removed too
    assert latest_checkpoint(tmp_path, like)[0] == 1


def test_permission_denied_is_a_checkpoint_error(tmp_path, states, like, monkeypatch):
    save_checkpoint(tmp_path, 1, states[1])

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError, match="writable") as info:
        save_checkpoint(tmp_path, 2, states[2])
    assert isinstance(info.value, FlowRLError) and "\n" not in str(info.value)
    monkeypatch.undo()
    _only_files_of_step_1(tmp_path)
    assert latest_checkpoint(tmp_path, like)[0] == 1


def test_read_only_directory(tmp_path, states, like):
    save_checkpoint(tmp_path, 1, states[1])
    os.chmod(tmp_path, 0o500)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip("chmod does not restrict this user (root)")
        with pytest.raises(CheckpointError, match="writable"):
            save_checkpoint(tmp_path, 2, states[2])
        assert latest_checkpoint(tmp_path, like)[0] == 1
    finally:
        os.chmod(tmp_path, 0o700)


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path, states, like):
    save_checkpoint(tmp_path, 1, states[1])
    stale = tmp_path / ".step_000000002.eqx.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert [c.step for c in list_checkpoints(tmp_path)] == [1]
    assert latest_checkpoint(tmp_path, like)[0] == 1
    save_checkpoint(tmp_path, 2, states[2])
    assert not stale.exists()


def test_bad_arguments(tmp_path, states):
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path, -1, states[0])
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 1, states[0], extra={"array": np.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_module_never_uses_pickle(tmp_path, states, like, monkeypatch):
    tree = ast.parse(inspect.getsource(ckpt))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert not imported & {"pickle", "cloudpickle", "dill", "joblib", "shelve"}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            assert isinstance(node.value, ast.Constant) and node.value.value is False

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    save_checkpoint(tmp_path, 1, states[1])
    assert_same_state(latest_checkpoint(tmp_path, like)[1], states[1])
