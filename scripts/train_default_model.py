"""Train the embedded default model on synthetic CT phantoms and write its weights.

    python scripts/train_default_model.py            # ~20-35 min on 2 CPU cores

The phantoms go through the model's own preprocessing (serve_app.segmentation.transforms.prepare), so
training sees exactly what serving feeds the network.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from monai.losses import DiceCELoss

from serve_app.config import EMBEDDED_MODEL_REPOSITORY
from serve_app.engines.torch_engine import monai_network
from serve_app.model_spec import IntensityWindowSpec, read_model_spec
from serve_app.samples.phantoms import Phantom, ct_phantom
from serve_app.segmentation.transforms import to_model_input
from serve_app.studies.volume import Volume

MODEL = "ct-phantom-organ"


def random_phantom(rng: np.random.Generator) -> Phantom:
    """Phantoms of varied size and spacing, as different scanners and protocols give."""
    n = int(rng.choice([96, 128, 160]))
    slices = int(rng.integers(24, 64))
    inplane = float(rng.uniform(2.2, 3.6)) * 128 / n
    return ct_phantom(rng, shape=(n, n, slices), spacing=(inplane, inplane, float(rng.uniform(3.0, 6.0))))


def training_pair(phantom: Phantom, spec) -> tuple[torch.Tensor, torch.Tensor]:
    image = to_model_input(phantom.volume, spec.preprocessing)
    label = Volume(array=phantom.label.astype(np.float32), affine=phantom.volume.affine)
    # The label goes through the same geometry (the window leaves 0/1 alone) and is re-binarised.
    label_spec = spec.preprocessing.model_copy(update={"intensity_window": IntensityWindowSpec(a_min=0, a_max=1)})
    target = (to_model_input(label, label_spec) > 0.5).float()
    return image.as_tensor(), target.as_tensor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    spec = read_model_spec(EMBEDDED_MODEL_REPOSITORY / MODEL / "model.yaml")
    network = monai_network(spec)
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=args.steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    # A pool of phantoms, refreshed a little every step: generating is cheaper than training.
    pool = [training_pair(random_phantom(rng), spec) for _ in range(64)]
    start = time.time()
    for step in range(1, args.steps + 1):
        pool[int(rng.integers(len(pool)))] = training_pair(random_phantom(rng), spec)
        picks = rng.choice(len(pool), args.batch, replace=False)
        images = torch.stack([pool[i][0] for i in picks])
        targets = torch.stack([pool[i][1] for i in picks])
        loss = loss_fn(network(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 50 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)

    weights = spec.folder / spec.weights.file
    torch.save(network.state_dict(), weights)
    print(f"wrote {weights} ({weights.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
