"""The pipeline benchmark runs end to end at tiny size and writes the figures the README reads."""

import json

from helpers import MODEL, medserve


def test_pipeline_benchmark_tiny_run_writes_its_report(tmp_path):
    run = medserve("bench", "--size", "tiny", "--models", MODEL, "--out", str(tmp_path), timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    (report_path,) = tmp_path.glob("pipeline-tiny-*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] and report["date"]
    assert set(report["ratios"]) == {"handles_over_bare", "http_over_bare", "bare_over_reference"}
    assert all(v > 0 for v in report["ratios"].values())
    assert set(report["p50_ms"]) == set(report["p99_ms"]) == {"a_reference", "b_bare", "c_handles", "d_http"}
    model = report["models"][MODEL]
    assert model["faster_layout"] in ("fused", "split")
    assert set(model["http"]["breakdown_ms"]) >= {"upload", "preprocess", "model_queue", "model", "postprocess"}
    assert (tmp_path / report_path.name.replace(".json", ".md")).is_file()
