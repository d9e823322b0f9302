"""Run directories and crash-safe (atomic) file writes.

A run directory holds everything one training run writes::

    <run>/run.json        fingerprint of the operative config, creation time, package versions
    <run>/config.gin      the operative gin config (written by the caller with `write_text_atomic`)
    <run>/checkpoints/    `flowrl.checkpoint` files
    <run>/logs/           `flowrl.metrics_log` files

`prepare_run_dir` decides whether a directory may be used for a new run, resumed, or replaced:

| state of `path`                   | neither flag | resume=True | overwrite=True     |
|-----------------------------------|--------------|-------------|--------------------|
| missing or empty                  | create       | create      | create             |
| flowrl run, same fingerprint      | refuse       | use as is   | move aside, create |
| flowrl run, different fingerprint | refuse       | refuse      | move aside, create |
| non-empty, not a flowrl run       | refuse       | refuse      | move aside, create |

"Move aside" renames the old directory to `<path>.old-<UTC timestamp>` before anything new is
written, so nothing already written is lost. `resume=True` on a missing/empty directory starts a
fresh run, so a preemptible job can always be relaunched with the same command line.

Atomic writes (`write_text_atomic`, `write_json_atomic`, `atomic_write_bytes`) write a temporary
file in the destination's directory, flush and fsync it, `os.replace` it over the destination
and fsync the directory: a reader sees either the old or the new content, never a mix, even
after a crash or power loss.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Any

from flowrl.errors import RunDirError

RUN_FILE = "run.json"
CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"

RUN_FORMAT = "flowrl-run"
RUN_FORMAT_VERSION = 1

# Distribution names (as pip knows them) whose versions are recorded in run.json.
TRACKED_PACKAGES = (
    "jax",
    "jaxlib",
    "equinox",
    "optax",
    "diffrax",
    "gin-config",
    "chex",
    "ogbench",
    "mujoco",
    "numpy",
)


class RunDirWarning(UserWarning):
    """A run directory is usable but something about it deserves attention."""


# --------------------------------------------------------------------------------------------
# Atomic writes


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename/creation inside it survives a power loss.

    Platforms that cannot open directories (Windows) skip this; there `os.replace` is the best
    guarantee available.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems refuse fsync on directories; the rename itself is still atomic.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically replace `path` with `data` (temp file in the same dir, fsync, os.replace).

    Raises the underlying `OSError` (e.g. ENOSPC, EACCES) after removing the temporary file;
    `path` is then untouched.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_name, path)
    except BaseException:
        remove_if_exists(tmp_name)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 `text` to `path`; a disk/permission error is a `RunDirError`."""
    try:
        atomic_write_bytes(path, text.encode("utf-8"))
    except OSError as e:
        raise RunDirError(os_error_message(f"could not write {path}", e)) from e


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as strict JSON (indented, NaN/inf rejected) to `path`."""
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def remove_if_exists(path: str | os.PathLike[str]) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def os_error_message(what: str, e: OSError) -> str:
    """One line naming the failed action, the OS reason and the fix."""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        fix = "free disk space or choose a run directory on another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make the directory writable or choose another run directory"
    else:
        fix = "check the path, free space and permissions"
    return f"{what}: {reason} (errno {e.errno}); {fix}"


# --------------------------------------------------------------------------------------------
# Provenance


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None = not installed), plus python."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def config_fingerprint(config_text: str) -> str:
    """sha256 hex digest of an operative config text: the identity of a run's configuration."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def _flowrl_version() -> str:
    import flowrl

    return str(getattr(flowrl, "__version__", "unknown"))


def read_run_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed `run.json` of run directory `path`; `RunDirError` if missing or malformed."""
    run_file = Path(path) / RUN_FILE
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RunDirError(f"{path} is not a flowrl run: {RUN_FILE} is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunDirError(
            f"{run_file} is unreadable ({e}); repair it or pass --overwrite to move the run aside"
        ) from e
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or not isinstance(
        info.get("fingerprint"), str
    ):
        raise RunDirError(
            f"{run_file} is not a flowrl run file (no 'format': '{RUN_FORMAT}' and 'fingerprint'); "
            "pass --overwrite to move the directory aside"
        )
    return info


# --------------------------------------------------------------------------------------------
# prepare_run_dir


def prepare_run_dir(
    path: str | os.PathLike[str], *, fingerprint: str, resume: bool, overwrite: bool
) -> Path:
    """Create, resume or replace the run directory `path` (rules in the module docstring).

    Returns the absolute path of a run directory that holds `run.json` with `fingerprint`, and
    the `checkpoints/` and `logs/` subdirectories. Raises `RunDirError` (one line, naming the
    fix) when the directory may not be used as asked or is not writable.
    """
    if resume and overwrite:
        raise RunDirError("pass either --resume or --overwrite, not both")
    if not fingerprint:
        raise RunDirError("empty config fingerprint; pass the sha256 of the operative config")
    run = Path(path).expanduser().absolute()

    if run.exists() and not run.is_dir():
        raise RunDirError(f"run directory {run} exists and is not a directory; choose another path")

    if run.is_dir() and _listdir(run):
        if overwrite:
            _move_aside(run)
        else:
            _check_resumable(run, fingerprint, resume)
            _check_writable(run)
            _make_subdirs(run)
            return run

    _create_run(run, fingerprint)
    return run


def check_run_dir(
    path: str | os.PathLike[str], *, fingerprint: str, resume: bool, overwrite: bool
) -> None:
    """Raise the `RunDirError` that `prepare_run_dir` would raise, without creating anything.

    Multi-seed training checks every seed's directory first, so a refusal for one seed leaves
    no half-started run behind for the others.
    """
    if resume and overwrite:
        raise RunDirError("pass either --resume or --overwrite, not both")
    run = Path(path).expanduser().absolute()
    if run.exists() and not run.is_dir():
        raise RunDirError(f"run directory {run} exists and is not a directory; choose another path")
    if run.is_dir() and _listdir(run) and not overwrite:
        _check_resumable(run, fingerprint, resume, warn=False)


def _listdir(run: Path) -> list[str]:
    try:
        return os.listdir(run)
    except OSError as e:
        raise RunDirError(os_error_message(f"could not list run directory {run}", e)) from e


def _check_resumable(run: Path, fingerprint: str, resume: bool, *, warn: bool = True) -> None:
    """Raise unless `run` holds a flowrl run with `fingerprint` and `resume` was asked for."""
    if not (run / RUN_FILE).exists():
        raise RunDirError(
            f"{run} is not empty and is not a flowrl run (no {RUN_FILE}); "
            "choose another --run_dir or pass --overwrite to move it aside"
        )
    info = read_run_info(run)
    old = info["fingerprint"]
    if old != fingerprint:
        raise RunDirError(
            f"{run} holds a run of a different config: fingerprint {old[:16]} in {run / RUN_FILE} "
            f"(config {run / CONFIG_FILE}) vs {fingerprint[:16]} of the current operative config; "
            "choose another --run_dir or pass --overwrite to move the old run aside"
        )
    if not resume:
        raise RunDirError(
            f"{run} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if warn:
        _warn_changed_packages(run, info)


def _warn_changed_packages(run: Path, info: dict[str, Any]) -> None:
    recorded = info.get("packages")
    if not isinstance(recorded, dict):
        return
    now = package_versions()
    changed = [
        f"{name} {recorded[name]} -> {now.get(name)}"
        for name in sorted(recorded)
        if name in now and recorded[name] != now[name]
    ]
    if changed:
        warnings.warn(
            f"resuming {run} with different package versions than it was created with: "
            + ", ".join(changed),
            RunDirWarning,
            stacklevel=3,
        )


def _check_writable(run: Path) -> None:
    if not os.access(run, os.W_OK | os.X_OK):
        raise RunDirError(
            f"run directory {run} is not writable; fix its permissions or choose another --run_dir"
        )


def _move_aside(run: Path) -> Path:
    """Rename a non-empty `run` to `<run>.old-<UTC timestamp>[-n]`; nothing is deleted."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    target = run.with_name(f"{run.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = run.with_name(f"{run.name}.old-{stamp}-{n}")
        n += 1
    try:
        os.rename(run, target)
    except OSError as e:
        raise RunDirError(
            os_error_message(f"could not move the old run {run} aside to {target}", e)
        ) from e
    fsync_dir(run.parent)
    return target


def _create_run(run: Path, fingerprint: str) -> None:
    """mkdir + run.json first (so a crash leaves a resumable run, not an alien directory)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(os_error_message(f"could not create run directory {run}", e)) from e
    _check_writable(run)
    now = _dt.datetime.now(_dt.timezone.utc)
    write_json_atomic(
        run / RUN_FILE,
        {
            "format": RUN_FORMAT,
            "format_version": RUN_FORMAT_VERSION,
            "fingerprint": fingerprint,
            "created": now.isoformat(),
            "flowrl_version": _flowrl_version(),
            "packages": package_versions(),
        },
    )
    _make_subdirs(run)


def _make_subdirs(run: Path) -> None:
    for sub in (CHECKPOINT_DIR, LOG_DIR):
        try:
            (run / sub).mkdir(exist_ok=True)
        except OSError as e:
            raise RunDirError(os_error_message(f"could not create {run / sub}", e)) from e
