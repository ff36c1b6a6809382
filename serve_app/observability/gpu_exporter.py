"""GPU exporter: per-GPU utilisation, memory, power and temperature from NVML, for Prometheus.

    python -m serve_app.observability.gpu_exporter --port 9835      # one per GPU node; serves /metrics

A standalone prometheus_client exporter rather than Ray metrics: it reads the whole node's GPUs,
whichever process uses them, and keeps answering while Ray restarts. Each scrape reads NVML afresh.
On a machine without an NVIDIA driver it serves ``medserve_gpu_count 0`` and nothing else: no GPU
is a fact to report, not an error. ``snapshot()`` is the same reading as a dict, for benchmarks.
"""

from __future__ import annotations

import argparse
import threading

from prometheus_client import REGISTRY, start_http_server
from prometheus_client.core import GaugeMetricFamily

DEFAULT_PORT = 9835
# name -> (snapshot key, help). Every per-GPU gauge has the labels gpu (NVML index), uuid and name.
PER_GPU_GAUGES = {
    "medserve_gpu_utilization_percent": ("utilization_percent", "Percent of the last sample period a kernel ran."),
    "medserve_gpu_memory_used_bytes": ("memory_used_bytes", "GPU memory in use, all processes."),
    "medserve_gpu_memory_total_bytes": ("memory_total_bytes", "GPU memory installed."),
    "medserve_gpu_power_watts": ("power_watts", "Power draw."),
    "medserve_gpu_temperature_celsius": ("temperature_celsius", "GPU die temperature."),
}
_nvml_lock = threading.Lock()


def snapshot() -> dict:
    """``{"gpu_count": N, "gpus": [{index, uuid, name, utilization_percent, ...}], "nvml_error": str|None}``."""
    import pynvml

    with _nvml_lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:  # no driver, or no GPU: a plain 0
            return {"gpu_count": 0, "gpus": [], "nvml_error": str(e)}
        try:
            return {"gpu_count": pynvml.nvmlDeviceGetCount(), "gpus": _read_gpus(pynvml), "nvml_error": None}
        finally:
            pynvml.nvmlShutdown()


def _read_gpus(pynvml) -> list[dict]:
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        gpus.append(
            {
                "index": index,
                "uuid": pynvml.nvmlDeviceGetUUID(handle),
                "name": pynvml.nvmlDeviceGetName(handle),
                "utilization_percent": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "memory_used_bytes": memory.used,
                "memory_total_bytes": memory.total,
                "power_watts": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML gives milliwatts
                "temperature_celsius": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            }
        )
    return gpus


class GpuCollector:
    """A prometheus_client collector that reads NVML on every scrape."""

    def collect(self):
        reading = snapshot()
        count = GaugeMetricFamily("medserve_gpu_count", "NVIDIA GPUs NVML sees on this node (0 without a driver).")
        count.add_metric([], reading["gpu_count"])
        yield count
        for name, (key, help_text) in PER_GPU_GAUGES.items():
            family = GaugeMetricFamily(name, help_text, labels=["gpu", "uuid", "name"])
            for gpu in reading["gpus"]:
                family.add_metric([str(gpu["index"]), gpu["uuid"], gpu["name"]], gpu[key])
            yield family


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.observability.gpu_exporter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    REGISTRY.register(GpuCollector())
    server, thread = start_http_server(args.port, addr=args.host)
    print(f"medserve GPU exporter on http://{args.host}:{args.port}/metrics", flush=True)
    thread.join()


if __name__ == "__main__":
    main()
