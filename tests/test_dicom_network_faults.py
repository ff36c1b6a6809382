"""The DICOM node's process killed mid-series (SIGKILL: no clean-up of any kind), started again over the same
folder, the sender re-sending the whole series: the series is processed once, with every instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from serve_app.config import AppConfig
from serve_app.dicom_network.inbox import Inbox
from tests.helpers import free_port
from tests.test_dicom_network import CALLER, _dcmtk, ct_series, storescu, wait_until  # noqa: F401 (_dcmtk: autouse)

# The node in a process of its own; its processor appends (series, route, instances) to a file per call.
_NODE = textwrap.dedent(
    """
    import json, sys, threading
    from pathlib import Path
    from serve_app.config import AppConfig
    from serve_app.dicom_network.node import DicomNode
    from serve_app.tenancy.audit import AuditLog

    config = AppConfig.model_validate_json(Path(sys.argv[1]).read_text())
    calls = Path(sys.argv[2])

    def processor(series, route):
        with calls.open("a") as file:
            file.write(json.dumps([series.record.series_instance_uid, route.name, len(series.files)]) + "\\n")
        raise RuntimeError("this test's processor makes no result")

    node = DicomNode(config, processor, AuditLog(config.audit, config.storage.root, "dicom-fault-test"))
    node.start()
    print("listening", flush=True)
    threading.Event().wait()
    """
)


def _start(config_file: Path, calls: Path) -> subprocess.Popen:
    node = subprocess.Popen(
        [sys.executable, "-c", _NODE, str(config_file), str(calls)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert node.stdout.readline().strip() == "listening"
    return node


def test_a_node_killed_mid_series_completes_the_series_once_when_the_sender_re_sends(tmp_path):
    port = free_port()
    config = AppConfig.model_validate(
        {
            "storage": {"root": str(tmp_path / "storage")},
            "dicom_network": {
                "port": port,
                "ae_titles": {"MEDSERVE": {"callers": {CALLER: []}}},
                "stable_after_s": 1.5,
            },
            "routes": {"organ": {"match": {"modality": ["CT"]}, "model": "ct-phantom-organ"}},
        }
    )
    config_file, calls = tmp_path / "config.json", tmp_path / "calls.jsonl"
    config_file.write_text(config.model_dump_json())
    sent = ct_series(tmp_path / "ct", slices=20)
    inbox = Inbox(config.dicom_network.folder_under(config.storage.root, config.name) / "inbox")

    node = _start(config_file, calls)
    try:
        assert storescu(port, sent[:12]).returncode == 0  # acknowledged, so on disk
        os.kill(node.pid, signal.SIGKILL)  # before the series could be stable
        node.wait(timeout=30)
        (folder,) = [folder for _, folder in inbox.series_folders()]
        assert len(Inbox.instances(folder)) == 12
        node = _start(config_file, calls)
        assert storescu(port, sent).returncode == 0
        wait_until(lambda: calls.exists(), timeout_s=30, what="the series processed")
        time.sleep(3)  # longer than stable_after_s: a second processing would have happened by now
    finally:
        node.kill()
        node.wait(timeout=30)
    lines = [json.loads(line) for line in calls.read_text().splitlines()]
    assert [(route, n) for _, route, n in lines] == [("organ", 20)]
