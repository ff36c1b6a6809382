#!/usr/bin/env bash
# Every GPU measurement of a change, in two device calls (one call may run 10 minutes; README: Benchmarks):
#   source .device-bundle/setup.sh && bash benchmarks/gpu_session.sh bench [MODELS [OPTIONS]]  # the pipeline
#     benchmark; OPTIONS go to it, e.g. --no-decode --layouts fused --fused-replicas 8 to fit one call
#   source .device-bundle/setup.sh && bash benchmarks/gpu_session.sh tests             # GPU tests, postprocess profile
#   source .device-bundle/setup.sh && bash benchmarks/gpu_session.sh http [OPTIONS]     # the HTTP path alone, in one
#     call: the fused layout; every upload phase (raw NIfTI, the zipped DICOM series, .nii.gz, gzip and zstd bodies);
#     d at concurrency 16 and 24; 96 requests a phase; each phase's CPU time by process (benchmarks/cpu_accounting.py);
#     first, the upload path alone (benchmarks/upload_path.py: receiving against spooling, the load clients' cost).
#     OPTIONS go to the pipeline benchmark, e.g. --ingress-replicas 16, --compare again (a control session)
#   source .device-bundle/setup.sh && bash benchmarks/gpu_session.sh noisy             # noisy neighbour, full-size
#     studies on the GPU (3 rounds of alone / alone again / flood), then the GPU tests in the time left
# Writes under $OUT (the device tool's folder) or benchmarks/results/.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv"
case "${1:-bench}" in
tests)
  python -m pytest -q -p no:cacheprovider -p no:warnings tests/test_gpu_paths.py tests/test_postprocessing.py 2>&1 |
    tail -3 | tee "$out/gpu-tests.log"
  python -m benchmarks.postprocess_profile >"$out/postprocess-profile.txt" 2>&1
  ;;
noisy)
  name="noisy_neighbour-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')-$(date -u +%F).json"
  timeout 420 python -m benchmarks.noisy_neighbour --gpu --study full --rounds 3 --seconds 30 --out "$out/$name" \
    >"$out/noisy.log" 2>&1
  grep -E '"(p99|p50|rounds|control_ratio|flood_ratio|spread|min|median|max|b_status|a_status)' "$out/$name"
  tail -3 "$out/noisy.log"
  timeout 150 python -m pytest -q -p no:cacheprovider -p no:warnings tests/test_gpu_paths.py 2>&1 |
    tail -3 | tee "$out/gpu-tests.log"
  ;;
http)
  timeout 40 python -m benchmarks.upload_path --out "$out" >"$out/upload-path.log" 2>&1
  grep -A4 '"ratios"' "$out/upload-path.log"
  timeout 540 python -m benchmarks.pipeline --size full --models msd-spleen-unet --no-decode --layouts fused \
    --http-phases http,http_dicom_zip,http_nii_gz,http_gzip,http_zstd --http-concurrency 24 --requests 96 \
    --out "$out" "${@:2}" >"$out/bench.log" 2>&1
  grep -E '^[a-z_0-9 +-]+: \{' "$out/bench.log" | cut -c1-3000
  grep -v '^\s*\x1b\|^ ' "$out/bench.log" | grep -E 'Error|Traceback' | head -5 || true  # none found: not a failure
  ;;
bench)
  # While the benchmark runs: the GPU exporter and Ray's metrics (per-replica GPU memory), scraped every 5 s.
  python -m serve_app.observability.gpu_exporter --port 9835 >/dev/null 2>&1 &
  exporter=$!
  ( while sleep 5; do
      curl -s localhost:9835/metrics | grep -E '^medserve_gpu_(count|utilization|memory_used)'
      curl -s localhost:18700/metrics | grep -E '^ray_medserve_(replica_gpu_memory_bytes|batch_size_count)'
    done >"$out/scraped-metrics.txt" 2>/dev/null ) &
  scraper=$!
  # --compare: Serve's Python proxy, time-slicing (where MPS runs) and Serve's throughput-optimized data plane too,
  # one change at a time, in the same run.
  timeout 580 python -m benchmarks.pipeline --size full --models "${2:-msd-spleen-unet}" --compare --out "$out" \
    "${@:3}" >"$out/bench.log" 2>&1
  kill $scraper $exporter 2>/dev/null
  # One line a phase as it ended (the log's Ray lines left out), then the report.
  grep -E '^[a-z_0-9 +-]+: \{' "$out/bench.log" | cut -c1-700  # "compared <settings>: {" lines too
  grep -v '^\s*\x1b\|^ ' "$out/bench.log" | grep -E 'Error|Traceback' | head -5 || true  # none found: not a failure
  ;;
esac
