"""SIGKILL trials: an offline run killed anywhere and resumed with `--resume` loses nothing.

One uninterrupted reference run, then kill/resume trials of the same run (tests/crash_runner.py,
the real `flowrl train` command line in a subprocess with tiny networks):

- kills at random wall-clock delays (seeded RNG) after random points of the run (a checkpoint,
  the first logged record, the launch, the run directory's creation);
- kills landing at chosen instants inside checkpoint writes and log writes (the runner pauses
  there and says so; the test then sends SIGKILL), see the phase table in crash_runner.py;
- double kills (the resumed run is killed again, then resumed);
- kills followed by damage to the newest checkpoint (truncated payload, altered byte, garbage
  metadata): the resume must warn naming the damaged file and the one used instead.

After every kill, every checkpoint on disk must verify (its payload's size and sha256 equal its
metadata's). After the final resume, the final checkpoint's payload must be byte-identical to the
reference run's (every parameter, optimiser moment, target network and the step counter, bit for
bit, on CPU), and the train/eval JSONL and CSV logs must hold exactly the reference's rows (no
duplicate, no missing row; wall-clock timing columns excluded, they differ between any two runs).

Speed: JAX's persistent compilation cache (a temp directory) serves the repeated compiles of the
trials, and two trials run at a time.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowrl.checkpoint import list_checkpoints
from flowrl.metrics_log import read_metrics
from flowrl.ogbench import generate_dataset

REPO = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("crash_runner.py")
FINAL_STEP = 200
SAVES = 10  # save_interval 20 up to 200
TRAIN_RECORDS = 20  # log_interval 10
PROCESS_TIMEOUT = 300.0
SEED = 20260401


@dataclasses.dataclass(frozen=True)
class Kill:
    """Where one SIGKILL lands: at a runner phase (its K-th occurrence), or a random delay after
    an anchor: 'launch', 'run.json' (the run directory exists), or 'save' (the K-th checkpoint of
    this process is on disk; K = 0: the first train record is logged)."""

    phase: str | None = None
    count: int = 0
    anchor: str = ""
    delay: float = 0.0

    def describe(self) -> str:
        if self.phase:
            return f"{self.phase}:{self.count}"
        origin = f"save {self.count}" if self.anchor == "save" else self.anchor
        return f"+{self.delay * 1000:.0f} ms after {origin}"


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    kills: tuple[Kill, ...]
    damage: str | None = None  # damage to the newest checkpoint before the last resume


@dataclasses.dataclass
class Outcome:
    trial: Trial
    kills_landed: int = 0
    kill_states: list[str] = dataclasses.field(default_factory=list)
    resumed_from: int = 0
    identical: bool = False
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# Processes


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MUJOCO_GL", "egl")
    env["PYTHONWARNINGS"] = "default"
    return env


def _spawn(workdir: Path, tag: str, run: Path, data: Path, cache: Path, *, resume: bool,
           pause: str | None = None, marker: Path | None = None,
           started: Path | None = None) -> tuple[subprocess.Popen, Path]:
    args = [sys.executable, str(RUNNER), "--out", str(run), "--data", str(data), "--jax-cache", str(cache),
            "--hashes", str(workdir / "hashes.txt")]
    if resume:
        args.append("--resume")
    if pause:
        args += ["--pause", pause, "--marker", str(marker)]
    if started:
        args += ["--started", str(started)]
    log = workdir / f"{tag}.log"
    with open(log, "wb") as out:
        # A new session: the SIGKILL goes to this process group (the run and any eval worker).
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=_env(),
                                cwd=workdir, start_new_session=True)
    return proc, log


def _sigkill(proc: subprocess.Popen) -> bool:
    """SIGKILL the run's process group; False if it had already exited."""
    if proc.poll() is not None:
        return False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    proc.wait(timeout=30)
    return proc.returncode == -signal.SIGKILL


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = PROCESS_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return path.exists()
        time.sleep(0.003)
    return True


def _finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=PROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        _sigkill(proc)
        raise AssertionError(f"run timed out; output:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{text[-3000:]}"
    return text


# ---------------------------------------------------------------------------------------------
# Checks


def _verified_steps(checkpoints: Path) -> list[int]:
    """Steps of the checkpoints on disk; AssertionError if any of them does not verify.

    A checkpoint exists iff its metadata file does; its payload must then have the recorded size
    and sha256 (a payload without metadata, or a temp file, is not a checkpoint).
    """
    steps = []
    for meta_path in sorted(checkpoints.glob("step_*.json")):
        meta = json.loads(meta_path.read_text())  # a kill must never leave half a metadata file
        payload = (checkpoints / meta["payload"]).read_bytes()
        assert len(payload) == meta["payload_bytes"], f"{meta_path}: payload truncated after a kill"
        assert hashlib.sha256(payload).hexdigest() == meta["payload_sha256"], f"{meta_path}: payload altered"
        steps.append(int(meta["step"]))
    assert steps == [c.step for c in list_checkpoints(checkpoints)]
    return steps


def _timeless(records: list[dict]) -> list[dict]:
    """Records without wall-clock measurements (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if not (k.startswith("time/") or "second" in k)} for r in records]


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return _timeless(list(csv.DictReader(f)))


def _logs(run: Path) -> dict[str, list[dict]]:
    logs = {}
    for kind in ("train", "eval"):
        jsonl = run / "logs" / f"{kind}.jsonl"
        text = jsonl.read_text()
        assert text.endswith("\n"), f"{jsonl} ends with a partial line"
        records = read_metrics(jsonl)
        steps = [r["step"] for r in records]
        assert steps == sorted(set(steps)), f"{jsonl}: duplicated or unordered steps {steps}"
        logs[f"{kind}.jsonl"] = _timeless(records)
        logs[f"{kind}.csv"] = _csv_rows(run / "logs" / f"{kind}.csv")
    return logs


def _saved_hashes(workdir: Path) -> list[tuple[int, str]]:
    """(step, payload sha256) of every checkpoint the processes in `workdir` saved, in order."""
    path = workdir / "hashes.txt"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(int(step), sha) for step, sha in (line.split() for line in lines if line.count(" ") == 1)]


def _final_payload(run: Path) -> bytes:
    return (run / "checkpoints" / f"step_{FINAL_STEP:09d}.eqx").read_bytes()


def _damage(checkpoints: Path, how: str) -> tuple[str, str]:
    """Damage the newest checkpoint; (damaged file name, payload name that should be used)."""
    metas = sorted(checkpoints.glob("step_*.json"))
    assert len(metas) >= 2, "damage trials need an older good checkpoint"
    newest, previous = metas[-1], metas[-2]
    payload = newest.with_suffix(".eqx")
    if how == "truncate":
        data = payload.read_bytes()
        payload.write_bytes(data[: len(data) // 2])
        bad = payload.name
    elif how == "flip":
        data = bytearray(payload.read_bytes())
        data[len(data) // 2] ^= 0x01
        payload.write_bytes(bytes(data))
        bad = payload.name
    elif how == "metadata":
        newest.write_text('{"format": "flowrl-checkpoint", "step": ')
        bad = newest.name
    else:
        raise ValueError(how)
    return bad, previous.with_suffix(".eqx").name


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("crash-data")
    generate_dataset("cube-double-play", episodes=3, workers=1, directory=directory, seed=0,
                     max_episode_steps=61, progress=False)
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted run (it also fills the compilation cache), and its timings."""
    work = tmp_path_factory.mktemp("crash-reference")
    cache = work / "jax-cache"
    run = work / "run"
    started = work / "started"
    launch = time.monotonic()
    proc, log = _spawn(work, "reference", run, data_dir, cache, resume=False, started=started)
    assert _wait_for(started, proc), log.read_text()[-3000:]
    t_started = time.monotonic() - launch
    _finish(proc, log)
    t_total = time.monotonic() - launch
    # Warm the cache with what only a resume compiles, so no trial is killed mid cache write.
    proc, log = _spawn(work, "reference-resume", run, data_dir, cache, resume=True)
    _finish(proc, log)
    assert _verified_steps(run / "checkpoints") == [FINAL_STEP - 20, FINAL_STEP]
    hashes = dict(_saved_hashes(work))
    assert sorted(hashes) == list(range(20, FINAL_STEP + 1, 20))
    return {
        "run": run, "cache": cache, "payload": _final_payload(run), "logs": _logs(run), "hashes": hashes,
        "startup_seconds": t_started, "training_seconds": t_total - t_started,
    }


def _trials() -> list[Trial]:
    rng = random.Random(SEED)
    trials = []
    # Random instants while training: a random delay after a random checkpoint (or after the
    # first train record), so the kill lands anywhere in the chunks, logging, evaluation and
    # checkpoint writes that follow, however fast the machine is.
    for i in range(8):
        kill = Kill(anchor="save", count=rng.randint(0, SAVES - 1), delay=rng.uniform(0.0, 0.15))
        trials.append(Trial(f"random-train-{i}", (kill,)))
    # Random instants during start-up (imports and dataset; run directory, init and compile).
    trials.append(Trial("random-launch", (Kill(anchor="launch", delay=rng.uniform(0.0, 1.5)),)))
    trials.append(Trial("random-run-dir", (Kill(anchor="run.json", delay=rng.uniform(0.0, 1.0)),)))
    # Every phase of a log row and checkpoint write, at a random occurrence.
    for phase in ("log-jsonl", "log-csv", "before-save", "payload", "payload-renamed", "metadata",
                  "prune", "after-save"):
        for i in range(2 if phase in ("payload", "metadata") else 1):
            if phase.startswith("log"):
                count = rng.randint(1, TRAIN_RECORDS)
            else:
                count = rng.randint(3 if phase == "prune" else 1, SAVES)
            trials.append(Trial(f"{phase}-{i}", (Kill(phase, count),)))
    # Killed again while resuming from the first kill.
    for first, second in [("payload", "metadata"), ("log-jsonl", "prune")]:
        trials.append(Trial(f"double-{first}-{second}", (
            Kill(first, rng.randint(1, 4) if not first.startswith("log") else rng.randint(1, 8)),
            Kill(second, rng.randint(3, 5)),
        )))
    # The newest checkpoint damaged after the kill: the resume falls back to the previous one.
    for how in ("truncate", "flip", "metadata"):
        trials.append(Trial(f"damaged-{how}", (Kill("after-save", rng.randint(2, SAVES)),), damage=how))
    return trials


def _wait_for_saves(workdir: Path, already: int, count: int, proc: subprocess.Popen) -> bool:
    """Wait until this process has saved `count` checkpoints (0: logged its first record)."""
    deadline = time.monotonic() + PROCESS_TIMEOUT
    while len(_saved_hashes(workdir)) < already + count:
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.003)
    return True


def _run_trial(trial: Trial, root: Path, data: Path, ref: dict) -> Outcome:
    trial_start = time.monotonic()
    work = root / trial.name
    work.mkdir()
    run = work / "run"
    outcome = Outcome(trial)
    resume = False
    for index, kill in enumerate(trial.kills):
        marker = work / f"marker-{index}"
        started = work / f"started-{index}"
        saved_before = len(_saved_hashes(work))
        proc, log = _spawn(work, f"killed-{index}", run, data, ref["cache"], resume=resume,
                           pause=f"{kill.phase}:{kill.count}" if kill.phase else None,
                           marker=marker, started=started)
        if kill.phase:
            assert _wait_for(marker, proc), f"{trial.name}: phase never reached:\n{log.read_text()[-3000:]}"
            where = marker.read_text()
        else:
            if kill.anchor == "run.json":
                assert _wait_for(run / "run.json", proc), log.read_text()[-3000:]
            elif kill.anchor == "save":
                assert _wait_for(started, proc), log.read_text()[-3000:]
                assert _wait_for_saves(work, saved_before, kill.count, proc), log.read_text()[-3000:]
            time.sleep(kill.delay)
            where = kill.describe()
        steps = []
        if _sigkill(proc):
            outcome.kills_landed += 1
            steps = _verified_steps(run / "checkpoints") if (run / "checkpoints").is_dir() else []
            outcome.kill_states.append(f"{where} (checkpoints on disk: {steps})")
        else:
            outcome.kill_states.append(f"{where}: the run had already finished")
        resume = True

    expected_warning = None
    if trial.damage:
        expected_warning = _damage(run / "checkpoints", trial.damage)
        steps = steps[:-1]
    proc, log = _spawn(work, "resumed", run, data, ref["cache"], resume=True)
    text = _finish(proc, log)
    # The resume starts from the newest checkpoint that verifies (none: from step 0).
    resumed = re.search(r"resuming .* from step (\d+)", text)
    outcome.resumed_from = int(resumed.group(1)) if resumed else 0
    if outcome.kills_landed:
        assert outcome.resumed_from == (steps[-1] if steps else 0), (trial.name, steps, text[-2000:])
    if expected_warning:
        bad, used = expected_warning
        warning = next((line for line in text.splitlines() if "skipping unusable checkpoint" in line), "")
        assert bad in warning and f"resuming from" in warning and used in warning, (
            f"{trial.name}: expected a fallback warning naming {bad} and {used}, got:\n{text[-3000:]}")
    else:
        assert "unusable checkpoint" not in text, f"{trial.name}: unexpected fallback:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]

    assert _verified_steps(run / "checkpoints")[-1] == FINAL_STEP
    assert _final_payload(run) == ref["payload"], f"{trial.name}: final parameters differ from the reference"
    # Every checkpoint any process of the trial wrote (before or after a kill) is the reference's.
    for step, sha in _saved_hashes(work):
        assert sha == ref["hashes"][step], f"{trial.name}: checkpoint of step {step} differs from the reference"
    outcome.seconds = time.monotonic() - trial_start
    logs = _logs(run)
    for name, expected in ref["logs"].items():
        assert logs[name] == expected, f"{trial.name}: {name} differs from the uninterrupted run"
    outcome.identical = True
    return outcome


@pytest.mark.slow  # about 2 minutes on 2 cores (50 short subprocesses, two at a time)
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path, data_dir, reference):
    trials = _trials()
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_run_trial, t, tmp_path, data_dir, reference) for t in trials]
        outcomes = [f.result() for f in futures]
    kills = sum(o.kills_landed for o in outcomes)
    identical = sum(o.identical for o in outcomes)
    print(f"\nreference: start-up {reference['startup_seconds']:.1f}s, training {reference['training_seconds']:.1f}s")
    print(f"crash trials: {len(outcomes)} trials, {kills} SIGKILLs landed, {identical} resumed "
          f"bit-identically, {time.monotonic() - start:.1f}s")
    for o in outcomes:
        print(f"  {o.trial.name} ({o.seconds:.1f}s): {' | '.join(o.kill_states)} -> resumed from step "
              f"{o.resumed_from}")
    assert identical == len(trials) >= 20
    assert kills >= 20
    # The deterministic phases always land, so at least the write-phase kills happened.
    assert all(o.kills_landed == len(o.trial.kills) for o in outcomes if all(k.phase for k in o.trial.kills))
