"""A tiny smoke run of `flowrl bench` (the full benchmark is run by hand; docs/performance.md)."""

import json

from flowrl.cli import main


def test_bench_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--extractor", "qam", "--seeds", "1", "--hidden", "16,16", "--batch-size", "8",
                 "--critics", "2", "--flow-steps", "2", "--updates-per-call", "2", "--repeats", "1",
                 "--skip-eval", "--integrator", "scan", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    (row,) = report["extractors"]
    assert row["extractor"] == "qam" and report["integrator"] == "scan"
    assert row["compile_seconds"] > 0 and row["ms_per_update"] > 0 and row["cpu_seconds_per_update"] > 0
    assert set(row["seed_updates_per_second"]) == {"1"}
    assert all(rate > 0 for rate in row["seed_updates_per_second"].values())
    assert row["sample_ms_1"] > 0 and row["sample_ms_50"] > 0
    assert report["memory"]["host_peak_rss_gb"] > 0
    assert "qam" in capsys.readouterr().out
