import numpy as np
import torch


def replica_device() -> torch.device:
    """The GPU Ray gave this replica (it sees only its own), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A tensor on ``device`` from an array that may be a read-only view into Ray's object store."""
    return torch.from_numpy(array if array.flags.writeable else array.copy()).to(device)
