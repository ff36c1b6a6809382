"""How fast medserve's DICOM listener receives, durably, beside Orthanc's, in one run on one machine.

    python -m benchmarks.dimse_receive [--slices 300] [--runs 3] [--out benchmarks/results]

dcmtk's ``storescu -xs`` sends the same CT series (``--slices`` instances of 512x512, int16: 300 is 152 MB) once
per run to (a) a ``DicomNode`` of medserve in this process (every instance on disk, name and all, before its
Success: its bytes flushed with fdatasync, its folder fsynced; no route, so nothing is processed) and (b) Orthanc,
started with ``TCP_NODELAY=1`` in its environment (without it dcmtk-based peers stall about 40 ms an instance on
delayed ACKs). Each run starts both afresh on empty storage, so no instance is a duplicate; the runs alternate
between the two. Reports instances/s of each (best run) and medserve's rate over Orthanc's, with the machine's load
average before and after (a shared machine's other work slows both, and flushes most), to
``dimse-receive-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.upload_path import _device_name  # the machine as every benchmark names it
from serve_app.config import AppConfig
from serve_app.dicom_network.node import DicomNode
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.studies.volume import Volume
from serve_app.tenancy.audit import AuditLog
from tests.orthanc_server import Orthanc, orthanc_executable

__all__ = ["main"]

RESULTS = Path(__file__).parent / "results"
_CALLING = "STORESCU"
_STORESCU_ARGS = ["-xs", "-aet", _CALLING]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="instances in the series (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="runs per receiver; the best is reported (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if orthanc_executable() is None:
        raise SystemExit("Orthanc and its DICOMweb plugin are not installed (Debian: orthanc orthanc-dicomweb)")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="dimse-receive-") as scratch:
        scratch = Path(scratch)
        files = _series(scratch / "series", args.slices)
        size = sum(path.stat().st_size for path in files)
        medserve_s, orthanc_s = [], []
        for run in range(args.runs):  # alternately, so that a shared machine's other work weighs on both alike
            medserve_s.append(_medserve(scratch / f"medserve-{run}", files))
            orthanc_s.append(_orthanc(scratch / f"orthanc-{run}", files))
    medserve_rate, orthanc_rate = len(files) / min(medserve_s), len(files) / min(orthanc_s)
    report = {
        "device": _device_name(),
        "date": datetime.date.today().isoformat(),
        "instances": len(files),
        "bytes": size,
        "sender": " ".join(["storescu", *_STORESCU_ARGS]),
        "medserve_seconds": medserve_s,
        "orthanc_tcp_nodelay_seconds": orthanc_s,
        "medserve_instances_per_s": round(medserve_rate, 1),
        "orthanc_tcp_nodelay_instances_per_s": round(orthanc_rate, 1),
        "medserve_over_orthanc": round(medserve_rate / orthanc_rate, 2),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"dimse-receive-{re.sub(r'[^A-Za-z0-9]+', '_', report['device']).strip('_')}-{report['date']}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def _series(folder: Path, slices: int) -> list[Path]:
    """A 512x512 CT series: a 128x128 phantom, each voxel repeated 4x4 in-plane (a 512x512 phantom's coordinate
    grids alone would take gigabytes)."""
    small = ct_phantom(np.random.default_rng(0), shape=(128, 128, slices), spacing=(3.2, 3.2, 1.0)).volume
    array = np.repeat(np.repeat(small.array, 4, axis=0), 4, axis=1)
    affine = small.affine @ np.diag([0.25, 0.25, 1.0, 1.0])
    return write_ct_series(Volume(array=array, affine=affine, modality="CT"), folder)


def _dcmtk_storescu() -> str:
    """dcmtk's storescu on PATH: a virtual environment's ``bin`` may put pynetdicom's own ``storescu`` first."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = shutil.which("storescu", path=folder)
        if candidate and "dcmtk" in subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout:
            return candidate
    raise SystemExit("dcmtk's storescu is not on PATH (Debian: dcmtk)")


def _send(port: int, called: str, files: list[Path]) -> float:
    command = [_dcmtk_storescu(), *_STORESCU_ARGS, "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 3)


def _medserve(root: Path, files: list[Path]) -> float:
    config = AppConfig.model_validate(
        {
            "storage": {"root": str(root)},
            "dicom_network": {"port": 0, "ae_titles": {"MEDSERVE": {"callers": {_CALLING: []}}}, "stable_after_s": 600},
        }
    )
    node = DicomNode(config, _no_processing, AuditLog(config.audit, config.storage.root, "dimse-receive"))
    tempfile.tempdir = str(node.receiving)  # as the node's replica receives (deployments/dicom_node.py)
    node.start()
    try:
        return _send(node.port, "MEDSERVE", files)
    finally:
        node.stop()
        tempfile.tempdir = None


def _no_processing(series, route):
    raise AssertionError("the benchmark's node has no routes")


def _orthanc(root: Path, files: list[Path]) -> float:
    root.mkdir()
    orthanc = Orthanc(root, http_port=_free_port())
    dicom_port = json.loads(orthanc.config.read_text())["DicomPort"]
    os.environ["TCP_NODELAY"] = "1"  # Orthanc's environment is this process's
    try:
        orthanc.start()
        return _send(dicom_port, "ORTHANC", files)
    finally:
        orthanc.stop()
        del os.environ["TCP_NODELAY"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
