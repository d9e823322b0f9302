"""Crash-safe checkpoints of arbitrary pytrees of arrays, without pickle.

A checkpoint of step S is a pair of files in one directory (usually `<run>/checkpoints/`)::

    step_000001000.eqx    payload: the leaves, in `equinox.tree_serialise_leaves` order, as .npy
    step_000001000.json   metadata: step, sha256 and byte size of the payload, format version,
                          creation time, a manifest of the leaves, and a user dict (`extra`)

Loading needs a "like" template pytree of the same structure (e.g. the freshly initialised
train state, or `eqx.filter_eval_shape` of it); its leaves are replaced by the stored ones
(`equinox.tree_deserialise_leaves`). Every `.npy` is read with `allow_pickle=False`; nothing
here imports pickle. Typed PRNG keys (`jax.random.key`) are stored as their raw key data and
re-wrapped with the same implementation on load. Non-array leaves (activation functions,
static fields) are not stored; they come from the template.

Crash safety (METHODS.md §1.1: `save_interval` checkpoints and resume):

* Both files are written atomically (temp file in the same directory, flush + fsync,
  `os.replace`, fsync of the directory), payload first, metadata last. A checkpoint without
  valid metadata does not exist, so a crash at any point leaves the previous checkpoint intact.
* `latest_checkpoint` verifies the payload size and sha256 before deserialising. If the newest
  checkpoint is truncated, altered or unreadable it warns (`CheckpointFallbackWarning`, naming
  the bad file and the one used instead) and falls back to the previous good one.
* A full disk or a read-only directory during a save raises `CheckpointError`, removes the
  temporary file, and leaves all earlier checkpoints loadable.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from flowrl.errors import CheckpointError
from flowrl.rundir import atomic_write_bytes, fsync_dir, os_error_message, remove_if_exists

FORMAT = "flowrl-checkpoint"
FORMAT_VERSION = 1
PAYLOAD_SUFFIX = ".eqx"
METADATA_SUFFIX = ".json"
_METADATA_RE = re.compile(r"^step_(\d+)\.json$")
_TMP_RE = re.compile(r"^\.step_\d+\.(eqx|json)\..*\.tmp$")


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint is unusable; an older one is used instead."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Metadata of one checkpoint, as listed by `list_checkpoints` (payload not verified)."""

    step: int
    payload_path: Path
    metadata_path: Path
    sha256: str
    size: int
    created: str
    extra: dict[str, Any]
    leaves: list[dict[str, Any]]


def checkpoint_stem(step: int) -> str:
    """`step_000001000`: zero-padded so that names sort by step (wider past 10^9 steps)."""
    return f"step_{step:09d}"


# --------------------------------------------------------------------------------------------
# Leaf encoding


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_stored(x: Any) -> bool:
    """Leaves that are saved: arrays, typed keys, numpy/Python scalars (not functions etc.)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)) or (
        isinstance(x, (bool, int, float, complex))
    )


def _leaf_entry(path: tuple, x: Any) -> dict[str, Any]:
    """Manifest entry: what a stored leaf is, to diagnose a template mismatch in one line."""
    if _is_key(x):
        impl = str(jax.random.key_impl(x)) if isinstance(x, jax.Array) else None
        return {"path": jtu.keystr(path), "kind": "key", "shape": list(x.shape),
                "dtype": str(x.dtype), "impl": impl}
    if isinstance(x, (bool, int, float, complex)):
        return {"path": jtu.keystr(path), "kind": type(x).__name__, "shape": [],
                "dtype": str(np.asarray(x).dtype)}
    return {"path": jtu.keystr(path), "kind": "array", "shape": list(x.shape),
            "dtype": str(x.dtype)}


def _manifest(tree: PyTree) -> list[dict[str, Any]]:
    leaves, _ = jtu.tree_flatten_with_path(tree)
    return [_leaf_entry(path, x) for path, x in leaves if _is_stored(x)]


def _serialise_leaf(f: Any, x: Any) -> None:
    if not _is_stored(x):
        return
    if _is_key(x):
        data = np.asarray(jax.random.key_data(x))
    else:
        data = np.asarray(x)  # also brings jax arrays (incl. bfloat16, via ml_dtypes) to host
    np.save(f, data, allow_pickle=False)


def _deserialiser(manifest: list[dict[str, Any]]):
    """A `tree_deserialise_leaves` filter spec reading leaves in manifest order."""
    entries: Iterator[dict[str, Any]] = iter(manifest)

    def load_leaf(f: Any, like: Any) -> Any:
        if not _is_stored(like):
            return like
        entry = next(entries)
        data = np.load(f, allow_pickle=False)
        if data.dtype.kind == "V" and not _is_key(like):
            # .npy has no code for ml_dtypes (bfloat16, float8): reinterpret the raw bytes.
            data = data.view(np.dtype(like.dtype))
        if _is_key(like):
            return jax.random.wrap_key_data(jnp.asarray(data), impl=entry["impl"])
        if isinstance(like, (bool, int, float, complex)):
            return type(like)(data.item())
        if isinstance(like, (np.ndarray, np.generic)):
            return data if isinstance(like, np.ndarray) else data[()]
        return jnp.asarray(data)

    return load_leaf


def _concrete_keys(like: PyTree, manifest: list[dict[str, Any]]) -> PyTree:
    """Replace abstract typed-key leaves (`jax.ShapeDtypeStruct`, e.g. from
    `eqx.filter_eval_shape`) by placeholder keys of the stored impl: equinox requires the loaded
    leaf to have the template leaf's type, and a typed key is not a plain `jax.Array` type."""
    entries = iter(manifest)

    def concrete(x: Any) -> Any:
        if not _is_stored(x):
            return x
        entry = next(entries)
        if isinstance(x, jax.ShapeDtypeStruct) and _is_key(x):
            one = jax.random.key_data(jax.random.key(0, impl=entry["impl"]))
            data = jnp.zeros((*x.shape, *one.shape), one.dtype)
            return jax.random.wrap_key_data(data, impl=entry["impl"])
        return x

    return jtu.tree_map(concrete, like)


def _check_template(manifest: list[dict[str, Any]], like: PyTree, where: Path) -> None:
    """Raise `CheckpointError` (one line) if `like` does not match the stored leaves."""
    expected = _manifest(like)
    fix = "load it with the config recorded in the run's config.gin, or start a new run"
    if len(expected) != len(manifest):
        raise CheckpointError(
            f"checkpoint {where} stores {len(manifest)} array leaves but the template has "
            f"{len(expected)}; {fix}"
        )
    for stored, want in zip(manifest, expected):
        same_dtype = stored["dtype"] == want["dtype"]
        if stored["shape"] != want["shape"] or not same_dtype or stored["path"] != want["path"]:
            raise CheckpointError(
                f"checkpoint {where} leaf {stored['path']} is {stored['dtype']}{stored['shape']} "
                f"but the template has {want['path']} as {want['dtype']}{want['shape']}; {fix}"
            )


class _HashingWriter:
    """File wrapper that hashes and counts every byte on its way to disk."""

    def __init__(self, file: io.BufferedWriter):
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)


# --------------------------------------------------------------------------------------------
# Save


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    tree: PyTree,
    *,
    extra: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Atomically save `tree` as the checkpoint of `step` in `directory`; return the payload path.

    `extra` is a JSON-serialisable dict stored in the metadata (e.g. rows logged so far).
    Afterwards only the `keep` newest checkpoints are kept: the one just written always, plus the
    `keep - 1` highest older steps. Checkpoints with a step above `step` belong to a timeline
    abandoned by a resume (they were unusable, or the run would have resumed from them) and are
    removed. Raises `CheckpointError` if the disk is full or the directory is not writable; the
    temporary files are then removed and earlier checkpoints still load.
    """
    step = _check_step(step)
    if keep < 1:
        raise CheckpointError(f"keep={keep} would delete the checkpoint just saved; use keep >= 1")
    extra_dict = dict(extra or {})
    try:
        json.dumps(extra_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint extra={extra_dict!r} is not JSON-serialisable ({e}); "
            "pass plain ints/floats/strings"
        ) from e

    directory = Path(directory)
    stem = checkpoint_stem(step)
    payload_path = directory / f"{stem}{PAYLOAD_SUFFIX}"
    metadata_path = directory / f"{stem}{METADATA_SUFFIX}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(directory)
        # Re-saving a step: drop the old metadata first, so the old pair stops existing before
        # its payload is replaced (never a metadata that describes a different payload).
        if metadata_path.exists():
            os.remove(metadata_path)
            fsync_dir(directory)
        sha256, size = _write_payload(payload_path, tree)
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "payload": payload_path.name,
            "payload_sha256": sha256,
            "payload_bytes": size,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "extra": extra_dict,
            "leaves": _manifest(tree),
        }
        try:
            atomic_write_bytes(metadata_path, (json.dumps(metadata, indent=1) + "\n").encode())
        except BaseException:
            remove_if_exists(payload_path)  # a payload without metadata is dead weight
            raise
    except OSError as e:
        raise CheckpointError(
            os_error_message(f"could not save checkpoint {payload_path}", e)
            + _previous_note(directory, step)
        ) from e

    _prune(directory, step, keep)
    return payload_path


def _check_step(step: Any) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
        raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
    return int(step)


def _write_payload(payload_path: Path, tree: PyTree) -> tuple[str, int]:
    """Serialise `tree` to a temp file, fsync, rename over `payload_path`; (sha256, bytes)."""
    fd, tmp_name = tempfile.mkstemp(
        dir=payload_path.parent, prefix=f".{payload_path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                eqx.tree_serialise_leaves(writer, tree, filter_spec=_serialise_leaf)
            except Exception as e:
                # equinox wraps leaf errors in its own type; surface the OSError for the caller.
                cause = _find_os_error(e)
                if cause is not None:
                    raise cause from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, payload_path)
    except BaseException:
        remove_if_exists(tmp_name)
        raise
    fsync_dir(payload_path.parent)
    return writer.sha256.hexdigest(), writer.size


def _find_os_error(e: BaseException | None) -> OSError | None:
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _previous_note(directory: Path, step: int) -> str:
    try:
        older = [c for c in list_checkpoints(directory) if c.step != step]
    except CheckpointError:
        return ""
    if older:
        return f"; the previous checkpoint {older[-1].payload_path.name} is intact"
    return ""


def _remove_stale_temp_files(directory: Path) -> None:
    """Temp files left by a crashed save (never valid checkpoints) are removed."""
    for name in os.listdir(directory):
        if _TMP_RE.match(name):
            remove_if_exists(directory / name)


def _prune(directory: Path, saved_step: int, keep: int) -> None:
    """Keep `saved_step` and the `keep - 1` highest older steps; delete metadata before payload."""
    steps = sorted(_metadata_files(directory))
    older = [s for s in steps if s < saved_step]
    doomed = [s for s in steps if s > saved_step] + older[: max(0, len(older) - (keep - 1))]
    for s in doomed:
        stem = checkpoint_stem(s)
        remove_if_exists(directory / f"{stem}{METADATA_SUFFIX}")
        remove_if_exists(directory / f"{stem}{PAYLOAD_SUFFIX}")
    if doomed:
        fsync_dir(directory)


# --------------------------------------------------------------------------------------------
# List / load


def _metadata_files(directory: Path) -> dict[int, Path]:
    """{step: metadata path} for every `step_*.json` in `directory` (content not checked)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return {}
    except OSError as e:
        what = f"could not list checkpoints in {directory}"
        raise CheckpointError(os_error_message(what, e)) from e
    found = {}
    for name in names:
        m = _METADATA_RE.match(name)
        if m:
            found[int(m.group(1))] = directory / name
    return found


class _Unusable(Exception):
    """A checkpoint whose files are damaged (as opposed to a template that does not fit)."""


def _read_metadata(metadata_path: Path) -> CheckpointInfo:
    """Parse and validate one metadata file; `_Unusable` naming the file if malformed."""
    try:
        meta = json.loads(metadata_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} "
                "(written by another flowrl version)"
            )
        info = CheckpointInfo(
            step=int(meta["step"]),
            payload_path=metadata_path.parent / str(meta["payload"]),
            metadata_path=metadata_path,
            sha256=str(meta["payload_sha256"]),
            size=int(meta["payload_bytes"]),
            created=str(meta["created"]),
            extra=dict(meta["extra"]),
            leaves=list(meta["leaves"]),
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _Unusable(f"{metadata_path} is unreadable: {e}") from e
    if Path(meta["payload"]).name != meta["payload"]:
        raise _Unusable(f"{metadata_path} names a payload outside its directory")
    return info


def list_checkpoints(directory: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Checkpoints in `directory` with readable metadata, oldest step first.

    Payloads are not verified here (`load_checkpoint` does that). Files without metadata, or
    with unreadable metadata, are not listed.
    """
    infos = []
    for _, metadata_path in sorted(_metadata_files(Path(directory)).items()):
        try:
            infos.append(_read_metadata(metadata_path))
        except _Unusable:
            continue
    return infos


def _load(info: CheckpointInfo, like: PyTree) -> PyTree:
    try:
        data = info.payload_path.read_bytes()
    except OSError as e:
        raise _Unusable(f"{info.payload_path} is unreadable: {e.strerror or e}") from e
    if len(data) != info.size:
        raise _Unusable(
            f"{info.payload_path} has {len(data)} bytes, its metadata says {info.size} (truncated)"
        )
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise _Unusable(f"{info.payload_path} sha256 does not match its metadata (altered on disk)")
    _check_template(info.leaves, like, info.payload_path)
    try:
        return eqx.tree_deserialise_leaves(
            io.BytesIO(data),
            _concrete_keys(like, info.leaves),
            filter_spec=_deserialiser(info.leaves),
        )
    except Exception as e:
        raise _Unusable(f"{info.payload_path} could not be deserialised: {e}") from e


def load_checkpoint(
    path: str | os.PathLike[str], like: PyTree
) -> tuple[int, PyTree, dict[str, Any]]:
    """Load one checkpoint (its `.eqx` or `.json` path) into the structure of `like`.

    Returns `(step, tree, extra)`. Raises `CheckpointError` if it is damaged or does not match
    the template.
    """
    path = Path(path)
    try:
        info = _read_metadata(path.with_suffix(METADATA_SUFFIX))
        tree = _load(info, like)
    except _Unusable as e:
        raise CheckpointError(f"unusable checkpoint: {e}; load an older one") from e
    return info.step, tree, info.extra


def latest_checkpoint(
    directory: str | os.PathLike[str], like: PyTree
) -> tuple[int, PyTree, dict[str, Any]] | None:
    """The newest usable checkpoint in `directory` as `(step, tree, extra)`, or None if none.

    Damaged checkpoints (unreadable metadata, truncated or altered payload) are skipped with a
    `CheckpointFallbackWarning` naming the damaged file and the one used instead. A payload
    without metadata (a crash between the two writes) is silently not a checkpoint. Raises
    `CheckpointError` if checkpoints exist but none is usable (resuming from scratch would
    silently discard the run), or if `like` does not match what was stored.
    """
    return latest_checkpoint_for(directory, lambda extra: like, _stacklevel=3)


def latest_checkpoint_for(
    directory: str | os.PathLike[str], template: Callable[[dict[str, Any]], PyTree], *, _stacklevel: int = 2
) -> tuple[int, PyTree, dict[str, Any]] | None:
    """`latest_checkpoint` for runs whose checkpoints differ in structure: each checkpoint is
    loaded into `template(extra)`, built from its own metadata `extra` (e.g. the offline and the
    online phase of one run, `flowrl.online`). Same fallback warnings and errors."""
    directory = Path(directory)
    bad: list[str] = []
    for _, metadata_path in sorted(_metadata_files(directory).items(), reverse=True):
        try:
            info = _read_metadata(metadata_path)
            # A template mismatch raises CheckpointError: older checkpoints would not fit either.
            tree = _load(info, template(info.extra))
        except _Unusable as e:
            bad.append(str(e))
            continue
        if bad:
            warnings.warn(
                f"skipping unusable checkpoint: {'; '.join(bad)}; "
                f"resuming from {info.payload_path} (step {info.step}) instead",
                CheckpointFallbackWarning,
                stacklevel=_stacklevel,
            )
        return info.step, tree, info.extra
    if bad:
        raise CheckpointError(
            f"no usable checkpoint in {directory}: {'; '.join(bad)}; "
            "restore the files or pass --overwrite to start the run over"
        )
    return None
