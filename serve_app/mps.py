"""NVIDIA MPS for a node whose GPU several replicas share (``num_gpus: 0.25``): their kernels run at once,
not in turns of CUDA's time-slicing.

    env = mps.start()            # before Ray starts on the node
    subprocess.run(["ray", "start", "--head"], env={**os.environ, **env})
    ...
    mps.stop()

The control daemon's pipe and log folders are medserve's own (``MPS_ROOT``), so it neither needs nor disturbs
a system-wide daemon; every CUDA process that should use it must see ``env`` (Ray's workers inherit it from
``ray start``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from serve_app.config import default_storage_root
from serve_app.storage import private_folder

__all__ = ["MPS_ROOT", "MpsUnavailable", "control_binary", "start", "stop"]

# Private to medserve's user: whoever can write the pipe folder controls the daemon every replica's kernels go through.
MPS_ROOT = default_storage_root() / "state" / "mps"
# Where NVIDIA's container images put the driver's tools when they are not on PATH.
_NVIDIA_BIN = Path("/usr/local/nvidia/bin")


class MpsUnavailable(RuntimeError):
    """The node has no GPU or no ``nvidia-cuda-mps-control``, or the daemon would not start."""


def control_binary() -> str | None:
    """The path of ``nvidia-cuda-mps-control``, or None."""
    return shutil.which("nvidia-cuda-mps-control") or shutil.which("nvidia-cuda-mps-control", path=str(_NVIDIA_BIN))


def _environment() -> dict[str, str]:
    return {
        "CUDA_MPS_PIPE_DIRECTORY": str(MPS_ROOT / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(MPS_ROOT / "log"),
    }


def start() -> dict[str, str]:
    """Start the MPS control daemon (if not already running) and return the environment CUDA processes need to
    use it. Raises ``MpsUnavailable`` where it cannot run."""
    binary = control_binary()
    if binary is None or shutil.which("nvidia-smi", path=f"{os.environ.get('PATH', '')}:{_NVIDIA_BIN}") is None:
        raise MpsUnavailable("this node has no NVIDIA GPU tools (nvidia-smi, nvidia-cuda-mps-control)")
    env = _environment()
    for folder in env.values():
        private_folder(Path(folder))
    if _answers(binary):
        return env  # already running
    started = subprocess.run([binary, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if started.returncode != 0:
        raise MpsUnavailable(f"nvidia-cuda-mps-control -d failed: {started.stderr.strip() or started.returncode}")
    # `-d` forks and returns 0 even where the daemon then exits (no permission on the GPU, a container without
    # the MPS pipe's IPC): ask it something to be sure.
    for _ in range(20):
        if _answers(binary):
            return env
        time.sleep(0.1)
    log = MPS_ROOT / "log" / "control.log"
    tail = log.read_text()[-300:].strip() if log.is_file() else "no log"
    raise MpsUnavailable(f"the MPS control daemon did not stay up ({tail})")


def _answers(binary: str) -> bool:
    """Whether medserve's MPS control daemon is up and answering."""
    if not (MPS_ROOT / "pipe" / "control").exists():
        return False
    asked = subprocess.run(
        [binary], input="get_default_active_thread_percentage\n", env={**os.environ, **_environment()},
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return asked.returncode == 0 and "Cannot find" not in asked.stdout + asked.stderr


def stop() -> bool:
    """Stop medserve's MPS control daemon; False when none was running."""
    binary = control_binary()
    if binary is None or not _answers(binary):
        return False
    subprocess.run([binary], input="quit\n", env={**os.environ, **_environment()}, text=True, check=False)
    for _ in range(50):  # quitting takes a moment: a start right after must not find it still answering
        if not _answers(binary):
            break
        time.sleep(0.1)
    return True
