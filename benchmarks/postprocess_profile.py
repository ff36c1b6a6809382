"""Where postprocessing's time goes at full size, step by step, on this machine's device: the whole
image grid (as medserve did before) beside the foreground's box (as it does now), on the same logits.

    python -m benchmarks.postprocess_profile
"""

import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from serve_app.results import ResultStore
from serve_app.segmentation.transforms import (
    foreground_box,
    keep_largest_component,
    label_volumes_ml,
    resample_to_grid,
    to_labels,
    to_probabilities,
)
from serve_app.studies.volume import shifted_affine, voxel_volume_ml


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, model_grid = (512, 512, 300), (224, 224, 224)
    grid_affine = np.diag([-0.8, -0.8, 1.0, 1.0])
    model_affine = np.diag([-0.8 * 512 / 224, -0.8 * 512 / 224, 300 / 224, 1.0])
    logits = torch.randn((2, *model_grid), device=device)
    logits[0] += 6  # background but for the organ, and a few hundred stray voxels
    logits[1, 60:110, 80:140, 70:130] += 8  # a spleen-sized organ: about 115 x 137 x 80 image voxels
    store = ResultStore(Path(tempfile.mkdtemp()), retention_hours=1)
    totals = {}

    def timed(path, name, fn):
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1000
        totals[path] = totals.get(path, 0.0) + elapsed
        print(f"{path:6s} {name:24s} {elapsed:8.1f} ms", flush=True)
        return out

    for path in ("whole", "box"):
        probabilities = timed(path, "softmax", lambda: to_probabilities(logits))
        start, target_shape = (0, 0, 0), shape
        if path == "box":
            organ = timed(
                path, "largest comp. (model)", lambda: keep_largest_component(to_labels(probabilities), [1])[0] > 0
            )
            box = timed(path, "foreground box", lambda: foreground_box(organ, model_affine, grid_affine, shape))
            start, target_shape = tuple(b.start for b in box), [b.stop - b.start for b in box]
        target_affine = shifted_affine(grid_affine, start)
        resampled = timed(
            path, "resample to grid", lambda: resample_to_grid(probabilities, model_affine, target_affine, target_shape)
        )
        labels = timed(path, "argmax", lambda: to_labels(resampled))
        largest = timed(path, "largest component", lambda: keep_largest_component(labels, [1]))
        mask = timed(path, "to uint8", lambda: largest[0].to(torch.uint8))
        timed(path, "volumes (bincount)", lambda: label_volumes_ml(mask, [1], voxel_volume_ml(grid_affine)))
        host = timed(path, "copy to host", lambda: mask.cpu().numpy())
        timed(path, "save result", lambda: store.save(uuid.uuid4().hex, host, start, shape, grid_affine, {}))
        print(
            f"{path:6s} {'total':24s} {totals[path]:8.1f} ms   ({'x'.join(map(str, host.shape))} voxels)\n", flush=True
        )
    print(f"box / whole: {totals['box'] / totals['whole']:.3f}")


if __name__ == "__main__":
    main()
