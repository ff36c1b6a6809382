"""Fixtures: a real local Ray cluster with the medserve application served over real HTTP."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fault_load import SUMMARY

from helpers import (
    TEST_MAX_FILES,
    TEST_MAX_UPLOAD_BYTES,
    TEST_MAX_VOXELS,
    TEST_RAY_ENVIRONMENT,
    TEST_WSI,
    free_port,
    skip_unless_installed,
)
from orthanc_server import CuttingRelay, Orthanc, orthanc_executable
from serve_app.cli.cluster import wait_until_ready
from serve_app.config import AppConfig, load_config
from serve_app.ray_security import apply_environment, haproxy_environment, token_environment
from serve_app.samples.phantoms import Phantom, ct_phantom
from serve_app.samples.study_files import write_ct_series

# Modules that deploy an application of their own beside the main one, and delete it after. The test cluster has CPUs
# for the main app and one more (``make_room_for_an_app``): run after the tenant app is first deployed, each would take
# its room and the next tenant test would deploy it again, half a minute on CI's two cores each time. So they run first.
OWN_APP_MODULES = (
    "test_autoscaling.py",
    "test_bundles_live.py",
    "test_layouts.py",
    "test_overload.py",
    "test_rollouts.py",
)


def pytest_collection_modifyitems(items):
    """Every test that needs the Ray cluster is marked ``cluster``: ``make test-fast`` leaves them out. The modules of
    ``OWN_APP_MODULES`` first, each in its place otherwise (the sort is stable)."""
    for item in items:
        if "ray_cluster" in item.fixturenames:
            item.add_marker(pytest.mark.cluster)
    items.sort(key=lambda item: item.path.name not in OWN_APP_MODULES)


def pytest_terminal_summary(terminalreporter):
    """What the load tests found (faults under load, autoscaling, drain), when they ran."""
    for heading, lines in SUMMARY.items():
        terminalreporter.section(heading)
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def slide_root(tmp_path_factory) -> Path:
    """The test servers' one ``wsi.slide_roots`` folder: the WSI tests write their slides here."""
    return tmp_path_factory.mktemp("slides")


@pytest.fixture(scope="session")
def pacs_ports() -> dict[str, int]:
    """Ports of the test PACS: Orthanc's HTTP and DICOM ports, and a relay to its HTTP port that cuts answers
    half-way."""
    return {"orthanc": free_port(), "orthanc_dicom": free_port(), "cutting_relay": free_port()}


@pytest.fixture(scope="session")
def app_config(tmp_path_factory, slide_root, pacs_ports) -> AppConfig:
    storage = tmp_path_factory.mktemp("storage")
    return load_config(
        overrides={
            "storage.root": str(storage),
            "http.port": free_port(),
            # The Open Inference Protocol's gRPC service (test_inference_protocol.py), on every app of the cluster.
            "grpc": {"enabled": True, "port": free_port()},
            # Retry-After short and four store attempts (1 + 2 + 4 s apart): the store-back test restarts Orthanc.
            "pacs.main": {
                "url": f"http://127.0.0.1:{pacs_ports['orthanc']}/dicom-web",
                "store_attempts": 4,
                "retry_after_s": 5,
            },
            "pacs.cut": {"url": f"http://127.0.0.1:{pacs_ports['cutting_relay']}/dicom-web"},
            # Replicas parse the 40-file phantom series in two processes each: spawned inside Ray's workers.
            "reading.dicom_header_processes": 2,
            "limits.max_volume_voxels": TEST_MAX_VOXELS,
            "limits.max_upload_bytes": TEST_MAX_UPLOAD_BYTES,
            "limits.max_files_per_upload": TEST_MAX_FILES,
            **TEST_WSI,
            "wsi.slide_roots": [str(slide_root)],
            "wsi.output_root": str(storage / "wsi"),
            # The DICOM node, Orthanc (AE ORTHANC) its sender and its PACS: CT series go to the embedded model and
            # its SEG and SR back to Orthanc; a delivery to a stopped Orthanc is retried every second or two. Its
            # port is any free one (the tests ask the node), as the apps the tests derive from this config have
            # nodes of their own.
            **dicom_node_sections(pacs_ports["orthanc_dicom"]),
        }
    )


def dicom_node_sections(orthanc_dicom_port: int) -> dict:
    return {
        "dicom_network": {
            "port": 0,
            "ae_titles": {"MEDSERVE": {"callers": {"ORTHANC": ["127.0.0.1"], "STORESCU": ["127.0.0.1"]}}},
            "stable_after_s": 1.0,
            "delivery_first_retry_s": 1.0,
            "delivery_max_retry_s": 2.0,
        },
        "routes": {
            "abdomen-ct": {
                "match": {"modality": ["CT"], "slice_count": {"min": 8}},
                "model": "ct-phantom-organ",
                "destinations": ["orthanc"],
            }
        },
        "destinations": {
            "orthanc": {"dimse": {"host": "127.0.0.1", "port": orthanc_dicom_port, "ae_title": "ORTHANC"}}
        },
    }


@pytest.fixture(scope="session")
def ray_cluster(app_config):
    import ray

    # The ingress the config names (Ray's HAProxy by default), token authentication with a token of this session's
    # own and HAProxy's sockets in a private folder, as `medserve up` starts Ray (its folder's path short enough
    # for a socket's). HAProxy's stats and metrics ports on free ones: the benchmark's smoke test starts a second
    # cluster beside this one.
    haproxy_folder = Path(tempfile.mkdtemp(prefix="mshap-", dir="/tmp"))
    haproxy_ports = {"RAY_SERVE_HAPROXY_STATS_PORT": free_port(), "RAY_SERVE_HAPROXY_METRICS_PORT": free_port()}
    # Serve's fallback proxy (HAProxy's backup, on the head) serves gRPC on a fixed port, 9500 unless told: a free one.
    haproxy_ports["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"] = free_port()
    apply_environment(
        {
            **app_config.http.ray_environment(),
            **token_environment(),
            **haproxy_environment(haproxy_folder),
            **{k: str(v) for k, v in haproxy_ports.items()},
            **TEST_RAY_ENVIRONMENT,
        }
    )
    # "local": a fresh cluster even where `medserve up` left one running.
    # With its dashboard, which writes the Prometheus service-discovery file test_observability scrapes
    # through; metrics exported every 2 s rather than 10 so that test waits less.
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=True,
        logging_level="ERROR",
        configure_logging=False,
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 2000},
    )
    yield
    ray.shutdown()
    shutil.rmtree(haproxy_folder, ignore_errors=True)


@pytest.fixture(scope="session")
def server_url(ray_cluster, app_config) -> str:
    """The medserve application deployed on the test cluster; its base URL."""
    from ray import serve

    from serve_app.app import build_app

    serve.start(**app_config.http.serve_start_options(), **app_config.grpc.serve_start_options())
    serve.run(build_app(app_config), name=app_config.name, route_prefix="/", blocking=False)
    url = f"http://{app_config.http.host}:{app_config.http.port}"
    wait_until_ready(url, timeout_s=300)
    yield url
    serve.shutdown()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory, pacs_ports, app_config) -> Orthanc:
    """A real Orthanc with the DICOMweb plugin, as the test server's PACS `main`; it may push series to
    medserve's STOW-RS endpoint for the embedded model (its DicomWeb server `medserve`), or to the one that
    stores the results back to it (`medserve-and-back`)."""
    if orthanc_executable() is None:
        skip_unless_installed("Orthanc", "Orthanc and its DICOMweb plugin are not installed (Debian orthanc-dicomweb)")
    stow = f"http://{app_config.http.host}:{app_config.http.port}/dicomweb/ct-phantom-organ"
    destinations = {"medserve": {"Url": f"{stow}/"}, "medserve-and-back": {"Url": f"{stow}/store-to/main/"}}
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"), pacs_ports["orthanc"], destinations, pacs_ports["orthanc_dicom"]
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cutting_relay(orthanc, pacs_ports) -> CuttingRelay:
    """The test server's PACS `cut`: Orthanc behind a relay that drops each answer after 64 KiB."""
    relay = CuttingRelay(pacs_ports["cutting_relay"], orthanc.http_port, cut_after=64 * 1024)
    yield relay
    relay.close()


@pytest.fixture
def client(server_url):
    with httpx.Client(base_url=server_url, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def phantom() -> Phantom:
    # Seeds from 10_000 on are never drawn by the training script's generator.
    return ct_phantom(np.random.default_rng(10_001))


@pytest.fixture(scope="session")
def phantom_series(phantom, tmp_path_factory) -> list[Path]:
    return write_ct_series(phantom.volume, tmp_path_factory.mktemp("series"))


TENANT_APP_PREFIX = "/tenants"


@pytest.fixture(scope="session")
def tenant_keys() -> dict[str, str]:
    from serve_app.tenancy.keys import new_api_key

    tenants = ("st-marys", "city-general", "rural-clinic", "research-lab", "path-lab")
    return {tenant: new_api_key() for tenant in tenants}


@pytest.fixture(scope="session")
def tenant_config(app_config, tenant_keys, tmp_path_factory, slide_root, pacs_ports) -> AppConfig:
    """A second application with four hospitals and two ingress replicas, on the same cluster and port."""
    from serve_app.tenancy.keys import hash_api_key

    def tenant(models, per_second, burst, max_concurrent, **more) -> dict:
        return {
            "models": models,
            "rate": {"per_second": per_second, "burst": burst},
            "max_concurrent": max_concurrent,
            **more,
        }

    # Each tenant reads slides from its own roots: st-marys from the servers' slide root, path-lab (whose slides and
    # jobs only the storage isolation tests make) from one of its own.
    tenants = {
        "st-marys": tenant(["*"], 100, 100, 16, stat=True, wsi_slide_roots=[str(slide_root)]),
        "city-general": tenant(["*"], 0.01, 4, 100),  # four requests, then (nearly) nothing: the exact-rate test
        "rural-clinic": tenant(
            ["ct-phantom-organ"], 100, 100, 2, max_upload_bytes=80_000, wsi_upload_quota_bytes=100_000
        ),
        "research-lab": tenant(["mr-brain"], 100, 100, 4),
        "path-lab": tenant(["*"], 100, 100, 4, wsi_slide_roots=[str(tmp_path_factory.mktemp("path-lab-slides"))]),
    }
    for tenant_id, fields in tenants.items():
        fields.update(name=tenant_id.replace("-", " ").title(), api_key_hashes=[hash_api_key(tenant_keys[tenant_id])])
    storage = tmp_path_factory.mktemp("tenant-storage")
    return load_config(
        overrides={
            "name": "medserve-tenants",
            "storage.root": str(storage),
            "http.port": app_config.http.port,
            "grpc": app_config.grpc.model_dump(),  # the cluster's, as its HTTP port
            # Replicas parse the 40-file phantom series in two processes each: spawned inside Ray's workers.
            "reading.dicom_header_processes": 2,
            "limits.max_volume_voxels": TEST_MAX_VOXELS,
            "deployments.ingress.num_replicas": 2,
            "tenants": tenants,
            "scheduling.lease_s": 5,  # short, so that the tests see requests outlive their first lease
            # A DICOM node whose AE title STMARYS is st-marys's: its deliveries are st-marys's alone. CITYGEN is
            # city-general's, which no route takes; a tenant's inbox holds 100 instances (the flood test's limit).
            "dicom_network": {
                "port": 0,
                "ae_titles": {
                    "STMARYS": {"tenant": "st-marys", "callers": {"STORESCU": ["127.0.0.1"]}},
                    "CITYGEN": {"tenant": "city-general", "callers": {"STORESCU": ["127.0.0.1"]}},
                },
                "stable_after_s": 1.0,
                "limits": {"max_inbox_instances_per_tenant": 100},
            },
            "routes": {
                "st-marys-ct": {
                    "match": {"modality": ["CT"], "called_ae_titles": ["STMARYS"]},
                    "model": "ct-phantom-organ",
                    "destinations": ["orthanc"],
                }
            },
            "destinations": {
                "orthanc": {
                    "dimse": {"host": "127.0.0.1", "port": pacs_ports["orthanc_dicom"], "ae_title": "ORTHANC"},
                    "tenants": ["st-marys"],
                }
            },
            **TEST_WSI,
            "wsi.output_root": str(storage / "wsi"),
            "wsi.max_running_jobs_per_tenant": 1,
            # A PACS path-lab and research-lab may use on which nothing answers (one attempt): the isolation test's
            # store of another tenant's result gets past the PACS check to the result's, and the owner's store
            # reaches the PACS (503).
            "pacs.unanswered": {
                "url": f"http://127.0.0.1:{free_port()}/dicom-web",
                "tenants": ["path-lab", "research-lab"],
                "store_attempts": 1,
                "retry_after_s": 1,
            },
        }
    )


@pytest.fixture
def tenant_url(server_url, tenant_config) -> str:
    """The tenant application's base URL; it shares the test cluster with the open one. Deployed when first asked
    for and left running for the tests after; an app a test deploys beside the open one takes its room meanwhile
    (``make_room_for_an_app``), and it is deployed again when next asked for. ``serve.shutdown`` ends it."""
    from ray import serve

    from serve_app.app import build_app

    if tenant_config.name not in serve.status().applications:
        serve.run(build_app(tenant_config), name=tenant_config.name, route_prefix=TENANT_APP_PREFIX, blocking=False)
    url = server_url + TENANT_APP_PREFIX
    wait_until_ready(url, timeout_s=300)
    return url
