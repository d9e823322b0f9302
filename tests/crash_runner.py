"""Subprocess entry point for the SIGKILL trials of tests/test_crash.py.

    python tests/crash_runner.py --out RUN --data DATA [--resume] [--jax-cache DIR]
        [--started FILE] [--pause PHASE:K --marker FILE] [--bind X.y=v]...

Runs `flowrl.cli.main(["train", ...])` (the real command line, real files, real checkpoints)
with tiny bindings. Two optional hooks let the test choose where its SIGKILL lands:

- `--started FILE`: written when the first train record is logged, i.e. once the jitted update
  has been compiled and training is under way (the test then waits a random delay and kills).
- `--hashes FILE`: after each checkpoint save, append `step payload-sha256` to FILE, so that the
  test can check every checkpoint any process wrote against the reference run's.
- `--pause PHASE:K --marker FILE`: at PHASE of the K-th checkpoint save (or K-th train record, for
  the log phases) of this process, write FILE (its text: phase and step) and sleep until
  killed. The phases, in the order a save goes through them:

  | phase           | state on disk when the kill lands                                    |
  |-----------------|----------------------------------------------------------------------|
  | log-jsonl       | half of a JSONL train row written (a partial trailing line)          |
  | log-csv         | JSONL row complete, half of its CSV row written                      |
  | before-save     | rows of step S synced, checkpoint S not started                      |
  | payload         | temp payload file half written                                       |
  | payload-renamed | payload of S in place, no metadata yet (S is not a checkpoint)       |
  | metadata        | metadata of S complete in its temp file, not yet renamed             |
  | prune           | an old checkpoint's metadata deleted, its payload not yet            |
  | after-save      | checkpoint S complete                                                |

The hooks wrap flowrl's own functions (they never replace the write itself), so the files the
kill leaves are exactly those a kill at that instant leaves. Exit status: that of `flowrl train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("log-jsonl", "log-csv", "before-save", "payload", "payload-renamed", "metadata", "prune",
          "after-save")

# Small enough to compile in seconds and to make many checkpoints per second of training. RLPD is
# used because its update has no host callback (diffrax's error checks in QAM's SDE solve have
# one), so JAX's persistent compilation cache can serve the repeated compiles of the trials; the
# driver, checkpoint and log code under test is the same for every extractor.
TINY = [
    "train.extractor=@rlpd()",
    "rlpd.hidden_dims=(8,)",
    "flowrl.AgentConfig.actor_hidden_dims=(8,)",
    "flowrl.AgentConfig.critic_hidden_dims=(8,)",
    "flowrl.AgentConfig.num_critics=2",
    "flowrl.AgentConfig.batch_size=4",
    "flowrl.AgentConfig.horizon=2",
    "train.offline_steps=200",
    "train.steps_per_call=10",
    "train.log_interval=10",
    "train.save_interval=20",
    "train.keep_checkpoints=2",
    "train.eval_interval=100",
    "train.eval_episodes=1",
    "train.eval_num_envs=1",
    "train.eval_max_episode_steps=4",
]
CONFIG = "qam/cube-double-play.gin"


_REAL_REPLACE = os.replace  # the metadata hook patches os.replace


def _pause(marker: Path, text: str) -> None:
    """Say where we are (atomically: the test polls for the file), then wait for the SIGKILL."""
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(text)
    _REAL_REPLACE(tmp, marker)
    while True:
        time.sleep(60)


def install_hooks(phase: str | None, count: int, marker: Path | None, started: Path | None,
                  hashes: Path | None = None) -> None:
    import flowrl.checkpoint as checkpoint
    import flowrl.metrics_log as metrics_log
    import flowrl.train as train_module

    saves = {"n": 0, "step": -1}
    logs = {"n": 0}

    def armed(name: str) -> bool:
        return phase == name and marker is not None

    real_log = metrics_log.MetricsLogger.log

    def log(self, record, *, kind="train"):
        if kind == "train":
            logs["n"] += 1
            if armed("log-jsonl") or armed("log-csv"):
                if logs["n"] == count:
                    # Put the files in the state of a kill in the middle of this row's write.
                    row = metrics_log._normalise(record)
                    files = self._kinds.get(kind) or self._open_kind(kind)
                    line = metrics_log._json_line(row)
                    if phase == "log-jsonl":
                        files.jsonl.write(line[: len(line) // 2])
                    else:
                        files.jsonl.write(line)
                        columns = files.columns or list(row)
                        csv_text = metrics_log._csv_lines(columns, [row])
                        if not files.columns:  # the first row of a file comes with its header
                            csv_text = metrics_log._csv_lines(columns, None) + csv_text
                        files.csv.write(csv_text[: len(csv_text) // 2])
                    files.jsonl.flush()
                    files.csv.flush()
                    _pause(marker, f"{phase} step {row['step']}")
        real_log(self, record, kind=kind)
        if kind == "train" and started is not None and logs["n"] == 1:
            started.write_text("training")

    metrics_log.MetricsLogger.log = log

    real_save = train_module.save_checkpoint

    def save(directory, step, tree, **kwargs):
        saves["n"] += 1
        saves["step"] = step
        if armed("before-save") and saves["n"] == count:
            _pause(marker, f"before-save step {step}")
        path = real_save(directory, step, tree, **kwargs)
        if hashes is not None:
            meta = json.loads(Path(path).with_suffix(".json").read_text())
            with open(hashes, "a") as f:
                f.write(f"{step} {meta['payload_sha256']}\n")
        if armed("after-save") and saves["n"] == count:
            _pause(marker, f"after-save step {step}")
        return path

    train_module.save_checkpoint = save

    def this_save(name: str) -> bool:
        return armed(name) and saves["n"] == count

    real_writer_write = checkpoint._HashingWriter.write

    def writer_write(self, data):
        written = real_writer_write(self, data)
        if this_save("payload") and self.size > 512:
            self._file.flush()
            os.fsync(self._file.fileno())
            _pause(marker, f"payload step {saves['step']} after {self.size} bytes")
        return written

    checkpoint._HashingWriter.write = writer_write

    real_write_payload = checkpoint._write_payload

    def write_payload(payload_path, tree):
        result = real_write_payload(payload_path, tree)
        if this_save("payload-renamed"):
            _pause(marker, f"payload-renamed step {saves['step']}")
        return result

    checkpoint._write_payload = write_payload

    real_atomic = checkpoint.atomic_write_bytes

    def atomic_write_bytes(path, data):
        if this_save("metadata"):
            real_replace = os.replace

            def replace_then_never(src, dst):
                # The temp file is complete and fsynced; the kill lands before the rename.
                _pause(marker, f"metadata step {saves['step']} before rename of {Path(src).name}")
                real_replace(src, dst)

            os.replace = replace_then_never
        return real_atomic(path, data)

    checkpoint.atomic_write_bytes = atomic_write_bytes

    real_prune = checkpoint._prune
    real_remove = checkpoint.remove_if_exists
    pruning = {"on": False}

    def remove_if_exists(path):
        real_remove(path)
        if pruning["on"] and this_save("prune"):
            _pause(marker, f"prune step {saves['step']} after removing {Path(path).name}")

    def prune(directory, saved_step, keep):
        pruning["on"] = True
        try:
            real_prune(directory, saved_step, keep)
        finally:
            pruning["on"] = False

    checkpoint.remove_if_exists = remove_if_exists
    checkpoint._prune = prune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--jax-cache", help="persistent compilation cache directory")
    parser.add_argument("--started", type=Path)
    parser.add_argument("--pause", help="PHASE:K")
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--hashes", type=Path, help="append 'step sha256' of every checkpoint saved")
    parser.add_argument("--bind", action="append", default=[])
    args = parser.parse_args(argv)

    os.environ.setdefault("MUJOCO_GL", "egl")
    sys.path.insert(0, str(REPO))
    import jax

    if args.jax_cache:
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    phase, count = None, 0
    if args.pause:
        phase, _, k = args.pause.partition(":")
        if phase not in PHASES or not k.isdigit() or args.marker is None:
            parser.error(f"--pause wants PHASE:K with PHASE in {PHASES} and --marker")
        count = int(k)
    install_hooks(phase, count, args.marker, args.started, args.hashes)

    import flowrl.plot
    from flowrl.cli import main as flowrl_main

    # The success plot drawn after a finished run is not part of what the trials check and costs
    # about a second of matplotlib per process.
    flowrl.plot.plot_runs = lambda runs, out, **kwargs: None

    cli_args = ["train", CONFIG, "--out", args.out, "--no-progress"]
    if args.resume:
        cli_args.append("--resume")
    for binding in [*TINY, f"train.data_dir='{args.data}'", *args.bind]:
        cli_args += ["--bind", binding]
    return flowrl_main(cli_args)


if __name__ == "__main__":
    sys.exit(main())
