"""Observability: what ops people watch.

metrics.py       every custom metric, exported through Ray's metrics pipeline
gpu_exporter.py  a Prometheus exporter of NVML's GPU readings, one per GPU node
monitoring.py    starts and stops Prometheus, the exporter and Grafana beside a local cluster
"""
