"""Slide regions decoded on the GPU: the file's JPEG tiles, batched, by nvImageCodec or torchvision's nvJPEG.

A tile-model replica on a GPU reads a work unit's region as raw JPEG tiles (cheap: a pread each) and
decodes them all in one batch on the GPU, so the CPU, which would decode some 2,000 tiles a second a core,
is out of the way; the pixels stay on the GPU for the model (never sent to another deployment).
Levels that are not JPEG are read by the slide's own reader and uploaded.

The decoder (``wsi.gpu_jpeg_decoder``, ``serve_app.config.GpuJpegDecoder``):

- ``hardware``: nvImageCodec on the GPU's JPEG engines (NVJPG; 7 on an H100), the CPU only parses; the pixels are
  libjpeg-turbo's;
- ``hybrid``: nvImageCodec with Huffman decoding on the CPU, the rest on the GPU;
- ``torchvision``: torchvision's nvJPEG (Huffman decoding on the CPU, one call at a time in a process).

nvImageCodec's CUDA-only backend (``GPU_ONLY``) is not offered: with nvImageCodec 0.9 on an H100 it decoded none
of a slide's tiles in any configuration tried. ``benchmarks/decode.py`` measures each decoder (tiles/s, CPU time a
tile, grey levels from libjpeg-turbo's pixels) and probes that backend again.
"""

from __future__ import annotations

import threading

import torch

from serve_app.config import GpuJpegDecoder
from serve_app.errors import InvalidSlide
from serve_app.wsi.slides import JpegTile, Slide, SlideLevel, TiffSlide

__all__ = ["CudaRegions", "decode_jpeg_tiles"]

# One nvJPEG handle per process in torchvision: a replica's reader threads take turns (each call is a batch).
_TORCHVISION_LOCK = threading.Lock()


class CudaRegions:
    """``read_region`` of a slide, as (height, width, 3) uint8 RGB tensors on ``device``.

    Has what ``serve_app.wsi.tiling.read_tile_block`` uses of a ``Slide``: ``levels`` and ``read_region``.

    Usage::

        regions = CudaRegions(open_slide(path), torch.device("cuda"))
        tiles = read_tile_block(regions, grid, rows, cols)   # (r, c, T, T, 3) uint8 on the GPU
    """

    def __init__(self, slide: Slide, device: torch.device, decoder: GpuJpegDecoder = "torchvision"):
        self.slide, self.device, self.decoder = slide, device, decoder
        self.levels: tuple[SlideLevel, ...] = slide.levels

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> torch.Tensor:
        """(height, width, 3) uint8 RGB on the device; (x, y) the top-left in the level's pixels; outside is white."""
        tiles = self.slide.jpeg_tiles(level, x, y, width, height) if isinstance(self.slide, TiffSlide) else None
        if tiles is None:
            return torch.from_numpy(self.slide.read_region(level, x, y, width, height)).to(self.device)
        out = torch.full((height, width, 3), 255, dtype=torch.uint8, device=self.device)
        if not tiles:
            return out
        images = decode_jpeg_tiles(tiles, self.device, self.decoder)
        lv = self.levels[level]
        x1, y1 = min(x + width, lv.width), min(y + height, lv.height)
        mosaic = self._mosaic(tiles, images, lv)
        if mosaic is not None:  # every tile there and whole: one copy, not one per tile
            left, top, pixels = mosaic
            a0, b0 = max(x, left), max(y, top)
            out[b0 - y : y1 - y, a0 - x : x1 - x] = pixels[b0 - top : y1 - top, a0 - left : x1 - left]
            return out
        for tile, image in zip(tiles, images, strict=True):  # image: (tile_height, tile_width, 3)
            a0, a1 = max(tile.left, x), min(tile.left + image.shape[1], x1)
            b0, b1 = max(tile.top, y), min(tile.top + image.shape[0], y1)
            if a0 < a1 and b0 < b1:
                out[b0 - y : b1 - y, a0 - x : a1 - x] = image[
                    b0 - tile.top : b1 - tile.top, a0 - tile.left : a1 - tile.left
                ]
        return out

    @staticmethod
    def _mosaic(tiles, images, level: SlideLevel) -> tuple[int, int, torch.Tensor] | None:
        """The decoded tiles as one (H, W, 3) image and its top-left, when they form a full rectangle of
        whole tiles (the usual case: regions are read aligned to the file's tiles); else None."""
        tw, th = level.tile_width, level.tile_height
        lefts, tops = sorted({t.left for t in tiles}), sorted({t.top for t in tiles})
        if len(tiles) != len(lefts) * len(tops) or any(tuple(i.shape) != (th, tw, 3) for i in images):
            return None
        if lefts != list(range(lefts[0], lefts[0] + tw * len(lefts), tw)) or tops != list(
            range(tops[0], tops[0] + th * len(tops), th)
        ):
            return None
        stacked = torch.stack(images).view(len(tops), len(lefts), th, tw, 3)  # tiles come row by row
        return lefts[0], tops[0], stacked.permute(0, 2, 1, 3, 4).reshape(len(tops) * th, len(lefts) * tw, 3)


def decode_jpeg_tiles(tiles: list[JpegTile], device: torch.device, decoder: GpuJpegDecoder) -> list[torch.Tensor]:
    """Each tile's JPEG stream decoded on ``device`` by ``decoder``: (height, width, 3) uint8 RGB tensors there.
    Raises ``InvalidSlide`` for a stream that does not decode (a damaged file)."""
    if decoder == "torchvision":
        import torchvision  # on GPU machines only: the CPU install has no torchvision

        streams = [torch.frombuffer(bytearray(tile.stream), dtype=torch.uint8) for tile in tiles]
        try:
            with _TORCHVISION_LOCK:
                images = torchvision.io.decode_jpeg(streams, mode=torchvision.io.ImageReadMode.RGB, device=device)
        except RuntimeError:
            raise InvalidSlide("a JPEG tile of the slide cannot be decoded: the file is damaged") from None
        return [image.permute(1, 2, 0) for image in images]
    nvimgcodec, batch_decoder, params = _nvimgcodec_decoder(decoder, device.index or 0)
    with torch.cuda.device(device):
        images = batch_decoder.decode(
            [nvimgcodec.CodeStream(tile.stream) for tile in tiles],
            params=params,
            cuda_stream=torch.cuda.current_stream(device).cuda_stream,
        )
    if any(image is None for image in images):
        raise InvalidSlide("a JPEG tile of the slide cannot be decoded: the file is damaged")
    return [torch.from_dlpack(image) for image in images]


# nvImageCodec's backend for each decoder.
_BACKENDS = {"hardware": "HW_GPU_ONLY", "hybrid": "HYBRID_CPU_GPU"}


# nvImageCodec's decoders are not to be called from several threads at once: with one shared by a replica's reader
# threads, nvImageCodec 0.9 freed a decode state twice and the replica died (SIGABRT or SIGSEGV in initState).
_THREAD_DECODERS = threading.local()


def _nvimgcodec_decoder(decoder: GpuJpegDecoder, device_index: int):
    """(nvimgcodec, its Decoder for ``decoder`` on GPU ``device_index``, decode parameters): one a thread, made on
    its first use there."""
    decoders = _THREAD_DECODERS.__dict__.setdefault("decoders", {})
    if (decoder, device_index) not in decoders:
        decoders[decoder, device_index] = _new_nvimgcodec_decoder(decoder, device_index)
    return decoders[decoder, device_index]


def _new_nvimgcodec_decoder(decoder: GpuJpegDecoder, device_index: int):
    from nvidia import nvimgcodec  # the gpu extra

    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, _BACKENDS[decoder]))]
    # Chroma upsampled by interpolation, as libjpeg-turbo does it (the CPU readers' pixels), not by repetition.
    batch_decoder = nvimgcodec.Decoder(device_id=device_index, backends=backends, options=":fancy_upsampling=1")
    return nvimgcodec, batch_decoder, nvimgcodec.DecodeParams(color_spec=nvimgcodec.ColorSpec.SRGB)
