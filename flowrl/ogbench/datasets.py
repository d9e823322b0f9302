"""Load and validate OGBench single-task datasets as float32 transition arrays (METHODS.md §2.1–2.2).

Files are the official OGBench ones (or ours from `flowrl.ogbench.generate`, same format), read with
`np.load(..., allow_pickle=False)` and validated before use; every problem raises one `DatasetError`
line naming the file, key, shape or row and the fix.

Loading (`load_dataset`, the standard path of METHODS.md §2.1; identical to what
`ogbench.make_env_and_datasets(name, ...)` returns, checked in tests):

1. Rows are stored per step s_0 … s_T of each episode with `terminals` True on the last row. Each
   episode's last row is dropped, `next_observations[t] = observations[t+1]` within the episode, and
   `terminals` is re-marked on the new last transition (ogbench `load_dataset`, non-compact mode).
2. Rewards and masks come from ogbench's own single-task relabelling
   (`ogbench.relabel_utils.relabel_dataset`) against the env's fixed task goal, computed from the stored
   pre-step `qpos` / `button_states`: r(s_t) = #satisfied sub-goals − #sub-goals (manipulation) or
   success − 1 (locomotion), mask = 1 − success(s_t). The evaluation env is built with gymnasium from the
   installed package; no dataset is ever downloaded (we never call ogbench's downloader).
3. `sparse=True`: r ← −1 if r ≠ 0 else 0 (METHODS.md §2.2); masks unchanged.
4. `clip_actions=True`: actions clipped to [−1 + 1e−5, 1 − 1e−5] (QAM's standard path).

`load_shard` is QAM's 100M path (METHODS.md §2.1: `<domain>-100m-v0/<domain>-v0-NNN.npz` shards,
same steps 1–3, **no** action clipping by default).
"""

from __future__ import annotations

import os
import re
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flowrl.ogbench.domains import DOMAINS, DatasetError, DomainSpec, EnvName, env_dims, parse_env_name

__all__ = [
    "ACTION_CLIP",
    "DatasetError",
    "dataset_paths",
    "env_dims",
    "find_shards",
    "load_dataset",
    "load_shard",
    "read_dataset_file",
]

# QAM clips dataset actions to [-1 + eps, 1 - eps] so atanh-style heads stay finite (METHODS.md §2.1).
ACTION_CLIP = 1e-5

Split = Literal["train", "val"]
_FLOAT_KEYS = ("observations", "actions", "qpos")


def dataset_paths(env_name: str, directory: str | Path) -> tuple[Path, Path]:
    """(train, val) paths of the standard files `<domain>-v0.npz`, `<domain>-v0-val.npz` in `directory`."""
    spec = parse_env_name(env_name).domain
    directory = Path(directory).expanduser()
    return directory / spec.train_file, directory / spec.val_file


def _missing_file_message(spec: DomainSpec, path: Path, directory: Path) -> str:
    if spec.generable:
        return f"dataset file {path} not found; make it with: flowrl data generate {spec.name} --dir {directory}"
    return (
        f"dataset file {path} not found; {spec.name} cannot be generated locally ({spec.not_generable_reason}); "
        f"place the official OGBench file at {path}"
    )


def find_shards(env_name: str, directory: str | Path) -> list[Path]:
    """Sorted 100M-set shards `<domain>-v0-NNN.npz` (not `-val`) of the env's domain.

    Looked for in `directory/<domain>-100m-v0/` (OGBench's download layout) and then in `directory`
    itself (QAM's `--ogbench_dataset_dir` points at the shard directory). Empty list: none found.
    """
    spec = parse_env_name(env_name).domain
    directory = Path(directory).expanduser()
    pattern = re.compile(rf"^{re.escape(spec.dataset_name)}-(\d+)\.npz$")
    for candidate in (directory / spec.shard_directory, directory):
        if not candidate.is_dir():
            continue
        numbered = [(int(m[1]), p) for p in candidate.iterdir() if (m := pattern.match(p.name)) and p.is_file()]
        if numbered:
            return [path for _, path in sorted(numbered)]
    return []


# --------------------------------------------------------------------------------------------------
# Reading and validating one file.


def _domains_with_ob_dim(ob_dim: int) -> list[str]:
    return [name for name, spec in DOMAINS.items() if spec.ob_dim == ob_dim]


def _read_key(archive: Any, path: Path, key: str) -> np.ndarray:
    try:
        _check_declared_size(archive, path, key)
        return np.asarray(archive[key])
    except ValueError as error:
        if "pickle" in str(error).lower() or "object arrays" in str(error).lower():
            raise DatasetError(
                f"{path}: key {key!r} holds an object array (pickled data), which flowrl never loads; "
                "regenerate the file or re-save it with plain numeric arrays"
            ) from None
        raise DatasetError(f"{path}: key {key!r} cannot be read ({error}); regenerate or re-download the file") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError,
            tokenize.TokenError, SyntaxError, MemoryError) as error:
        # RuntimeError: encrypted member; NotImplementedError: unknown compression; TokenError /
        # SyntaxError: malformed .npy header; MemoryError: a header claiming an absurd shape.
        raise DatasetError(
            f"{path}: key {key!r} is corrupt ({error or type(error).__name__}); delete the file and "
            "regenerate or re-download it"
        ) from None


def _check_declared_size(archive: Any, path: Path, key: str) -> None:
    """Refuse a member whose .npy header claims more data than the member holds (numpy would
    allocate the claimed size before noticing)."""
    member = f"{key}.npy"
    try:
        info = archive.zip.getinfo(member)
        with archive.zip.open(member) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return  # other header versions: np.load's own checks apply
    except KeyError:
        return  # a missing key is reported by the caller
    if dtype.hasobject:
        return  # np.load refuses it with its own (pickle) error, reported by the caller
    claimed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if claimed > info.file_size:
        raise DatasetError(
            f"{path}: key {key!r} declares shape {shape} ({claimed} bytes) but holds only {info.file_size} "
            "bytes; the file is corrupt, delete it and regenerate or re-download it"
        )


def read_dataset_file(path: str | Path, spec: DomainSpec) -> dict[str, np.ndarray]:
    """Read and validate one official-format `.npz` file; return its raw per-step arrays.

    Returned keys: observations, actions, terminals (bool), qpos, and button_states for scene/puzzle,
    with their stored dtypes. Checks: readable zip (CRC), no pickled/object arrays, required keys,
    2-D float arrays of the domain's widths, equal row counts, finite values, 0/1 terminals with the last
    row terminal. Raises `DatasetError` (one line) on the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise DatasetError(
                f"{path} is not an .npz archive (its bytes look like pickled or arbitrary data, which flowrl never "
                "loads); delete it and regenerate or re-download it"
            ) from None
        raise DatasetError(f"{path} cannot be read as .npz ({error}); delete it and regenerate or re-download it") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DatasetError(
            f"{path} is not a readable .npz archive ({error}; truncated download?); delete it and regenerate or "
            "re-download it"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path} holds a single .npy array, not an .npz archive of dataset keys; regenerate it")

    required = ["observations", "actions", "terminals", "qpos"] + (["button_states"] if spec.n_buttons else [])
    with archive:
        missing = [key for key in required if key not in archive.files]
        if missing:
            raise DatasetError(
                f"{path} lacks required key(s) {', '.join(missing)} (has: {', '.join(sorted(archive.files))}); "
                f"a {spec.name} dataset needs {', '.join(required)}"
            )
        raw = {key: _read_key(archive, path, key) for key in required}

    expected_width = {"observations": spec.ob_dim, "actions": spec.action_dim, "qpos": spec.nq}
    if spec.n_buttons:
        expected_width["button_states"] = spec.n_buttons
    for key, array in raw.items():
        if array.dtype.hasobject or array.dtype.names is not None:
            raise DatasetError(f"{path}: key {key!r} has non-numeric dtype {array.dtype}; regenerate the file")
        if key in _FLOAT_KEYS and not np.issubdtype(array.dtype, np.floating):
            raise DatasetError(f"{path}: key {key!r} has dtype {array.dtype}, expected a float dtype (float32)")
        if key == "terminals" and not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number)):
            raise DatasetError(f"{path}: key 'terminals' has dtype {array.dtype}, expected bool")
        if key == "button_states" and not (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)):
            raise DatasetError(f"{path}: key 'button_states' has dtype {array.dtype}, expected an integer dtype (int64)")
        wanted_ndim = 1 if key == "terminals" else 2
        if array.ndim != wanted_ndim:
            shape_text = "(rows,)" if wanted_ndim == 1 else f"(rows, {expected_width[key]})"
            raise DatasetError(f"{path}: key {key!r} has shape {array.shape}, expected {shape_text}")

    rows = {key: array.shape[0] for key, array in raw.items()}
    if len(set(rows.values())) != 1:
        listing = ", ".join(f"{key} {count}" for key, count in rows.items())
        raise DatasetError(f"{path}: keys disagree on the number of rows ({listing}); the file is inconsistent")
    for key, width in expected_width.items():
        actual = raw[key].shape[1]
        if actual != width:
            hint = ""
            if key == "observations" and (others := _domains_with_ob_dim(actual)):
                hint = f" (that is the observation size of {', '.join(others)}; wrong file for this env?)"
            raise DatasetError(
                f"{path}: key {key!r} has {actual} columns but {spec.name} expects {width}{hint}"
            )

    for key in _FLOAT_KEYS:
        # Checked at the training precision: a float64 1e300 is finite but becomes inf in float32.
        with np.errstate(over="ignore"):  # the overflow to inf is what this check reports
            finite_rows = np.isfinite(raw[key].astype(np.float32)).all(axis=1)
        if not finite_rows.all():
            row = int(np.argmin(finite_rows))
            raise DatasetError(f"{path}: key {key!r} has a NaN/inf value at row {row}; the file is corrupt, regenerate it")

    terminals = raw["terminals"]
    if terminals.dtype != np.bool_:
        if not np.isin(terminals, (0, 1)).all():
            row = int(np.argmin(np.isin(terminals, (0, 1))))
            raise DatasetError(f"{path}: key 'terminals' has value {terminals[row]} at row {row}, expected 0 or 1")
        terminals = terminals.astype(bool)
    raw["terminals"] = terminals
    n_rows = terminals.shape[0]
    if n_rows < 2 or not terminals[-1]:
        raise DatasetError(
            f"{path}: the last row ({n_rows - 1}) must end an episode (terminals True) and the file needs >= 2 rows; "
            "the file is truncated or not in OGBench's per-step format"
        )
    if int(np.count_nonzero(~terminals)) == 0:
        raise DatasetError(f"{path}: every row is terminal, so there are no transitions; regenerate the file")
    return raw


# --------------------------------------------------------------------------------------------------
# Relabelling with ogbench's own code.

_RELABEL_ENVS: dict[str, Any] = {}


def _relabel_env(parsed: EnvName) -> Any:
    """The single-task evaluation env whose fixed goal ogbench relabels against (cached per env name).

    Built with `ogbench.make_env_and_datasets(name, env_only=True)`, which only calls `gymnasium.make`
    (no dataset access, no network).
    """
    name = parsed.canonical
    if name not in _RELABEL_ENVS:
        os.environ.setdefault("MUJOCO_GL", "egl")
        import ogbench

        _RELABEL_ENVS[name] = ogbench.make_env_and_datasets(name, env_only=True)
    return _RELABEL_ENVS[name]


def _relabel(parsed: EnvName, qpos: np.ndarray, button_states: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    from ogbench.relabel_utils import relabel_dataset

    info: dict[str, np.ndarray] = {"qpos": qpos}
    if button_states is not None:
        info["button_states"] = button_states
    relabel_dataset(parsed.gym_env_name, _relabel_env(parsed), info)
    return info["rewards"], info["masks"]


def _transitions(
    parsed: EnvName, raw: dict[str, np.ndarray], *, clip_actions: bool, sparse: bool
) -> dict[str, np.ndarray]:
    terminals = raw["terminals"]
    starts = np.flatnonzero(~terminals)  # rows with a successor in the same episode
    observations = raw["observations"]
    rewards, masks = _relabel(
        parsed, raw["qpos"][starts], raw["button_states"][starts] if "button_states" in raw else None
    )
    actions = raw["actions"][starts].astype(np.float32)
    if clip_actions:
        actions = np.clip(actions, -1.0 + ACTION_CLIP, 1.0 - ACTION_CLIP)
    rewards = rewards.astype(np.float32)
    if sparse:
        rewards = np.where(rewards != 0.0, np.float32(-1.0), np.float32(0.0))
    # The new last transition of each episode is the one whose successor row ends the episode.
    new_terminals = np.append(terminals[1:], True)[starts]
    return {
        "observations": np.ascontiguousarray(observations[starts], dtype=np.float32),
        "actions": np.ascontiguousarray(actions, dtype=np.float32),
        "rewards": np.ascontiguousarray(rewards, dtype=np.float32),
        "masks": np.ascontiguousarray(masks, dtype=np.float32),
        "terminals": new_terminals.astype(np.float32),
        "next_observations": np.ascontiguousarray(observations[starts + 1], dtype=np.float32),
    }


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise DatasetError(f"unknown split {split!r}; use 'train' or 'val'")


def load_dataset(
    env_name: str,
    directory: str | Path,
    *,
    clip_actions: bool = True,
    sparse: bool = False,
    split: Split = "train",
) -> dict[str, np.ndarray]:
    """Load the standard dataset of a single-task env as float32 transitions (METHODS.md §2.1–2.2).

    Args:
        env_name: `<domain>-singletask[-taskN]-v0`, e.g. `scene-play-singletask-task2-v0`.
        directory: holds `<domain>-v0.npz` / `<domain>-v0-val.npz` (official or generated files).
        clip_actions: clip actions to [−1 + 1e−5, 1 − 1e−5] (QAM's standard path does).
        sparse: r ← −1 if r ≠ 0 else 0.
        split: "train" or "val" (only that file is read).

    Returns:
        observations (N, ob), actions (N, A), rewards (N,), masks (N,), terminals (N,),
        next_observations (N, ob); all float32.

    Raises:
        DatasetError: one line — unknown env, missing file (with the command that makes it), corrupt
        archive, pickled/object arrays, missing keys, wrong dtypes/shapes, NaN/inf (key and first row).
    """
    parsed = parse_env_name(env_name)
    _check_split(split)
    directory = Path(directory).expanduser()
    train_path, val_path = dataset_paths(env_name, directory)
    path = train_path if split == "train" else val_path
    if not path.is_file():
        raise DatasetError(_missing_file_message(parsed.domain, path, directory))
    raw = read_dataset_file(path, parsed.domain)
    return _transitions(parsed, raw, clip_actions=clip_actions, sparse=sparse)


def load_shard(
    env_name: str,
    directory: str | Path,
    index: int,
    *,
    clip_actions: bool = False,
    sparse: bool = False,
    split: Split = "train",
) -> dict[str, np.ndarray]:
    """Load shard `index` (cyclic) of a 100M set, as QAM's 100M path does (METHODS.md §2.1, §1.2).

    Shards are the sorted `find_shards(env_name, directory)`; the val split reads `<shard>-val.npz`.
    No action clipping by default: QAM's 100M path does not clip. Same outputs and errors as
    `load_dataset`.
    """
    parsed = parse_env_name(env_name)
    _check_split(split)
    shards = find_shards(env_name, directory)
    if not shards:
        spec = parsed.domain
        directory = Path(directory).expanduser()
        raise DatasetError(
            f"no shard files {spec.dataset_name}-NNN.npz in {directory / spec.shard_directory} or {directory}; "
            f"download OGBench's {spec.shard_directory} set there (or use load_dataset for the standard file)"
        )
    path = shards[index % len(shards)]
    if split == "val":
        path = path.with_name(path.name.removesuffix(".npz") + "-val.npz")
        if not path.is_file():
            raise DatasetError(f"shard val file {path} not found; download it next to its train shard")
    raw = read_dataset_file(path, parsed.domain)
    return _transitions(parsed, raw, clip_actions=clip_actions, sparse=sparse)
