"""Rebuild the compact reference tables shipped in `flowrl/resources/` (run once by a maintainer).

Reads the CSV exports in the team's `shared/reference/` folder (themselves exported from the qam repo's
`exp_data/*.pkl`, see README.md here) with the stdlib only — the pickles are never opened — and writes:

- `paper_curves.csv.gz`: same rows and columns as the shared export
  (`source,key,method,step,phase,seed,success`), with `success` written as the shortest exact decimal:
  task-level values are multiples of 0.02 (50 eval episodes) and aggregates are means over 5 or 50 tasks
  (multiples of 0.004 / 0.0004), so rounding to 4 decimals is lossless. gzip level 9, mtime 0, so the
  output is byte-for-byte reproducible.
- `paper_final_success.csv`: copied unchanged.

Usage:  python -m flowrl.resources.build_reference [--shared-dir /work/shared/reference] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import sys
from pathlib import Path

from flowrl.rundir import atomic_write_bytes

CURVE_COLUMNS = ("source", "key", "method", "step", "phase", "seed", "success")
# Success values lie on a 0.0004 grid (0.02 per task / 50 tasks), so 4 decimals are exact.
SUCCESS_DECIMALS = 4
# Shared export writes `%.6g`; a value further than this from the 4-decimal grid means the input is not what
# this script assumes, and rounding would silently change the data.
GRID_TOLERANCE = 1e-6


def format_success(text: str) -> str:
    """Shortest decimal string for a success value on the 1e-4 grid ('0.0784', '0.5', '1', '0')."""
    value = float(text)
    rounded = round(value, SUCCESS_DECIMALS)
    if abs(value - rounded) > GRID_TOLERANCE:
        raise ValueError(
            f"success value {text!r} is not on the {10**-SUCCESS_DECIMALS:g} grid; "
            "raise SUCCESS_DECIMALS in build_reference.py"
        )
    short = f"{rounded:.{SUCCESS_DECIMALS}f}".rstrip("0").rstrip(".")
    return short if short not in ("", "-0") else "0"


def compact_curves(shared_curves: Path) -> bytes:
    """Re-encode the shared long-format curves CSV with exact short success values; returns gzip bytes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    with gzip.open(shared_curves, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader))
        if header != CURVE_COLUMNS:
            raise ValueError(f"{shared_curves}: header {header} != expected {CURVE_COLUMNS}")
        writer.writerow(CURVE_COLUMNS)
        for row in reader:
            *front, success = row
            writer.writerow([*front, format_success(success)])
    return gzip.compress(out.getvalue().encode("utf-8"), compresslevel=9, mtime=0)


def write_atomic(path: Path, data: bytes) -> None:
    """Atomic write (flowrl.rundir) and world-readable mode: mkstemp's 0600 would break installs."""
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def build(shared_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write both resource files into `out_dir`; returns {file name: size in bytes}."""
    curves = compact_curves(shared_dir / "paper_curves.csv.gz")
    final = (shared_dir / "paper_final_success.csv").read_bytes()
    write_atomic(out_dir / "paper_curves.csv.gz", curves)
    write_atomic(out_dir / "paper_final_success.csv", final)
    return {"paper_curves.csv.gz": len(curves), "paper_final_success.csv": len(final)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-dir", type=Path, default=Path("/work/shared/reference"))
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    sizes = build(args.shared_dir, args.out_dir)
    for name, size in sizes.items():
        print(f"{args.out_dir / name}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
