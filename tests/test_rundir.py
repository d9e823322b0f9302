"""Run directories: create / resume / refuse / move-aside rules, atomic writes, provenance."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import jax
import pytest

import flowrl.rundir as rundir
from flowrl.errors import RunDirError
from flowrl.rundir import (
    RunDirWarning,
    config_fingerprint,
    package_versions,
    prepare_run_dir,
    read_run_info,
    write_json_atomic,
    write_text_atomic,
)

FP_A = config_fingerprint("run.seed = 1\n")
FP_B = config_fingerprint("run.seed = 2\n")


def new_run(path: Path, fingerprint: str = FP_A) -> Path:
    run = prepare_run_dir(path, fingerprint=fingerprint, resume=False, overwrite=False)
    write_text_atomic(run / "config.gin", "run.seed = 1\n")
    (run / "checkpoints" / "step_000000010.json").write_text("{}")
    return run


def old_runs(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.old-*"))


def test_new_directory_is_created_with_provenance(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "b", fingerprint=FP_A, resume=False, overwrite=False)
    assert run == tmp_path / "a" / "b"
    assert (run / "checkpoints").is_dir() and (run / "logs").is_dir()
    info = json.loads((run / "run.json").read_text())
    assert info["fingerprint"] == FP_A == read_run_info(run)["fingerprint"]
    assert info["packages"]["jax"] == jax.__version__
    assert info["packages"]["python"].count(".") == 2
    assert info["flowrl_version"]


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "run").mkdir()
    for resume in (False, True):
        run = prepare_run_dir(tmp_path / "run", fingerprint=FP_A, resume=resume, overwrite=False)
        assert read_run_info(run)["fingerprint"] == FP_A
        for child in run.iterdir():  # empty it again for the next round
            child.unlink() if child.is_file() else child.rmdir()


def test_resume_missing_directory_starts_fresh(tmp_path):
    run = prepare_run_dir(tmp_path / "run", fingerprint=FP_A, resume=True, overwrite=False)
    assert read_run_info(run)["fingerprint"] == FP_A


def test_same_fingerprint_needs_resume(tmp_path):
    run = new_run(tmp_path / "run")
    with pytest.raises(
        RunDirError, match="already holds a run; pass --resume to continue it or --overwrite"
    ):
        prepare_run_dir(run, fingerprint=FP_A, resume=False, overwrite=False)
    before = (run / "run.json").read_text()
    assert prepare_run_dir(run, fingerprint=FP_A, resume=True, overwrite=False) == run
    assert (run / "run.json").read_text() == before
    assert (run / "checkpoints" / "step_000000010.json").exists()
    assert (run / "config.gin").read_text() == "run.seed = 1\n"


def test_different_fingerprint_refused_even_with_resume(tmp_path):
    run = new_run(tmp_path / "run")
    for resume in (False, True):
        with pytest.raises(RunDirError) as info:
            prepare_run_dir(run, fingerprint=FP_B, resume=resume, overwrite=False)
        message = str(info.value)
        assert FP_A[:16] in message and FP_B[:16] in message
        assert str(run / "run.json") in message and "current operative config" in message
        assert "--overwrite" in message and "\n" not in message
    assert read_run_info(run)["fingerprint"] == FP_A


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run = new_run(tmp_path / "run")
    assert prepare_run_dir(run, fingerprint=FP_B, resume=False, overwrite=True) == run
    assert read_run_info(run)["fingerprint"] == FP_B
    assert not (run / "checkpoints" / "step_000000010.json").exists()
    (old,) = old_runs(run)
    assert read_run_info(old)["fingerprint"] == FP_A
    assert (old / "config.gin").read_text() == "run.seed = 1\n"
    assert (old / "checkpoints" / "step_000000010.json").exists()
    # Twice within the same second: a second, distinct backup; nothing is lost.
    prepare_run_dir(run, fingerprint=FP_A, resume=False, overwrite=True)
    assert len(old_runs(run)) == 2
    assert {read_run_info(p)["fingerprint"] for p in old_runs(run)} == {FP_A, FP_B}


def test_foreign_directory_refused_unless_overwrite(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("important")
    for resume in (False, True):
        with pytest.raises(RunDirError, match="not empty and is not a flowrl run"):
            prepare_run_dir(foreign, fingerprint=FP_A, resume=resume, overwrite=False)
    assert os.listdir(foreign) == ["thesis.tex"]
    prepare_run_dir(foreign, fingerprint=FP_A, resume=False, overwrite=True)
    (old,) = old_runs(foreign)
    assert (old / "thesis.tex").read_text() == "important"


def test_corrupt_run_file_refused_unless_overwrite(tmp_path):
    run = new_run(tmp_path / "run")
    (run / "run.json").write_text('{"format": "flowrl-run", "finger')
    with pytest.raises(RunDirError, match="run.json is unreadable"):
        prepare_run_dir(run, fingerprint=FP_A, resume=True, overwrite=False)
    prepare_run_dir(run, fingerprint=FP_A, resume=False, overwrite=True)
    assert read_run_info(run)["fingerprint"] == FP_A


def test_conflicting_or_bad_arguments(tmp_path):
    with pytest.raises(RunDirError, match="not both"):
        prepare_run_dir(tmp_path / "r", fingerprint=FP_A, resume=True, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        prepare_run_dir(tmp_path / "file", fingerprint=FP_A, resume=False, overwrite=False)
    with pytest.raises(RunDirError, match="fingerprint"):
        prepare_run_dir(tmp_path / "r", fingerprint="", resume=False, overwrite=False)
    assert not (tmp_path / "r").exists()


def test_not_writable(tmp_path, monkeypatch):
    run = new_run(tmp_path / "run")
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)
    with pytest.raises(RunDirError, match="not writable"):
        prepare_run_dir(run, fingerprint=FP_A, resume=True, overwrite=False)
    monkeypatch.undo()

    def denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(RunDirError, match="could not create run directory .*writable"):
        prepare_run_dir(tmp_path / "new", fingerprint=FP_A, resume=False, overwrite=False)


def test_read_only_parent_with_chmod(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    os.chmod(parent, 0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("chmod does not restrict this user (root)")
        with pytest.raises(RunDirError, match="writable"):
            prepare_run_dir(parent / "run", fingerprint=FP_A, resume=False, overwrite=False)
    finally:
        os.chmod(parent, 0o700)


def test_resume_with_other_package_versions_warns(tmp_path, monkeypatch):
    run = new_run(tmp_path / "run")
    changed = {**package_versions(), "jax": "0.0.1"}
    monkeypatch.setattr(rundir, "package_versions", lambda: changed)
    with pytest.warns(RunDirWarning, match=f"jax {jax.__version__} -> 0.0.1"):
        prepare_run_dir(run, fingerprint=FP_A, resume=True, overwrite=False)


def test_atomic_writes(tmp_path, monkeypatch):
    path = tmp_path / "config.gin"
    write_text_atomic(path, "a = 1\n")
    write_text_atomic(path, "a = 2\n")
    assert path.read_text() == "a = 2\n" and os.listdir(tmp_path) == ["config.gin"]
    write_json_atomic(tmp_path / "x.json", {"k": [1, 2.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": [1, 2.5]}
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "y.json", {"k": float("nan")})  # strict JSON only

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rundir.os, "replace", full_disk)
    with pytest.raises(RunDirError, match="config.gin.*free disk space"):
        write_text_atomic(path, "a = 3\n")
    assert path.read_text() == "a = 2\n"  # old content intact, temp file removed
    assert sorted(os.listdir(tmp_path)) == ["config.gin", "x.json"]


def test_package_versions_and_fingerprint():
    versions = package_versions()
    assert set(rundir.TRACKED_PACKAGES) | {"python"} == set(versions)
    assert versions["jax"] == jax.__version__ and versions["gin-config"]
    sha256_of_a = "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
    assert config_fingerprint("a") == sha256_of_a
