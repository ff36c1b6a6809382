"""Model replicas spread evenly over a node's GPUs, as the multi-GPU scale-out needs them: four fused replicas
asking for half a GPU each on a node that claims two GPUs land two on each. The GPUs are fake (``ray start
--num-gpus 2`` on this CPU machine): Ray schedules them and gives each replica its indices, and the replicas run
on the CPU. Where each landed is read as ops would, from the replicas' ``ray_medserve_replica_gpus`` metric on
the node's metrics port."""

import time
from collections import Counter

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray_nodes import deploy, ray_nodes

from helpers import MODEL, free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

GPUS = 2
REPLICAS_PER_GPU = 2
METRICS_WAIT_S = 120


def test_replicas_spread_evenly_over_two_fake_gpus(tmp_path):
    with ray_nodes(tmp_path) as nodes:
        nodes.start_head()
        gpu_node = nodes.add_worker("gpus", cpus=2, resources={}, gpus=GPUS)
        config = {
            "name": "medserve-placement",
            "layout": "fused",
            "storage": {"root": str(tmp_path / "storage")},
            "http": {"port": free_port(), "proxy_location": "HeadOnly"},
            "reading": {"dicom_header_processes": 0},
            "deployments": {
                "ingress": {"num_cpus": 0},
                # num_gpus a fraction that divides a GPU, replicas a multiple of the GPUs: an even spread.
                "model": {"num_replicas": GPUS * REPLICAS_PER_GPU, "num_gpus": 1 / REPLICAS_PER_GPU, "num_cpus": 0},
            },
        }
        config_path = tmp_path / "placement.yaml"
        config_path.write_text(yaml.safe_dump(config))
        deploy(nodes, config_path)
        placed = _replicas_by_gpu(gpu_node.metrics_export_port, f"FusedPipeline:{MODEL}")
    print(f"fused replicas per GPU index: {dict(placed)}")
    assert placed == {str(gpu): REPLICAS_PER_GPU for gpu in range(GPUS)}, placed


def _replicas_by_gpu(port: int, deployment: str) -> Counter:
    """How many of ``deployment``'s replicas report each GPU, once all have reported (Ray exports every few s)."""
    deadline = time.monotonic() + METRICS_WAIT_S
    placed: Counter = Counter()
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        placed = Counter(
            sample.labels["gpu"]
            for family in text_string_to_metric_families(text)
            if family.name == "ray_medserve_replica_gpus"
            for sample in family.samples
            if sample.labels.get("deployment") == deployment and sample.value == 1
        )
        if sum(placed.values()) >= GPUS * REPLICAS_PER_GPU:
            return placed
        time.sleep(2)
    return placed
