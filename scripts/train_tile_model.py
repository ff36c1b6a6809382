"""Train the embedded H&E tile classifier (normal / tumour) on synthetic tiles and write its weights.

    python scripts/train_tile_model.py            # ~10-15 min on 2 CPU cores

Tiles come from ``serve_app.samples.synthetic_tissue`` in groups, each group from its own seed (its own
nucleus shapes, fibre directions and stains), so that the network learns the classes rather than one
seed's look. On top, every batch is flipped, turned and stain-jittered in haematoxylin / eosin / residual
space (Tellez et al., 2018), with brightness and contrast jitter, for real slides' colours.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from serve_app.samples.synthetic_slides import he_region
from serve_app.samples.synthetic_tissue import REFERENCE_STAIN, make_training_tiles
from serve_app.samples.tile_network import (
    TILE_SIZE,
    WEIGHTS_PATH,
    normalise,
    tile_network,
    tiles_to_input,
    tumour_probability,
)


def training_seeds(seed: int, groups: int) -> list[int]:
    """The seeds the training tiles are drawn from; tests draw theirs elsewhere."""
    return [seed * 100 + g for g in range(groups)]


def validation_seed(seed: int) -> int:
    return seed * 100 + 99


def _stain_matrix() -> torch.Tensor:
    """Rows: haematoxylin, eosin and a residual OD vector orthogonal to both: (3, 3), OD = concentrations @ it."""
    h, e = np.asarray(REFERENCE_STAIN.haematoxylin_od), np.asarray(REFERENCE_STAIN.eosin_od)
    residual = np.cross(h, e)
    return torch.tensor(np.stack([h, e, residual / np.linalg.norm(residual)]), dtype=torch.float32)


RGB_FROM_HER = _stain_matrix()
HER_FROM_RGB = torch.linalg.inv(RGB_FROM_HER)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, H, W) float32 RGB in [0, 1], flipped, turned and colour-jittered tile by tile; same shape."""
    n = images.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    images = torch.rot90(images, int(torch.randint(4, (1,), generator=generator)), dims=(2, 3))
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(n, 1, 1, 1), images.flip(3), images)

    # Stain concentrations scaled and shifted per stain: what differs between labs' staining.
    od = -torch.log(images.clamp_min(1 / 255))
    stains = torch.einsum("nchw,cs->nshw", od, HER_FROM_RGB)
    stains = stains * uniform(0.7, 1.3, 3, 1, 1) + uniform(-0.08, 0.08, 3, 1, 1)
    images = torch.exp(-torch.einsum("nshw,sc->nchw", stains, RGB_FROM_HER))

    # Scanner exposure and contrast.
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean * uniform(0.85, 1.15, 1, 1, 1)
    return images.clamp_(0, 1)


def synthetic_tiles(seeds: list[int], per_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 224, 224, 3) uint8 RGB tiles and (N,) int64 labels, ``per_seed`` from each seed."""
    groups = [make_training_tiles(per_seed, seed=s, size=TILE_SIZE) for s in seeds]
    return np.concatenate([g[0] for g in groups]), np.concatenate([g[1] for g in groups])


def accuracy(network: torch.nn.Module, tiles: np.ndarray, labels: np.ndarray) -> float:
    network.eval()
    return float(((tumour_probability(network, tiles) > 0.5) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=12, help="seeds the training tiles come from")
    parser.add_argument("--tiles-per-group", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    tiles, labels = synthetic_tiles(training_seeds(args.seed, args.groups), args.tiles_per_group)
    val_tiles, val_labels = synthetic_tiles([validation_seed(args.seed)], 256)
    print(
        f"{len(tiles)} training tiles ({labels.mean():.0%} tumour), {len(val_tiles)} validation tiles, "
        f"{time.time() - start:.0f}s",
        flush=True,
    )

    network = tile_network().to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
    optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = len(tiles) // args.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    targets = torch.from_numpy(labels)
    for epoch in range(1, args.epochs + 1):
        network.train()
        order = torch.randperm(len(tiles), generator=generator)
        for step in range(steps_per_epoch):
            picks = order[step * args.batch : (step + 1) * args.batch]
            images = augment(tiles_to_input(tiles[picks.numpy()]), generator)
            logits = network(normalise(images).contiguous(memory_format=torch.channels_last))
            loss = loss_fn(logits, targets[picks])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            if step % 20 == 0:
                print(
                    f"epoch {epoch} step {step}/{steps_per_epoch} loss {loss.item():.4f} {time.time() - start:.0f}s",
                    flush=True,
                )
        print(
            f"epoch {epoch}: validation accuracy {accuracy(network, val_tiles, val_labels):.3f} "
            f"{time.time() - start:.0f}s",
            flush=True,
        )

    network = network.to(memory_format=torch.contiguous_format)
    WEIGHTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), WEIGHTS_PATH)
    # The real H&E region has no labels: its scores only show that the network answers on real colours.
    real = he_region()[:TILE_SIZE, :TILE_SIZE][None]
    print(f"real H&E region: P(tumour) {tumour_probability(network.eval(), real)[0]:.3f}")
    print(f"wrote {WEIGHTS_PATH} ({WEIGHTS_PATH.stat().st_size / 1024:.0f} KiB) in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
