"""NVIDIA MPS for replicas that share a GPU: started, checked and stopped where the node has it, refused in one
clear line where it has not (CI's machines: no GPU)."""

import pytest

from serve_app import mps


def test_mps_starts_answers_and_stops_or_says_why_it_cannot():
    if mps.control_binary() is None:
        with pytest.raises(mps.MpsUnavailable, match="no NVIDIA GPU tools"):
            mps.start()
        assert mps.stop() is False  # nothing to stop
        return
    env = mps.start()  # a GPU node: the daemon must come up and answer
    assert env["CUDA_MPS_PIPE_DIRECTORY"].startswith(str(mps.MPS_ROOT))
    assert mps.start() == env  # already running: the same environment, no second daemon
    assert mps.stop() is True
    assert mps.stop() is False
