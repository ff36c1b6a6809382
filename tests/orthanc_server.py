"""A real Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the tests, and a TCP relay that cuts
its answers short: what the PACS tests talk to.

Orthanc runs on loopback with its storage in a temporary folder; ``stop``/``start`` take it down and
bring it back with its studies kept.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

__all__ = ["DICOMWEB_PLUGIN", "CuttingRelay", "Orthanc", "orthanc_executable"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_executable() -> str | None:
    """Orthanc's executable, when it and its DICOMweb plugin are installed."""
    found = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).exists()), None)
    return found if found and DICOMWEB_PLUGIN.exists() else None


class Orthanc:
    """One Orthanc server with the DICOMweb plugin.

    Args:
        root: a folder of its own: config, storage, log.
        http_port: its HTTP port (REST API and DICOMweb at ``/dicom-web``).
        dicomweb_servers: its ``DicomWeb.Servers``: where it may push studies (name -> {"Url", "HttpHeaders"}).
        dicom_port: its DICOM port (AE title ORTHANC); None: a free one.
    """

    def __init__(self, root: Path, http_port: int, dicomweb_servers: dict | None = None, dicom_port: int | None = None):
        self.root, self.http_port = Path(root), http_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.config = self.root / "orthanc.json"
        if dicom_port is None:  # Orthanc always opens one
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                dicom_port = s.getsockname()[1]
        self.dicom_port = dicom_port
        config = {
            "Name": "medserve-tests",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
        }
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30) -> None:
        with open(self.root / "orthanc.log", "ab") as log:  # the process keeps its own handle
            self.process = subprocess.Popen([orthanc_executable(), str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.root / 'orthanc.log'}")
            try:
                if httpx.get(f"{self.dicomweb_url}/studies", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.root / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def push(self, server: str, series_instance_uid: str) -> dict:
        """Have Orthanc STOW a series it holds to one of its ``DicomWeb.Servers``; its answer."""
        orthanc_ids = httpx.post(f"{self.url}/tools/lookup", content=series_instance_uid, timeout=30).json()
        series = next(item["ID"] for item in orthanc_ids if item["Type"] == "Series")
        response = httpx.post(f"{self.dicomweb_url}/servers/{server}/stow", json={"Resources": [series]}, timeout=300)
        response.raise_for_status()
        return response.json()


class CuttingRelay:
    """A TCP relay on loopback to ``target_port`` that closes each connection once ``cut_after`` bytes of the
    answer have passed: a PACS that dies half-way through sending a series."""

    def __init__(self, port: int, target_port: int, cut_after: int):
        self.target_port, self.cut_after = target_port, cut_after
        self.listener = socket.create_server(("127.0.0.1", port))
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
            threading.Thread(target=self._copy, args=(client, upstream, None), daemon=True).start()
            if self._copy(upstream, client, self.cut_after):
                self.cuts += 1

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket, limit: int | None) -> bool:
        """Copy until ``source`` ends or ``limit`` bytes have passed; whether the limit cut it."""
        passed = 0
        try:
            while data := source.recv(65536):
                if limit is not None and passed + len(data) >= limit:
                    sink.sendall(data[: limit - passed])
                    sink.shutdown(socket.SHUT_RDWR)
                    return True
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass
        return False

    def close(self) -> None:
        self.listener.close()
