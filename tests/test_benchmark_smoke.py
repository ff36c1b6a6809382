"""The benchmarks run end to end (the pipeline's at tiny size) and write the figures the README reads."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from helpers import MODEL, TEST_RAY_ENVIRONMENT


def test_pipeline_benchmark_tiny_run_writes_its_report(tmp_path):
    # Run from a shell that exports RAY_SERVE_THROUGHPUT_OPTIMIZED=1, as Ray's docs suggest beside HAProxy: the
    # benchmark's own handles then run in that mode (each bound to the event loop it was first called from). Its
    # clusters get the test clusters' settings whether or not this session has started one (each app the benchmark
    # deletes would otherwise wait 30 s for its ingress replica to drain).
    environment = {
        **os.environ,
        **TEST_RAY_ENVIRONMENT,
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.pipeline", "--size", "tiny", "--models", MODEL, "--compare"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=environment,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (report_path,) = tmp_path.glob("pipeline-tiny-*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] and report["date"]
    assert set(report["ratios"]) == {
        "handles_over_bare",
        "http_over_bare",
        "bare_over_reference",
        "http_over_transport_ceiling",
    }
    assert all(v > 0 for v in report["ratios"].values())
    assert set(report["p50_ms"]) == set(report["p99_ms"]) == {"a_reference", "b_bare", "c_handles", "d_http"}
    model = report["models"][MODEL]
    assert model["faster_layout"] in ("fused", "split")
    assert set(model["http"]["breakdown_ms"]) >= {"upload", "preprocess", "model_queue", "model", "postprocess"}
    # The two slowest requests, slowest first, with where their time went at the server (within the client's time).
    slowest = model["http"]["slowest_ms"]
    assert len(slowest) == 2 and slowest[0]["latency"] >= slowest[1]["latency"] >= model["http"]["p50_ms"]
    assert all(request["latency"] >= request["total"] > request["upload"] >= 0 for request in slowest)
    slowest = model["handles_fused"]["slowest_ms"]
    assert len(slowest) == 2 and slowest[0]["latency"] >= slowest[1]["latency"] >= model["handles_fused"]["p50_ms"]
    assert all(request["latency"] >= request["model"] > 0 for request in slowest)
    # The same study through every path, and every path's mask against the reference's. Here every path is fp32 on
    # the CPU, so each gives the reference's mask exactly; the DICOM phase too (the series holds the same int16
    # voxels), within 0.999 should its rescale round a voxel.
    for phase in ("bare", "handles_fused", "handles_split", "http", "http_nii_gz", "http_zstd"):
        assert model[phase]["volumes_per_s"] > 0, phase
        assert model[phase]["dice_vs_reference"] == 1.0, phase
    assert model["http_dicom_zip"]["volumes_per_s"] > 0
    assert model["http_dicom_zip"]["dice_vs_reference"] >= 0.999
    assert model["transport_ceiling_uploads_per_s"] > 0
    assert model["open_loop_http_80pct"]["p99_ms"] >= model["open_loop_http_80pct"]["p50_ms"] > 0
    assert (model["settings"]["ingress"], model["settings"]["throughput_optimized"]) == ("haproxy", False)
    # --compare: d and the DICOM phase again with one change at a time (no MPS here, so no time-slicing
    # alternative): Serve's Python proxy; Serve's throughput-optimized data plane.
    proxy, optimized = model["compared_settings"]
    assert (proxy["change"], optimized["change"]) == ("proxy", "throughput-optimized")
    assert (proxy["settings"]["ingress"], proxy["settings"]["throughput_optimized"]) == ("proxy", False)
    assert (optimized["settings"]["ingress"], optimized["settings"]["throughput_optimized"]) == ("haproxy", True)
    for compared in (proxy, optimized):
        for phase in ("http", "http_dicom_zip"):
            assert compared[phase]["volumes_per_s"] > 0 and compared[phase]["dice_vs_reference"] >= 0.999, phase
        assert "http_nii_gz" not in compared
    assert (tmp_path / report_path.name.replace(".json", ".md")).is_file()


def test_compared_throughput_optimized_switches_the_chosen_settings_either_way():
    from benchmarks.pipeline import ServeSettings, alternatives

    for chosen in (False, True):
        settings = ServeSettings(ingress="haproxy", gpu_sharing="mps", uploads_root=None, throughput_optimized=chosen)
        compared = alternatives(settings, ("throughput-optimized", "again"), gpu=True)
        assert compared == {
            "throughput-optimized": dataclasses.replace(settings, throughput_optimized=not chosen),
            "again": settings,
        }


def test_twice_the_replicas_doubles_the_fused_replicas_on_a_gpu_only():
    from benchmarks.pipeline import ServeSettings, alternatives

    settings = ServeSettings(ingress="haproxy", gpu_sharing="mps", uploads_root=None, fused_replicas=4)
    assert alternatives(settings, ("twice-the-replicas",), gpu=True) == {
        "twice-the-replicas": dataclasses.replace(settings, fused_replicas=8)
    }
    assert alternatives(settings, ("twice-the-replicas",), gpu=False) == {}


def test_a_session_that_asks_for_more_cpus_than_the_node_has_exits_before_deploying(tmp_path):
    from benchmarks.pipeline import ServeSettings, _check_cpus, cpus_asked, serve_config
    from serve_app.config import EMBEDDED_MODEL_REPOSITORY

    def fused(ingress_replicas: int):
        settings = ServeSettings(
            ingress="haproxy", gpu_sharing="mps", uploads_root=None, ingress_replicas=ingress_replicas
        )
        return serve_config(tmp_path, EMBEDDED_MODEL_REPOSITORY, "fused", True, 4, 18600, settings)

    # Four fused replicas at 1 CPU; the ingress and the sink at 0.25 CPU a replica.
    assert (cpus_asked(fused(16)), cpus_asked(fused(32))) == (12, 20)
    _check_cpus([fused(16)], 16)
    with pytest.raises(SystemExit, match="ask Ray for 20 CPUs .*this node has 16: ask for fewer --ingress-replicas"):
        _check_cpus([fused(32)], 16)


def test_upload_path_benchmark_compares_receiving_spooling_and_the_load_clients(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.upload_path", "--uploads", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (report_path,) = tmp_path.glob("upload-path-*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] and report["date"] and report["body_mb"] == 157
    for route in ("receive", "spool"):
        assert report["server"][route]["wall_ms"] > 0 and report["server"][route]["cpu_ms"] > 0, route
    # Writing 157 MB costs something on any machine: spooling cannot be cheaper than receiving alone.
    assert report["ratios"]["spool_over_receive_cpu"] > 1
    assert set(report["client_cpu_ms_per_upload"]) == {"httpx_async", "http_client"}
    assert all(v > 0 for v in report["client_cpu_ms_per_upload"].values())
    assert set(report["memory_copy_gb_per_s"]) == {"one_thread", "eight_threads"}
    assert all(v > 0 for v in report["memory_copy_gb_per_s"].values())
