#!/usr/bin/env bash
# Issue 14: medserve scaled out over the GPUs of one host (device kinds nvidia-h200-x2 / -x4), in one device call:
#   source .device-bundle/setup.sh && bash benchmarks/gpu_scaling.sh [GPU COUNTS]   # default: 1 2 4, as many as exist
# For each count k (its GPUs made visible with CUDA_VISIBLE_DEVICES, so Ray sees only those):
#   - the 3D pipeline over HTTP (full-size NIfTI, msd-spleen-unet), 4 fused replicas per GPU at 1/4 GPU each;
#   - a WSI job of 4 slides at once, the tile model's replicas on all k GPUs (GPU JPEG decode);
#   meanwhile, every 5 s: per-GPU utilisation (the GPU exporter) and where each replica landed
#   (ray_medserve_replica_gpus, from Ray's metrics port).
# Writes $OUT/gpu-scaling-<device>-<date>.json: device, date, gpus, per-count figures, placement, and
# scaling.pipeline_efficiency / scaling.wsi_efficiency = throughput on the most GPUs / (k x on one).
set -uo pipefail
out=${OUT:-benchmarks/results/gpu-scaling}
mkdir -p "$out"
available=$(nvidia-smi -L | wc -l)
python -m serve_app.observability.gpu_exporter --port 9835 >/dev/null 2>&1 &
exporter=$!
for k in ${*:-1 2 4}; do
  if [ "$k" -gt "$available" ]; then echo "skipping $k GPUs: this host has $available"; continue; fi
  visible=$(seq -s, 0 $((k - 1)))
  ( while sleep 5; do
      curl -s localhost:9835/metrics | grep -E '^medserve_gpu_utilization'
      curl -s localhost:18700/metrics | grep -E '^ray_medserve_replica_gpus'
    done >"$out/scraped-$k.txt" 2>/dev/null ) &
  scraper=$!
  CUDA_VISIBLE_DEVICES=$visible timeout 300 python -m benchmarks.pipeline --size full --models msd-spleen-unet \
    --layouts fused --http-phases http --no-decode --fused-replicas $((4 * k)) --gpus "$k" --out "$out/pipeline-$k" \
    >"$out/pipeline-$k.log" 2>&1
  CUDA_VISIBLE_DEVICES=$visible timeout 240 python -m benchmarks.wsi --size large --scaling "$k" --slides 4 \
    --out "$out" >"$out/wsi-$k.log" 2>&1
  kill $scraper 2>/dev/null
  grep -hE '^http: \{|^\{"tiles"' "$out/pipeline-$k.log" "$out/wsi-$k.log" | cut -c1-300
done
kill $exporter 2>/dev/null
python - "$out" <<'PY'
import datetime, json, re, subprocess, sys
from pathlib import Path

out = Path(sys.argv[1])
runs = {}
for k in sorted({int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(?:pipeline|wsi)-(\d+)\.log$", p.name))}):
    # The phase's line in the log: there even when the run was cut by its time limit after it.
    log = out / f"pipeline-{k}.log"
    lines = [line for line in log.read_text().splitlines() if line.startswith("http: {")] if log.exists() else []
    http = json.loads(lines[-1].split(": ", 1)[1]) if lines else None
    wsi = out / f"wsi-scaling-{k}.json"
    scraped = (out / f"scraped-{k}.txt").read_text().splitlines() if (out / f"scraped-{k}.txt").exists() else []
    placement = sorted({re.sub(r"\s[0-9.e+]+$", "", line) for line in scraped if "replica_gpus" in line})
    runs[k] = {
        "pipeline_volumes_per_s": http and http["volumes_per_s"],
        "pipeline_gpu_util_percent": http and http["gpu_util_percent"],
        "wsi_tiles_per_s": json.loads(wsi.read_text())["tiles_per_s"] if wsi.exists() else None,
        "placement": placement,
        "gpu_utilisation_samples": [line for line in scraped if "utilization" in line][-8:],
    }

def efficiency(key):
    most = max((k for k in runs if runs[k][key]), default=None)
    if most in (None, 1) or not (runs.get(1) or {}).get(key):
        return None
    return round(runs[most][key] / (most * runs[1][key]), 3)

name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
device = name.stdout.splitlines()[0].strip() if name.stdout else "unknown"
date = datetime.date.today().isoformat()
report = {
    "device": device, "date": date, "gpus": sorted(runs),
    "runs": runs,
    "scaling": {"pipeline_efficiency": efficiency("pipeline_volumes_per_s"),
                "wsi_efficiency": efficiency("wsi_tiles_per_s"), "target": 0.9},
}
path = out / f"gpu-scaling-{device.replace(' ', '_')}-{date}.json"
path.write_text(json.dumps(report, indent=1))
print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
for k, run in runs.items():
    print(k, {key: v for key, v in run.items() if key != "gpu_utilisation_samples"})
PY
