"""Crash-safe metrics logs: one CSV and one JSONL file per record kind.

Layout (in `<run>/logs/`)::

    train.jsonl  train.csv     records logged with kind="train"
    eval.jsonl   eval.csv      records logged with kind="eval"   (any lowercase identifier works)

Why one file pair per kind: train and eval records have different keys and cadences
(METHODS.md §1.1: `log_interval` vs `eval_interval`), so each kind keeps a compact CSV schema.
The JSONL file is the exact record of the run: every value round-trips (floats are written with
`repr`, the shortest string that parses back to the same double). The CSV is derived from it
for spreadsheets and plots: columns are `step` followed by the other keys in order of first
appearance; a missing value is an empty cell. If a record brings a new key, the CSV is
regenerated from the JSONL with the wider header and atomically swapped in (rare: normally the
first record of a kind already has every key).

Crash safety. Each record is appended as one full line per file and flushed to the OS (JSONL
first, then CSV). `sync()` fsyncs both; the driver calls it right before saving a checkpoint,
so every row with step <= S is on disk when checkpoint S exists. On resume from checkpoint S,
`MetricsLogger(run_dir, resume_from_step=S)` rewrites each JSONL keeping only the complete,
parseable rows with step <= S (dropping rows written by the crashed run after its last
checkpoint and a partial trailing line left by a crash mid-write) and regenerates the CSV from
it. With `resume_from_step=None` the run starts at step 0, so all existing rows are dropped.
Contract for no duplicated and no missing rows: log the records of step S before saving
checkpoint S, and resume training at step S + 1.

Weights & Biases is optional: used only if asked for (`use_wandb=True`) and installed
(imported lazily; if missing, one warning and the files are still written). Keys are sent as
`<kind>/<key>` at wandb step `step`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

from flowrl.errors import MetricsError
from flowrl.rundir import LOG_DIR, atomic_write_bytes, os_error_message

Scalar = int | float | bool | str
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class MetricsWarning(UserWarning):
    """Metrics are still written to files, but something asked for was not available."""


# --------------------------------------------------------------------------------------------
# Encoding


def _to_scalar(key: str, value: Any) -> Scalar:
    """A Python scalar for `value` (numpy/jax 0-d arrays included); `MetricsError` otherwise."""
    if type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (np.generic, bool, int, float, str)) or hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.shape != ():
            raise MetricsError(
                f"metric {key!r} has shape {arr.shape}; log scalars only "
                "(reduce it, e.g. .mean(), or log each element under its own key)"
            )
        item = arr.item()
        if isinstance(item, (bool, int, float, str)):
            return item
    raise MetricsError(
        f"metric {key!r} has type {type(value).__name__}; log int/float/bool/str scalars only"
    )


def _normalise(record: Mapping[str, Any]) -> dict[str, Scalar]:
    if "step" not in record:
        raise MetricsError(f"metrics record {sorted(record)} has no 'step' key; add step=<int>")
    out: dict[str, Scalar] = {}
    for key, value in record.items():
        if not isinstance(key, str) or not key or any(c in key for c in "\r\n"):
            raise MetricsError(f"metric key {key!r} must be a non-empty single-line string")
        out[key] = _to_scalar(key, value)
    step = out["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MetricsError(f"metrics 'step' must be an int >= 0, got {record['step']!r}")
    # `step` first, so that files read naturally.
    return {"step": step, **{k: v for k, v in out.items() if k != "step"}}


def _json_line(record: Mapping[str, Scalar]) -> str:
    # json writes floats with repr (exact round trip); NaN/inf as NaN/Infinity, which Python's
    # json (and pandas) read back.
    return json.dumps(record, ensure_ascii=False) + "\n"


def _csv_cell(value: Scalar | None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact representation
    return str(value)


def _csv_lines(columns: list[str], records: list[dict[str, Scalar]] | None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if records is None:
        writer.writerow(columns)
    else:
        for record in records:
            writer.writerow([_csv_cell(record.get(c)) for c in columns])
    return buf.getvalue()


def _parse_csv_cell(cell: str) -> Scalar:
    for parse in (int, float):
        try:
            return parse(cell)
        except ValueError:
            pass
    if cell in ("True", "False"):
        return cell == "True"
    return cell


def _columns(records: list[dict[str, Scalar]]) -> list[str]:
    columns = ["step"]
    seen = {"step"}
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    return columns


# --------------------------------------------------------------------------------------------
# Reading


def _read_jsonl(path: Path) -> tuple[list[dict[str, Scalar]], bool, int]:
    """(complete parseable records, whether a partial last line was cut, # corrupt lines)."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return [], False, 0
    lines = text.split("\n")
    partial_tail = lines.pop() != ""  # "" iff the file ends with a newline
    records, corrupt = [], 0
    for line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or type(record.get("step")) is not int:
                raise ValueError("not a record with an int step")
        except ValueError:
            corrupt += 1
            continue
        records.append(record)
    return records, partial_tail, corrupt


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Scalar]]:
    """Records of a `.jsonl` (exact) or `.csv` (empty cells omitted) metrics file.

    A partial last line (a writer crashed or is mid-write) is skipped; a corrupt complete line
    raises `MetricsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"metrics file {path} does not exist; check the run directory's logs/")
    if path.suffix == ".jsonl":
        records, _, corrupt = _read_jsonl(path)
        if corrupt:
            raise MetricsError(
                f"{path} has {corrupt} corrupt line(s); resume the run (which repairs its logs) "
                "or delete those lines"
            )
        return records
    if path.suffix == ".csv":
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows = csv.DictReader(io.StringIO(text))
        return [{k: _parse_csv_cell(v) for k, v in row.items() if v != ""} for row in rows]
    raise MetricsError(f"{path} is not a metrics file; pass a .jsonl or .csv path")


# --------------------------------------------------------------------------------------------
# Writing


class _KindFiles:
    """Open append handles and CSV schema for one record kind."""

    def __init__(self, jsonl_path: Path, csv_path: Path, columns: list[str], last_step: int):
        self.jsonl_path = jsonl_path
        self.csv_path = csv_path
        self.columns = columns
        self.last_step = last_step
        self.jsonl: IO[str] = open(jsonl_path, "a", encoding="utf-8", newline="")
        self.csv: IO[str] = open(csv_path, "a", encoding="utf-8", newline="")

    def close(self) -> None:
        self.jsonl.close()
        self.csv.close()


class MetricsLogger:
    """Append metrics records to `<run_dir>/logs/<kind>.{jsonl,csv}` (and wandb if asked).

    **Arguments:**

    - `run_dir`: the run directory (`flowrl.rundir.prepare_run_dir`).
    - `resume_from_step`: the step of the checkpoint the run resumes from; rows with a larger
      step are dropped. `None` = the run starts from scratch: existing rows are dropped.
    - `use_wandb`, `wandb_kwargs`: also send records to Weights & Biases (`wandb.init(**kwargs)`).

    `dropped_rows` maps each kind to the number of rows removed at start-up (rows after the
    checkpoint, a partial trailing line, corrupt lines), for the driver to report.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        resume_from_step: int | None,
        use_wandb: bool = False,
        wandb_kwargs: Mapping[str, Any] | None = None,
    ):
        if resume_from_step is not None:
            if (
                isinstance(resume_from_step, (bool, np.bool_))
                or not isinstance(resume_from_step, (int, np.integer))
                or resume_from_step < 0
            ):
                raise MetricsError(
                    f"resume_from_step must be None or the checkpoint's int step >= 0, "
                    f"got {resume_from_step!r}"
                )
            resume_from_step = int(resume_from_step)
        self.log_dir = Path(run_dir) / LOG_DIR
        self.resume_from_step = resume_from_step
        self.dropped_rows: dict[str, int] = {}
        self._kinds: dict[str, _KindFiles] = {}
        self._wandb_run: Any = None
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for jsonl_path in sorted(self.log_dir.glob("*.jsonl")):
                kind = jsonl_path.stem
                if _KIND_RE.match(kind):
                    self._open_kind(kind)
        except OSError as e:
            self.close()
            what = f"could not prepare metrics logs in {self.log_dir}"
            raise MetricsError(os_error_message(what, e)) from e
        if use_wandb:
            self._wandb_run = _start_wandb(dict(wandb_kwargs or {}))

    def paths(self, kind: str = "train") -> tuple[Path, Path]:
        """(`<kind>.jsonl`, `<kind>.csv`) paths."""
        return self.log_dir / f"{kind}.jsonl", self.log_dir / f"{kind}.csv"

    def _open_kind(self, kind: str) -> _KindFiles:
        """Repair (truncate to the resume step) and open the files of `kind` for appending."""
        jsonl_path, csv_path = self.paths(kind)
        records, partial_tail, corrupt = _read_jsonl(jsonl_path)
        dropped = int(partial_tail) + corrupt
        limit = -1 if self.resume_from_step is None else self.resume_from_step
        kept = [r for r in records if r["step"] <= limit]
        dropped += len(records) - len(kept)
        if dropped or not jsonl_path.exists():
            atomic_write_bytes(jsonl_path, "".join(_json_line(r) for r in kept).encode("utf-8"))
        columns = _columns(kept)
        csv_text = (_csv_lines(columns, None) + _csv_lines(columns, kept)) if kept else ""
        try:
            current = csv_path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            current = None
        if current != csv_text:
            atomic_write_bytes(csv_path, csv_text.encode("utf-8"))
        if dropped:
            self.dropped_rows[kind] = dropped
        last_step = kept[-1]["step"] if kept else -1
        files = _KindFiles(jsonl_path, csv_path, columns if kept else [], last_step)
        self._kinds[kind] = files
        return files

    def log(self, record: Mapping[str, Any], *, kind: str = "train") -> None:
        """Append one record (a dict of scalars with an int `step`) to the files of `kind`.

        Steps of one kind must not decrease (a decrease means the driver did not resume where
        the logs end).
        """
        if not _KIND_RE.match(kind):
            raise MetricsError(f"metrics kind {kind!r} must be a lowercase identifier, e.g. 'eval'")
        row = _normalise(record)
        files = self._kinds.get(kind)
        try:
            if files is None:
                files = self._open_kind(kind)
            if row["step"] < files.last_step:
                raise MetricsError(
                    f"{kind} record at step {row['step']} after step {files.last_step}; steps must "
                    "not decrease (resume the logger with the checkpoint's step)"
                )
            files.jsonl.write(_json_line(row))
            files.jsonl.flush()
            new_keys = [k for k in row if k not in files.columns]
            if not files.columns:
                files.columns = list(row)
                files.csv.write(_csv_lines(files.columns, None) + _csv_lines(files.columns, [row]))
            elif new_keys:
                self._widen_csv(files)
            else:
                files.csv.write(_csv_lines(files.columns, [row]))
            files.csv.flush()
            files.last_step = row["step"]
        except OSError as e:
            what = f"could not append to {self.log_dir}/{kind}.*"
            raise MetricsError(os_error_message(what, e)) from e
        if self._wandb_run is not None:
            self._wandb_run.log(
                {f"{kind}/{k}": v for k, v in row.items() if k != "step"}, step=row["step"]
            )

    def _widen_csv(self, files: _KindFiles) -> None:
        """A record brought new keys: regenerate the CSV (from the JSONL) with a wider header."""
        records, _, _ = _read_jsonl(files.jsonl_path)
        files.columns = _columns(records)
        files.csv.close()
        atomic_write_bytes(
            files.csv_path,
            (_csv_lines(files.columns, None) + _csv_lines(files.columns, records)).encode("utf-8"),
        )
        files.csv = open(files.csv_path, "a", encoding="utf-8", newline="")

    def sync(self) -> None:
        """fsync every log file: call right before saving a checkpoint."""
        try:
            for files in self._kinds.values():
                for handle in (files.jsonl, files.csv):
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as e:
            what = f"could not sync metrics in {self.log_dir}"
            raise MetricsError(os_error_message(what, e)) from e

    def close(self) -> None:
        """Flush and close the files (and finish the wandb run)."""
        for files in self._kinds.values():
            files.close()
        self._kinds = {}
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start_wandb(kwargs: dict[str, Any]) -> Any:
    try:
        import wandb  # optional dependency: `pip install flowrl[wandb]`
    except ImportError:
        warnings.warn(
            "use_wandb=True but wandb is not installed; metrics go to the CSV/JSONL files only "
            "(pip install wandb to enable it)",
            MetricsWarning,
            stacklevel=3,
        )
        return None
    return wandb.init(**kwargs)

