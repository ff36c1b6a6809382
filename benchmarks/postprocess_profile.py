"""Where postprocessing's time goes at full size, step by step, on this machine's device.

    python -m benchmarks.postprocess_profile
"""

import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from serve_app.transforms import keep_largest_component, label_volumes_ml, resample_to_grid, to_labels, to_probabilities
from serve_app.results import ResultStore
from serve_app.volume import voxel_volume_ml


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, model_grid = (512, 512, 300), (224, 224, 224)
    grid_affine = np.diag([-0.8, -0.8, 1.0, 1.0])
    model_affine = np.diag([-0.8 * 512 / 224, -0.8 * 512 / 224, 300 / 224, 1.0])
    logits = torch.randn((2, *model_grid), device=device)
    logits[1, 60:160, 60:160, 60:160] += 8

    def timed(name, fn):
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"{name:28s} {(time.perf_counter() - start) * 1000:8.1f} ms", flush=True)
        return out

    probabilities = timed("softmax", lambda: to_probabilities(logits))
    resampled = timed("resample to grid", lambda: resample_to_grid(probabilities, model_affine, grid_affine, shape))
    labels = timed("argmax", lambda: to_labels(resampled))
    largest = timed("largest component", lambda: keep_largest_component(labels, [1]))
    mask = timed("to uint8", lambda: largest[0].to(torch.uint8))
    timed("volumes (bincount)", lambda: label_volumes_ml(mask, [1], voxel_volume_ml(grid_affine)))
    host = timed("copy to host", lambda: mask.cpu().numpy())
    store = ResultStore(Path(tempfile.mkdtemp()), retention_hours=1)
    timed("save result", lambda: store.save(uuid.uuid4().hex, host, grid_affine, {}))


if __name__ == "__main__":
    main()
