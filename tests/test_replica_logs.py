"""What a replica's log file tells an operator: a client's bad upload is one WARNING line with its reason, no
traceback; ERROR is left for faults of the server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import SEGMENT, ZIP, zip_bytes

pytestmark = [pytest.mark.cluster]


def _replica_logs(app: str, deployment: str) -> list[Path]:
    import ray

    serve_logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return sorted(serve_logs.glob(f"replica_{app}_{deployment}_*.log"))


def _written_since(sizes: dict[Path, int], app: str, deployment: str) -> str:
    """What the deployment's replicas logged after ``sizes`` (each file's size then) were taken."""
    time.sleep(1)  # the replica's file handler has flushed by now
    return "".join(
        path.read_bytes()[sizes.get(path, 0) :].decode(errors="replace") for path in _replica_logs(app, deployment)
    )


def test_a_bad_upload_is_a_warning_with_its_reason_not_an_error_with_a_traceback(client, app_config):
    sizes = {path: path.stat().st_size for path in _replica_logs(app_config.name, "Preprocess")}
    assert sizes, "the test application has no Preprocess replica (split layout expected without a GPU)"
    answer = client.post(SEGMENT, content=zip_bytes({"README.txt": b"hello", "a.csv": b"1,2"}), headers=ZIP)
    assert answer.status_code == 422, answer.text
    reason = answer.json()["error"]["reason"]

    logged = _written_since(sizes, app_config.name, "Preprocess")
    assert "Traceback" not in logged and not [line for line in logged.splitlines() if line.startswith("ERROR")], logged
    warnings = [line for line in logged.splitlines() if line.startswith("WARNING")]
    assert any("422" in line and reason in line for line in warnings), logged
