"""BENCHMARKS.md is present, generated from bench/results, with every goal of every benchmark."""

from __future__ import annotations

from pathlib import Path

from bench.report import ORDER, RESULTS, _goal_rows, _table

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_md_has_every_goal_from_a_real_run():
    text = (ROOT / "BENCHMARKS.md").read_text()
    for name in ORDER:
        md = (RESULTS / f"{name}.md").read_text()
        assert (RESULTS / f"{name}.json").is_file()
        rows = _goal_rows(_table(md))
        assert rows, name
        for metric, verdict in rows:
            assert verdict in ("PASS", "FAIL")
            assert " ".join(metric.split()) in text, (name, metric)
    for png in ("throughput_vs_concurrency.png", "latency_vs_stages.png"):
        assert f"bench/results/{png}" in text and (RESULTS / png).stat().st_size > 1000
