"""benchmarks/_common.py's peak-RSS child helpers and benchmarks/gpu/_results.py's entry loop, against hand-written
children and numbers worked out by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "gpu"))
import _common  # noqa: E402
import _results  # noqa: E402


def test_run_json_child_reads_the_last_stdout_line(tmp_path):
    child = [sys.executable, "-c", "print('noise'); print('{\"variant\": \"v\", \"peak_rss_kib\": 7}')"]
    assert {k: v for k, v in _common.run_json_child(child, "v", tmp_path).items() if k != "wall_s"} == {
        "variant": "v", "peak_rss_kib": 7}


def test_run_json_child_failure_names_the_code_and_the_last_stderr_line(tmp_path, capsys):
    child = [sys.executable, "-c", "import sys; print('  step 0', file=sys.stderr); sys.exit('boom')"]
    got = _common.run_json_child(child, "v", tmp_path, capture_stderr=True)
    assert got["variant"] == "v" and got["error"] == "child exited with 1: boom" and got["wall_s"] >= 0
    assert "boom" in capsys.readouterr().err  # the failed child's stderr tail is passed on
    assert _common.run_json_child(child, "v", tmp_path)["error"] == "child exited with 1"


def test_rss_entry_and_ratio_by_hand():
    base = 1024  # KiB: 1 MiB
    results = {"baseline": {"peak_rss_kib": base}, "a": {"peak_rss_kib": 5120, "step_peak_rss_kib": 3072,
                                                        "after_build_rss_kib": 2048},
               "b": {"peak_rss_kib": 3072, "step_peak_rss_kib": None}, "bad": {"error": "x"}}
    assert _common.rss_entry(results["a"], base) == {
        "peak_rss_mib": 5.0, "peak_above_baseline_mib": 4.0, "step_peak_rss_mib": 3.0,
        "step_peak_above_baseline_mib": 2.0, "after_build_rss_mib": 2.0}
    assert _common.rss_entry(results["b"], None)["peak_above_baseline_mib"] is None
    assert _common.rss_ratio(results, "a", "b", "peak_rss_kib", base) == {"raw": round(5 / 3, 3),
                                                                         "above_baseline": 2.0}  # 4 MiB / 2 MiB
    assert _common.rss_ratio(results, "a", "bad", "peak_rss_kib", base) == {"raw": None, "above_baseline": None}
    assert _common.rss_ratio(results, "a", "b", "step_peak_rss_kib", base)["raw"] is None


def test_run_entry_skips_past_the_budget_and_records_a_failure(tmp_path):
    res = _results.Results(str(tmp_path / "out.json"), {"runs": {}})
    runs, logged, after = res.doc["runs"], [], []

    def fail():
        runs["x"] = {"started": True}
        raise RuntimeError("out of memory")

    _results.run_entry(runs, "x", fail, res, logged.append, t_start=0.0, budget_s=float("inf"),
                       after=lambda: after.append(1))
    _results.run_entry(runs, "y", lambda: pytest.fail("ran past the budget"), res, logged.append,
                       t_start=0.0, budget_s=-1.0)
    saved = json.loads((tmp_path / "out.json").read_text())["runs"]
    assert saved["x"]["started"] and saved["x"]["error"] == "RuntimeError: out of memory"
    assert "RuntimeError" in saved["x"]["traceback"] and saved["y"] == {"skipped": "time budget spent"}
    assert logged == ["x failed: out of memory"] and after == [1]
