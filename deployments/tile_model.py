"""TileModelDeployment: a tile classifier's replicas, which WSI jobs feed with work units.

A replica reads each unit's region itself (from the shared slide storage) and sends back only
probabilities, so pixels never travel between processes. On a GPU the file's JPEG tiles are decoded
there (nvJPEG, ``serve_app/wsi/cuda_regions.py``); elsewhere by the slide reader's CPU threads. Reading
runs on a thread pool and the model on one thread of its own, so while one unit is classified the next
ones are read and decoded: with Serve's ``max_ongoing_requests`` of 4, up to three units are being read
while one runs on the device. Autoscaling (``deployments.tile_model``) follows the jobs' backlog of
units, from 0 replicas when no job runs.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from deployments.replica import Replica
from serve_app.config import AppConfig
from serve_app.engines.devices import replica_device
from serve_app.model_repository import ModelSpec
from serve_app.stopwatch import Stopwatch
from serve_app.wsi.cuda_regions import CudaRegions
from serve_app.wsi.slides import Slide, open_slide
from serve_app.wsi.tile_classifier import TileClassifier
from serve_app.wsi.tiling import read_tile_block
from serve_app.wsi.work_units import ChunkProbabilities, SlideSource, TileChunk

__all__ = ["TileModelDeployment"]

_OPEN_SLIDES = 8  # slides a replica keeps open: a job's slides in flight, and some


@serve.deployment(name="TileModel")
class TileModelDeployment(Replica):
    def __init__(self, spec: ModelSpec, config: AppConfig):
        self.classifier = TileClassifier(spec, replica_device())
        self.readers = ThreadPoolExecutor(config.wsi.read_threads, thread_name_prefix="read")
        self.device_thread = ThreadPoolExecutor(1, thread_name_prefix="infer")  # the device takes one batch at once
        # The replica's GPU decodes the JPEG tiles, where there is one (wsi.gpu_decode), with the decoder
        # wsi.gpu_jpeg_decoder names (nvImageCodec's engines or torchvision's nvJPEG).
        self.gpu_decode = config.wsi.gpu_decode and self.classifier.device.type == "cuda"
        self.gpu_jpeg_decoder = config.wsi.gpu_jpeg_decoder
        self.slides: OrderedDict[tuple[SlideSource, float | None], Slide] = OrderedDict()
        self._slides_lock = threading.Lock()  # reader threads share the open slides

    async def classify(self, chunk: TileChunk) -> ChunkProbabilities:
        """Read one work unit's tiles, classify its tissue tiles; NaN where there is no tissue."""
        loop = asyncio.get_running_loop()
        watch = Stopwatch()
        tiles = await loop.run_in_executor(self.readers, self._read_tissue_tiles, chunk)
        read_s = watch.lap()
        scores = await loop.run_in_executor(self.device_thread, self.classifier, tiles)
        probabilities = np.full(chunk.tissue.shape, np.nan, np.float32)
        probabilities[chunk.tissue] = scores
        return ChunkProbabilities(chunk.chunk_row, chunk.chunk_col, probabilities, read_s, watch.lap())

    def _read_tissue_tiles(self, chunk: TileChunk) -> np.ndarray | torch.Tensor:
        """(n, T, T, 3) uint8 RGB: the unit's tissue tiles, in row-major order; on the GPU when decoded there."""
        slide = self._slide(chunk.slide, chunk.mpp)
        if self.gpu_decode:
            regions = CudaRegions(slide, self.classifier.device, self.gpu_jpeg_decoder)
            block = read_tile_block(regions, chunk.grid, chunk.rows, chunk.cols)
            return block[torch.from_numpy(chunk.tissue).to(block.device)]
        return read_tile_block(slide, chunk.grid, chunk.rows, chunk.cols)[chunk.tissue]

    def _slide(self, path: SlideSource, mpp: float | None) -> Slide:
        key = (path, mpp)
        with self._slides_lock:
            if key in self.slides:
                self.slides.move_to_end(key)
                return self.slides[key]
            slide = self.slides[key] = open_slide(path, mpp=mpp)
            while len(self.slides) > _OPEN_SLIDES:
                self.slides.popitem(last=False)[1].close()
            return slide
