"""`flowrl sweep`: spec validation, grid expansion and hashing, skip/resume/retry, cost estimate, and a
real local Ray instance running a tiny sweep (2 methods × 1 task × 2 seeds) whose first attempt of one
cell is killed mid-run, retried, resumed from its checkpoint; a rerun runs nothing; a report is built
from the result and its numbers match the run logs.

The Ray test takes about 1–2 minutes on a 2-core CPU (tiny networks, 200 updates per seed).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from flowrl import sweep
from flowrl.cli import main
from flowrl.errors import ConfigError, DatasetError

# A small object store: Ray otherwise reserves ~30% of RAM, which the parallel test workers need.
RAY_TEST_INIT = {"num_cpus": 2, "log_to_driver": False, "object_store_memory": 200 * 1024**2}
REPO = Path(__file__).resolve().parents[1]
ENV = "cube-double-play-singletask-task2-v0"

TINY = [
    "flowrl.AgentConfig.actor_hidden_dims = (32, 32)",
    "flowrl.AgentConfig.critic_hidden_dims = (32, 32)",
    "flowrl.AgentConfig.num_critics = 2",
    "flowrl.AgentConfig.batch_size = 16",
    "train.offline_steps = 200",
    "train.steps_per_call = 50",
    "train.log_interval = 50",
    "train.eval_interval = 100",
    "train.save_interval = 100",
    "train.eval_episodes = 2",
    "train.eval_max_episode_steps = 30",
]


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_spec(tmp_path: Path, data_dir: Path | str, *, retries: int = 1, seeds: str = "[0, 1]") -> Path:
    bindings = "\n".join(f'  - "{b}"' for b in [*TINY, f"train.data_dir = '{data_dir}'"])
    return write_spec(tmp_path / "tiny.yaml", f"""
name: tiny
methods: [qam, fql]
domains: [cube-double-play]
tasks: [2]
seeds: {seeds}
bindings:
{bindings}
method_bindings:
  qam: ["qam.hidden_dims = (32, 32)", "qam.flow_steps = 4"]
  fql: ["fql.hidden_dims = (32, 32)"]
resources: {{cpus: 1, gpus: 0}}
retries: {retries}
""")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# Spec validation: one line naming the file, the key and the fix


@pytest.mark.parametrize(("text", "expected"), [
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\n", "key 'seeds': missing"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: 2\nseed: 3\n", "key 'seed': unknown key"),
    ("methods: qam fql\ndomains: [scene-play]\ntasks: [1]\nseeds: 2\n", "key 'methods': 'qam fql' is not a plain name"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [0]\nseeds: 2\n", "key 'tasks': value 0 < 1"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: [1, 1]\n", "key 'seeds': contains duplicates"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: 2\nmethod_bindings: {fql: []}\n",
     "key 'method_bindings.fql'"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: 2\nresources: {cpus: -1}\n",
     "key 'resources.cpus': -1 is not a number >= 0"),
    ("methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: 2\nconfig: 'qam.gin'\n", "key 'config'"),
    ("methods: [qam\n", "not valid YAML"),
    ("- just a list\n", "a sweep spec is a YAML mapping"),
])
def test_bad_spec_is_one_line_naming_file_and_key(tmp_path, capsys, text, expected):
    path = write_spec(tmp_path / "bad.yaml", text)
    with pytest.raises(sweep.SweepSpecError) as info:
        sweep.load_spec(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert main(["sweep", str(path), "--dry-run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowrl: error:")]
    assert len(errors) == 1 and expected in errors[0]


def test_bad_gin_in_a_cell_names_the_cell(tmp_path):
    path = write_spec(tmp_path / "s.yaml", "methods: [qam]\ndomains: [scene-play]\ntasks: [1]\nseeds: 1\n"
                                           "bindings: ['qam.no_such_knob = 3']\n")
    with pytest.raises(ConfigError) as info:
        sweep.expand_cells(sweep.load_spec(path), tmp_path / "runs")
    assert "method=qam, domain=scene-play, task=1" in str(info.value) and "no_such_knob" in str(info.value)


def test_unknown_method_config_file_is_reported(tmp_path):
    path = write_spec(tmp_path / "s.yaml", "methods: [qamm]\ndomains: [scene-play]\ntasks: [1]\nseeds: 1\n")
    with pytest.raises(ConfigError, match=r"method=qamm.*qamm/scene-play.gin not found"):
        sweep.expand_cells(sweep.load_spec(path), tmp_path / "runs")


# --------------------------------------------------------------------------------------------
# Grid expansion, hashing, subsets


def test_grid_expansion_hash_and_layout(tmp_path):
    path = write_spec(tmp_path / "s.yaml", """
methods: [qam, fql]
domains: [scene-play, cube-double-play]
tasks: [1, 3]
seeds: '0-2'
variants: {default: [], lowlr: ['flowrl.AgentConfig.learning_rate = 1e-4']}
""")
    spec = sweep.load_spec(path)
    assert spec.seeds == (0, 1, 2) and spec.name == "s"
    cells = sweep.expand_cells(spec, tmp_path / "runs")
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.config_hash for c in cells}) == 16  # every cell's config differs (method/env/variant)
    cell = cells[0]
    assert (cell.method, cell.domain, cell.task, cell.variant) == ("qam", "scene-play", 1, "default")
    assert cell.env_name == "scene-play-singletask-task1-v0" and cell.steps == 1_000_000
    assert cell.directory == (tmp_path / "runs" / "qam" / cell.env_name / f"default-{cell.config_hash[:12]}")
    assert cell.seed_dir(2).name == "seed2"
    # The hash is the sha256 of the parsed config: the same spec gives the same directories...
    again = sweep.expand_cells(sweep.load_spec(path), tmp_path / "runs")
    assert [c.directory for c in again] == [c.directory for c in cells]
    # ...and it is the text `flowrl train` would fingerprint, seeds excluded.
    from flowrl.cli import parse_gin

    text = parse_gin(["qam/scene-play.gin"], [f"train.env_name = '{cell.env_name}'"])
    assert sweep.config_fingerprint(text) == cell.config_hash
    # Changing one binding changes only the cells it touches.
    path.write_text(path.read_text().replace("1e-4", "2e-4"))
    changed = sweep.expand_cells(sweep.load_spec(path), tmp_path / "runs")
    moved = [a.variant for a, b in zip(cells, changed, strict=True) if a.config_hash != b.config_hash]
    assert moved == ["lowlr"] * 8


def test_subset(tmp_path):
    spec = sweep.load_spec(REPO / "experiments" / "paper" / "grid.yaml")
    small = sweep.apply_subset(spec, ["methods=fql,qam", "domains=scene-play", "seeds=0-3", "tasks=2"])
    assert small.methods == ("qam", "fql")  # spec order kept
    assert small.domains == ("scene-play",) and small.seeds == (0, 1, 2, 3) and small.tasks == (2,)
    with pytest.raises(sweep.SweepSpecError, match=r"'qamm' is not in .*grid.yaml's methods"):
        sweep.apply_subset(spec, ["methods=qamm"])
    with pytest.raises(sweep.SweepSpecError, match="KEY=V1,V2"):
        sweep.apply_subset(spec, ["colour=red"])
    with pytest.raises(sweep.SweepSpecError, match="12"):
        sweep.apply_subset(spec, ["seeds=12"])


def test_paper_grid_dry_run_cost(capsys):
    """The paper grid: 17 methods × 10 domains × 5 tasks × 12 seeds; cost from the measured CPU table."""
    spec = sweep.load_spec(REPO / "experiments" / "paper" / "grid.yaml")
    assert (len(spec.methods), len(spec.domains), len(spec.tasks), len(spec.seeds)) == (17, 10, 5, 12)
    assert main(["sweep", str(REPO / "experiments/paper/grid.yaml"), "--dry-run", "--out", "/nonexistent/runs",
                 "--subset", "methods=qam,fql", "--subset", "domains=scene-play"]) == 0
    out = capsys.readouterr().out
    assert "10 cells, 120 runs (180,000,000 updates)" in out
    # By hand: 60 QAM runs × (1M offline + 500K online) updates × 0.429 CPU-s + 60 FQL runs × 1.5M × 0.287 CPU-s
    # = 10,725 + 7,175 = 17,900 CPU-h.
    assert "estimated CPU cost, whole grid: 17,900 CPU-core-hours" in out
    assert "estimated GPU cost, whole grid: unknown" in out
    # RLPD runs online only (500K steps): 60 runs × 500K × 0.279 CPU-s = 2,325 CPU-h.
    assert main(["sweep", str(REPO / "experiments/paper/grid.yaml"), "--dry-run", "--out", "/nonexistent/runs",
                 "--subset", "methods=rlpd", "--subset", "domains=scene-play"]) == 0
    out = capsys.readouterr().out
    assert "5 cells, 60 runs (30,000,000 updates)" in out and "whole grid: 2,325 CPU-core-hours" in out


def test_cost_table_from_a_bench_file(tmp_path):
    bench = {"device": "gpu:H100", "command": "flowrl bench", "extractors": [
        {"extractor": "qam", "cpu_seconds_per_update": 0.01, "ms_per_update": 4.0}]}
    (tmp_path / "gpu.json").write_text(json.dumps(bench))
    tables = sweep.load_cost_tables([tmp_path / "gpu.json"])
    assert tables["gpu"].seconds_per_update == {"qam": 0.004} and tables["cpu"].seconds_per_update["qam"] == 0.429
    cell = sweep.Cell("qam", "scene-play", 1, "default", "scene-play-singletask-task1-v0", (), (), (0, 1, 2),
                      "0" * 64, 900_000, tmp_path / "nowhere")
    cost = sweep.estimate_cost([cell], tables)
    assert cost["gpu_hours"] == pytest.approx(3 * 900_000 * 0.004 / 3600)
    assert cost["cpu_hours"] == pytest.approx(3 * 900_000 * 0.429 / 3600)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(sweep.SweepSpecError, match="bad.json: not a cost table"):
        sweep.load_cost_tables([tmp_path / "bad.json"])


def test_worker_env_sizes_jax_to_the_request(monkeypatch):
    monkeypatch.delenv("FLOWRL_DATA_DIR", raising=False)
    assert sweep.worker_env(1, 0)["JAX_PLATFORMS"] == "cpu"
    assert sweep.worker_env(1, 0.25)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
    assert sweep.worker_env(2, 1)["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.900"
    assert "JAX_PLATFORMS" not in sweep.worker_env(1, 0.5)
    monkeypatch.setenv("FLOWRL_DATA_DIR", "/data/ogbench")
    assert sweep.worker_env(1, 0)["FLOWRL_DATA_DIR"] == "/data/ogbench"


# --------------------------------------------------------------------------------------------
# Skip / resume / retry with the serial engine (training replaced by a recorder: spec logic only)


def test_serial_engine_skips_done_retries_failures(tmp_path, monkeypatch):
    spec = sweep.load_spec(tiny_spec(tmp_path, tmp_path / "no-data", retries=2, seeds="[0, 1, 2]"))
    calls: list[tuple[str, list[int]]] = []
    failures = {"qam": 2}  # qam fails twice with an ordinary exception, then succeeds

    def fake_train(run_dirs, seeds, config_text):
        method = Path(run_dirs[0]).parts[-4]
        calls.append((method, list(seeds)))
        if failures.get(method):
            failures[method] -= 1
            raise RuntimeError("worker hiccup")
        for run_dir in run_dirs:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        return [{"final_step": 200, "start_step": 0, "success": 0.5, "train_seconds": 1.0} for _ in seeds]

    monkeypatch.setattr(sweep, "_train_seeds", fake_train)
    out = tmp_path / "runs"
    # fql seed 1 is already done: only seeds 0 and 2 of fql run.
    fql_cell = next(c for c in sweep.expand_cells(spec, out) if c.method == "fql")
    fql_cell.seed_dir(1).mkdir(parents=True)
    (fql_cell.seed_dir(1) / sweep.DONE_FILE).write_text("{}")
    summary = sweep.run_sweep(spec, out, engine="serial", log=lambda _: None)
    assert calls == [("qam", [0, 1, 2])] * 3 + [("fql", [0, 2])]
    assert summary["counts"] == {"skipped": 0, "ran": 2, "failed": 0, "pending": 0}
    qam_cell = next(c for c in sweep.expand_cells(spec, out) if c.method == "qam")
    assert json.loads((qam_cell.directory / sweep.ATTEMPTS_FILE).read_text()) == {"attempts": 3}
    assert json.loads((qam_cell.seed_dir(2) / sweep.DONE_FILE).read_text())["attempt"] == 3
    cell_json = json.loads((qam_cell.directory / sweep.CELL_FILE).read_text())
    assert cell_json["method"] == "qam" and cell_json["seeds"] == [0, 1, 2] and cell_json["spec_name"] == "tiny"
    assert json.loads((out / sweep.SWEEP_FILE).read_text())["counts"]["ran"] == 2

    # A second invocation finds everything done and calls nothing.
    calls.clear()
    summary = sweep.run_sweep(spec, out, engine="serial", log=lambda _: None)
    assert calls == [] and summary["counts"]["skipped"] == 2 and summary["counts"]["ran"] == 0


def test_serial_engine_does_not_retry_user_errors(tmp_path, monkeypatch):
    spec = sweep.load_spec(tiny_spec(tmp_path, tmp_path / "no-data", retries=3))
    calls = []

    def fake_train(run_dirs, seeds, config_text):
        calls.append(seeds)
        raise DatasetError("dataset /x/y.npz missing; run flowrl data generate")

    monkeypatch.setattr(sweep, "_train_seeds", fake_train)
    summary = sweep.run_sweep(spec, tmp_path / "runs", engine="serial", log=lambda _: None)
    assert len(calls) == 2  # one attempt per cell: a user error would fail again
    assert summary["counts"]["failed"] == 2
    assert all(c["error"].startswith("DatasetError: dataset /x/y.npz missing") for c in summary["cells"])


# --------------------------------------------------------------------------------------------
# A real local Ray instance


def kill_after_first_checkpoint(payload: dict, attempt: int) -> None:
    """FLOWRL_SWEEP_HOOK for the Ray test: qam's first attempt dies right after its first checkpoint."""
    if payload["method"] != "qam" or attempt != 1:
        return
    import flowrl.train as train_module

    real_save = train_module.save_checkpoint

    def save_then_die(directory, step, tree, **kwargs):
        path = real_save(directory, step, tree, **kwargs)
        os._exit(17)  # the worker process dies: Ray sees a system failure, not an exception
        return path

    train_module.save_checkpoint = save_then_die


def always_kill_qam(payload: dict, attempt: int) -> None:
    """FLOWRL_SWEEP_HOOK: every attempt of qam's cell dies before training."""
    if payload["method"] == "qam":
        os._exit(9)


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_ray_retries_exhausted_and_user_errors(tmp_path, monkeypatch):
    """A cell whose worker always dies fails after 1 + retries attempts; a user error fails at once."""
    pytest.importorskip("ray")
    monkeypatch.setenv(sweep.HOOK_ENV, "tests.test_sweep:always_kill_qam")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    spec = sweep.load_spec(tiny_spec(tmp_path, tmp_path / "no-data", retries=1, seeds="[0]"))
    summary = sweep.run_sweep(spec, tmp_path / "runs", engine="ray", max_parallel=1, log=lambda _: None,
                              ray_init_kwargs=RAY_TEST_INIT)
    cells = {c["method"]: c for c in summary["cells"]}
    assert summary["counts"]["failed"] == 2
    assert cells["qam"]["attempts"] == 2 and cells["qam"]["error"].startswith("WorkerCrashedError")
    assert cells["fql"]["attempts"] == 1 and cells["fql"]["error"].startswith("DatasetError: dataset file")
    assert str(tmp_path / "no-data") in cells["fql"]["error"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from flowrl.ogbench import generate_dataset

    directory = tmp_path_factory.mktemp("ogbench-data")
    generate_dataset("cube-double-play", episodes=3, workers=1, directory=directory, seed=0,
                     max_episode_steps=61, progress=False)
    return directory


@pytest.mark.slow  # about 80 s wall on 2 cores: a real local Ray instance trains 4 tiny runs
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # ray.init starts its processes
def test_ray_sweep_kill_retry_rerun_and_report(tmp_path, data_dir, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.setenv(sweep.HOOK_ENV, "tests.test_sweep:kill_after_first_checkpoint")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    spec = sweep.load_spec(tiny_spec(tmp_path, data_dir, retries=1))
    out = tmp_path / "runs"
    start = time.perf_counter()
    summary = sweep.run_sweep(spec, out, engine="ray", ray_init_kwargs=RAY_TEST_INIT)
    wall = time.perf_counter() - start
    print(f"tiny Ray sweep wall time: {wall:.1f} s")
    assert summary["counts"] == {"skipped": 0, "ran": 2, "failed": 0, "pending": 0}, summary

    cells = {c.method: c for c in sweep.expand_cells(spec, out)}
    # qam was killed once and retried by Ray; fql ran once.
    assert json.loads((cells["qam"].directory / sweep.ATTEMPTS_FILE).read_text())["attempts"] == 2
    assert json.loads((cells["fql"].directory / sweep.ATTEMPTS_FILE).read_text())["attempts"] == 1
    qam_done = [json.loads((cells["qam"].seed_dir(s) / sweep.DONE_FILE).read_text()) for s in (0, 1)]
    assert all(d["attempt"] == 2 and d["final_step"] == 200 for d in qam_done)
    assert any(d["start_step"] == 100 for d in qam_done), "the retried cell did not resume from its checkpoint"
    for cell in cells.values():
        for seed in (0, 1):
            rows = read_csv(cell.seed_dir(seed) / "logs" / "eval.csv")
            assert [int(r["step"]) for r in rows] == [100, 200]  # resumed logs: no duplicate rows

    # A second invocation finds everything done and runs nothing (Ray is not even started).
    calls = []
    monkeypatch.setattr(sweep, "_ray_engine", lambda *a, **k: calls.append(a))
    again = sweep.run_sweep(spec, out, engine="ray")
    assert calls == [] and again["counts"]["skipped"] == 2 and again["counts"]["ran"] == 0

    # The report is built from these runs and its numbers are the logged ones.
    from flowrl.report import build_report

    report = build_report(out, tmp_path / "report", reps=200)
    scores = read_csv(tmp_path / "report" / "scores.csv")
    assert len(scores) == 4
    for row in scores:
        logged = read_csv(Path(row["run_dir"]) / "logs" / "eval.csv")
        assert float(row["success"]) == float(next(r["eval/success"] for r in logged if int(r["step"]) == 200))
        assert int(row["step"]) == 200
    aggregates = json.loads((tmp_path / "report" / "aggregates.json").read_text())["per_step"]["200"]
    for method in ("qam", "fql"):
        values = [float(r["success"]) for r in scores if r["method"] == method]
        assert aggregates["methods"][method]["mean"] == pytest.approx(sum(values) / 2)
        assert aggregates["per_task"][ENV][method]["mean"] == pytest.approx(sum(values) / 2)
    text = report.read_text()
    assert "| cube-double-play-singletask-task2-v0 | qam | 2 |" in text
    assert (tmp_path / "report" / "curves_cube-double-play.png").stat().st_size > 1000


def test_dataset_generated_by_a_concurrent_cell_is_loaded(tmp_path, monkeypatch):
    """Two cells with `train.generate_if_missing` race to generate one dataset: the loser loads it."""
    import flowrl.train as train_module
    from flowrl.ogbench.generate import DatasetExistsError

    calls = []

    def fake_train(run_dir, *, seed, resume, config_text, progress):
        calls.append((run_dir, seed, resume))
        if len(calls) == 1:
            raise DatasetExistsError("dataset file already exists: x.npz")
        return {"final_step": 10, "seed": seed}

    monkeypatch.setattr(train_module, "train", fake_train)
    assert sweep._train_seeds([tmp_path / "seed3"], [3], "text") == [{"final_step": 10, "seed": 3}]
    assert calls == [(tmp_path / "seed3", 3, True)] * 2


@pytest.mark.parametrize(("flags", "expected"), [
    (["--engine", "serial", "--address", "auto"], "--address needs --engine ray"),
    (["--max-parallel", "0"], "--max-parallel 0: must be >= 1"),
    (["--retries", "-1"], "--retries -1: must be >= 0"),
    (["--subset", "methods=nope"], "'nope' is not in"),
])
def test_cli_flag_errors(tmp_path, capsys, flags, expected):
    spec = tiny_spec(tmp_path, tmp_path / "no-data")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "runs"), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowrl: error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not (tmp_path / "runs").exists()  # nothing started
