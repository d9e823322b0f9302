"""Numerical faults and disk faults during training: a clear error, and nothing good is lost.

- A non-finite loss, or a non-finite gradient with finite losses, stops the run with a
  `NumericalError` naming the update and the loss term (or `optim/grad_norm`); the last good
  checkpoint stays intact and the run resumes from it.
- `AgentConfig.skip_nonfinite_updates = True` skips such updates instead (the state is kept) and
  counts them in the `optim/skipped` metric and the summary.
- The disk filling up, or the checkpoint directory turning read-only, during a checkpoint write:
  one `flowrl: error:` line naming the file, the OS reason and the fix, the previous checkpoint
  still loads and `--resume` continues from it. An output directory that cannot be created is
  refused before anything is written. A full disk while logging is a `MetricsError`.

Faults are injected by wrapping flowrl's own functions (the loss, the checkpoint writer), so the
real driver, checkpoint and log code handles them. Tiny RLPD networks keep each compile short.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flowrl.agent as agent_lib
import flowrl.checkpoint as checkpoint
import flowrl.train as train_module
from flowrl.checkpoint import list_checkpoints
from flowrl.cli import main, parse_gin
from flowrl.errors import MetricsError, NumericalError
from flowrl.metrics_log import MetricsLogger, read_metrics
from flowrl.ogbench import generate_dataset
from tests.crash_runner import CONFIG, TINY

FAST = [*TINY, "train.eval_episodes=0", "train.offline_steps=60"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults-data")
    generate_dataset("cube-double-play", episodes=3, workers=1, directory=directory, seed=0,
                     max_episode_steps=61, progress=False)
    return directory


def bindings(data_dir, *extra):
    return [*FAST, f"train.data_dir='{data_dir}'", *extra]


def run_train(data_dir, out, *extra, resume=False):
    config_text = parse_gin([CONFIG], bindings(data_dir, *extra))
    try:
        return train_module.train(out, resume=resume, config_text=config_text, progress=False)
    finally:
        gin.clear_config()


def cli(data_dir, out, *extra, resume=False):
    args = ["train", CONFIG, "--out", str(out), "--no-progress"] + (["--resume"] if resume else [])
    for binding in bindings(data_dir, *extra):
        args += ["--bind", binding]
    return main(args)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("flowrl: error:")]
    assert len(errors) == 1, err
    return errors[0]


def verified_steps(directory: Path) -> list[int]:
    """Steps of the checkpoints in `directory`, each payload checked against its metadata."""
    steps = []
    for info in list_checkpoints(directory):
        data = info.payload_path.read_bytes()
        assert len(data) == info.size and hashlib.sha256(data).hexdigest() == info.sha256
        steps.append(info.step)
    return steps


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "logs" / "train.jsonl")]


@jax.custom_jvp
def _scale_gradient(x, factor):
    """x in the forward pass; its gradient is multiplied by `factor` (NaN poisons it)."""
    return x


@_scale_gradient.defjvp
def _scale_gradient_jvp(primals, tangents):
    x, factor = primals
    return x, tangents[0] * factor


def poison(monkeypatch, kind: str, updates: range):
    """Make the updates in `updates` (1-based) non-finite: `kind` = 'loss' → critic loss (and so
    the total and the gradient) NaN; 'gradient' → the gradient NaN while every loss is finite."""
    real_loss = agent_lib.agent_loss

    def loss(online, state, batch, extractor, config, *, key):
        total, metrics = real_loss(online, state, batch, extractor, config, key=key)
        update = state.step + 1
        hit = (update >= updates.start) & (update < updates.stop)
        factor = jnp.where(hit, jnp.nan, 1.0)
        if kind == "loss":
            metrics = {**metrics, "critic/loss": metrics["critic/loss"] * factor, "loss/total": total * factor}
            return total * factor, metrics
        return _scale_gradient(total, factor), metrics

    monkeypatch.setattr(agent_lib, "agent_loss", loss)


# ---------------------------------------------------------------------------------------------
# Numerical faults


def test_nan_loss_stops_naming_update_and_term_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    poison(monkeypatch, "loss", range(35, 36))
    with pytest.raises(NumericalError) as raised:
        run_train(data_dir, run)
    message = str(raised.value).split("\n  In call to configurable")[0]  # gin appends its call trail
    assert "non-finite critic/loss at update 35" in message and "\n" not in message
    assert str(run / "checkpoints") in message
    # The checkpoint of step 20 is intact and nothing after the fault was saved.
    assert verified_steps(run / "checkpoints") == [20]
    assert train_steps(run) == [10, 20, 30]

    # Without the fault, --resume continues from that checkpoint and finishes.
    monkeypatch.undo()
    summary = run_train(data_dir, run, resume=True)
    assert summary["start_step"] == 20
    assert verified_steps(run / "checkpoints")[-1] == 60
    assert train_steps(run) == [10, 20, 30, 40, 50, 60]
    params = jax.tree.leaves(summary["state"])
    assert all(np.isfinite(np.asarray(p)).all() for p in params if jnp.issubdtype(p.dtype, jnp.floating))


def test_nan_gradient_with_finite_losses_names_the_gradient_and_its_update(data_dir, tmp_path, monkeypatch):
    # Update 33 is mid-chunk (31..40): its NaN gradient makes every loss of update 34 NaN; the
    # error must point at update 33's gradient, not at the losses that followed.
    poison(monkeypatch, "gradient", range(33, 34))
    with pytest.raises(NumericalError, match=r"non-finite optim/grad_norm at update 33\b"):
        run_train(data_dir, tmp_path / "run")
    assert verified_steps(tmp_path / "run" / "checkpoints") == [20]


def test_opt_in_skip_counts_skipped_updates_and_keeps_training(data_dir, tmp_path, monkeypatch):
    poison(monkeypatch, "loss", range(35, 38))
    summary = run_train(data_dir, tmp_path / "run", "flowrl.AgentConfig.skip_nonfinite_updates=True")
    assert summary["skipped_updates"] == 3
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run" / "logs" / "train.jsonl")}
    assert [rows[s]["optim/skipped"] for s in sorted(rows)] == [0, 0, 0, 3, 0, 0]
    assert np.isfinite(rows[40]["critic/loss"])  # the mean over the 7 finite updates of the chunk
    assert int(summary["state"].step) == 60  # the step counter still advances over skipped updates
    params = jax.tree.leaves(summary["state"])
    assert all(np.isfinite(np.asarray(p)).all() for p in params if jnp.issubdtype(p.dtype, jnp.floating))
    assert verified_steps(tmp_path / "run" / "checkpoints")[-1] == 60


# ---------------------------------------------------------------------------------------------
# Disk faults


def _fail_during_save(monkeypatch, which_save: int, error: OSError, where: str):
    """Raise `error` during checkpoint save number `which_save` of the run: 'payload' = after the
    first bytes of the payload reach its temp file, 'mkstemp' = when the temp file is created."""
    saves = {"n": 0}
    real_save = train_module.save_checkpoint

    def counting_save(*args, **kwargs):
        saves["n"] += 1
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", counting_save)
    if where == "payload":
        real_write = checkpoint._HashingWriter.write

        def write(self, data):
            if saves["n"] == which_save and self.size > 256:
                raise error
            return real_write(self, data)

        monkeypatch.setattr(checkpoint._HashingWriter, "write", write)
    else:
        real_mkstemp = tempfile.mkstemp

        def mkstemp(*args, **kwargs):
            if saves["n"] == which_save:
                raise error
            return real_mkstemp(*args, **kwargs)

        monkeypatch.setattr(checkpoint.tempfile, "mkstemp", mkstemp)


def test_disk_full_and_read_only_during_checkpoint_then_resume(data_dir, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _fail_during_save(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"), "payload")
    assert cli(data_dir, run) == 2
    line = one_error_line(capsys)
    assert "could not save checkpoint" in line and "step_000000040.eqx" in line
    assert "No space left on device (errno 28)" in line and "free disk space" in line
    assert "the previous checkpoint step_000000020.eqx is intact" in line
    assert verified_steps(run / "checkpoints") == [20]
    assert not [p for p in os.listdir(run / "checkpoints") if p.endswith(".tmp")], "temp file left behind"
    monkeypatch.undo()

    # Resumed, and the checkpoint directory turns read-only at the first save: same guarantees.
    _fail_during_save(monkeypatch, 1, PermissionError(errno.EACCES, "Permission denied"), "mkstemp")
    assert cli(data_dir, run, resume=True) == 2
    line = one_error_line(capsys)
    assert "Permission denied (errno 13)" in line and "make the directory writable" in line
    assert "the previous checkpoint step_000000020.eqx is intact" in line
    assert verified_steps(run / "checkpoints") == [20]
    monkeypatch.undo()

    assert cli(data_dir, run, resume=True) == 0
    assert "from step 20" in capsys.readouterr().out
    assert verified_steps(run / "checkpoints")[-2:] == [40, 60]
    assert train_steps(run) == [10, 20, 30, 40, 50, 60]  # no duplicated row from the failed attempts


def test_output_directory_not_writable_is_refused_before_any_write(data_dir, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "run"
    if os.geteuid() != 0:
        parent.chmod(0o500)
    else:  # root ignores permission bits: refuse the mkdir the way the OS would
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == out or parent in self.parents:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        assert cli(data_dir, out) == 2
        line = one_error_line(capsys)
        assert str(out) in line and "Permission denied" in line and "writable" in line
        assert not out.exists()
    finally:
        parent.chmod(0o700)


def test_disk_full_while_logging_is_a_metrics_error(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path, resume_from_step=None)
    logger.log({"step": 10, "loss": 1.0})

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    files = logger._kinds["train"]
    files.jsonl = FullDisk(files.jsonl)
    with pytest.raises(MetricsError, match=r"No space left on device \(errno 28\); free disk space"):
        logger.log({"step": 20, "loss": 2.0})
    files.jsonl = files.jsonl.handle
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "logs" / "train.jsonl")] == [10]
