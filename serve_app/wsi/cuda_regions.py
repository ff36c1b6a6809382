"""Slide regions decoded on the GPU: the file's JPEG tiles through nvJPEG (torchvision), batched.

A tile-model replica on a GPU reads a work unit's region as raw JPEG tiles (cheap: a pread each) and
decodes them all in one ``torchvision.io.decode_jpeg(..., device="cuda")`` call, so the CPU, which would
decode some 2,000 tiles a second a core, is out of the way; the pixels stay on the GPU for the model.
Levels that are not JPEG are read by the slide's own reader and uploaded.
"""

from __future__ import annotations

import threading

import torch

from serve_app.errors import InvalidSlide
from serve_app.wsi.slides import Slide, SlideLevel, TiffSlide

__all__ = ["CudaRegions"]

# One nvJPEG handle per process in torchvision: a replica's reader threads take turns (each call is a batch).
_DECODE_LOCK = threading.Lock()


class CudaRegions:
    """``read_region`` of a slide, as (height, width, 3) uint8 RGB tensors on ``device``.

    Has what ``serve_app.wsi.tiling.read_tile_block`` uses of a ``Slide``: ``levels`` and ``read_region``.

    Usage::

        regions = CudaRegions(open_slide(path), torch.device("cuda"))
        tiles = read_tile_block(regions, grid, rows, cols)   # (r, c, T, T, 3) uint8 on the GPU
    """

    def __init__(self, slide: Slide, device: torch.device):
        self.slide, self.device = slide, device
        self.levels: tuple[SlideLevel, ...] = slide.levels

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> torch.Tensor:
        """(height, width, 3) uint8 RGB on the device; (x, y) the top-left in the level's pixels; outside is white."""
        tiles = self.slide.jpeg_tiles(level, x, y, width, height) if isinstance(self.slide, TiffSlide) else None
        if tiles is None:
            return torch.from_numpy(self.slide.read_region(level, x, y, width, height)).to(self.device)
        out = torch.full((height, width, 3), 255, dtype=torch.uint8, device=self.device)
        if not tiles:
            return out
        import torchvision  # on GPU machines only: the CPU install has no torchvision

        streams = [torch.frombuffer(bytearray(tile.stream), dtype=torch.uint8) for tile in tiles]
        try:
            with _DECODE_LOCK:
                images = torchvision.io.decode_jpeg(streams, mode=torchvision.io.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            raise InvalidSlide("a JPEG tile of the slide cannot be decoded: the file is damaged") from None
        lv = self.levels[level]
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        mosaic = self._mosaic(tiles, images, lv)
        if mosaic is not None:  # every tile there and whole: one copy, not one per tile
            left, top, pixels = mosaic
            a0, b0 = max(x, left), max(y, top)
            out[b0 - y : y1 - y, a0 - x : x1 - x] = pixels[b0 - top : y1 - top, a0 - left : x1 - left]
            return out
        for tile, image in zip(tiles, images, strict=True):  # image: (3, tile_height, tile_width)
            a0, a1 = max(tile.left, x), min(tile.left + image.shape[2], x1)
            b0, b1 = max(tile.top, y), min(tile.top + image.shape[1], y1)
            if a0 < a1 and b0 < b1:
                patch = image[:, b0 - tile.top : b1 - tile.top, a0 - tile.left : a1 - tile.left]
                out[b0 - y : b1 - y, a0 - x : a1 - x] = patch.permute(1, 2, 0)
        return out

    @staticmethod
    def _mosaic(tiles, images, level: SlideLevel) -> tuple[int, int, torch.Tensor] | None:
        """The decoded tiles as one (H, W, 3) image and its top-left, when they form a full rectangle of
        whole tiles (the usual case: regions are read aligned to the file's tiles); else None."""
        tw, th = level.tile_width, level.tile_height
        lefts, tops = sorted({t.left for t in tiles}), sorted({t.top for t in tiles})
        if len(tiles) != len(lefts) * len(tops) or any(tuple(i.shape) != (3, th, tw) for i in images):
            return None
        if lefts != list(range(lefts[0], lefts[0] + tw * len(lefts), tw)) or tops != list(
            range(tops[0], tops[0] + th * len(tops), th)
        ):
            return None
        stacked = torch.stack(images).view(len(tops), len(lefts), 3, th, tw)  # tiles come row by row
        return lefts[0], tops[0], stacked.permute(0, 3, 1, 4, 2).reshape(len(tops) * th, len(lefts) * tw, 3)
