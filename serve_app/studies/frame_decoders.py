"""A series' compressed DICOM frames decoded all at once, where it is fastest: on the GPU, in worker processes, or in
the replica.

- **GPU** (nvImageCodec, ``pip install medserve[gpu]``; a replica that has one): JPEG 2000, HTJ2K and JPEG lossless
  frames go to the GPU in one batch (nvJPEG2000, nvJPEG) and come back as host memory; the result is a numpy array
  like the other paths', so nothing on the GPU crosses a deployment boundary.
- **Processes** (the replica's ``HeaderProcesses``): pylibjpeg's OpenJPEG and RLE decoders hold the GIL, so threads
  decode one frame at a time; the frames are split into one run a process instead.
- **In the replica**: pydicom's decoders in threads, one a core (imagecodecs' JPEG decoder releases the GIL). The
  fallback wherever the others are not there, and for a GPU batch nvImageCodec cannot decode whole.

The lossless paths are voxel-identical (``tests/test_frame_decoders.py``, ``tests/test_gpu_decode.py``); the
figures behind the choice are in ``benchmarks/decode.py``'s JSON.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom import uid
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder

from serve_app.errors import InvalidStudy
from serve_app.studies import transfer_syntaxes
from serve_app.studies.header_processes import HeaderProcesses

__all__ = ["GPU_SYNTAXES", "FrameDecoder", "FramePixels", "decode_frames"]

logger = logging.getLogger(__name__)

# "auto": the GPU for its syntaxes where this process has one, else the processes when given, else in the replica.
FrameDecoder = Literal["auto", "gpu", "processes", "in_process"]

# What nvImageCodec decodes on the GPU. RLE has no GPU decoder there; JPEG baseline/extended are lossy and rare in
# CT and MR, and 12-bit extended JPEG is beyond nvJPEG. JPEG lossless stays on the CPU: nvImageCodec 0.9 decoded a
# smooth 512x512 CT series voxel for voxel but gave wrong values for small noisy 16-bit frames (96x80, on an H100),
# and a decoder that is right only on some frames is not used.
GPU_SYNTAXES = frozenset(
    {
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
    }
)


@dataclass(frozen=True)
class FramePixels:
    """The stored values of each frame of one grey-scale series (its Image Pixel module)."""

    rows: int
    columns: int
    bits_allocated: int  # 8, 16 or 32
    bits_stored: int
    pixel_representation: int  # 0: unsigned, 1: two's complement
    photometric_interpretation: str = "MONOCHROME2"

    @property
    def dtype(self) -> np.dtype:
        """The numpy type pydicom's decoders give these values: ``<i2`` for CT's signed 16 bits."""
        return np.dtype(f"<{'i' if self.pixel_representation else 'u'}{self.bits_allocated // 8}")


def decode_frames(
    frames: Sequence[bytes],
    syntax: str,
    pixels: FramePixels,
    processes: HeaderProcesses | None = None,
    *,
    decoder: FrameDecoder = "auto",
) -> np.ndarray:
    """The stored values of ``frames`` (each one frame's encoded bytes, as encapsulated in ``syntax``):
    (len(frames), rows, columns) of ``pixels.dtype``, in host memory.

    ``processes``: the replica's worker processes, for decoders that hold the GIL. ``decoder`` forces one path
    (benchmarks, tests); ``"gpu"`` raises ``ValueError`` where there is no GPU decoder for ``syntax``.
    Raises ``InvalidStudy`` (422) for a frame that cannot be decoded, or decodes to another size.
    """
    where = _chosen(decoder, syntax, processes)
    start = time.perf_counter()
    stored = _decode_on_gpu(frames, syntax, pixels) if where == "gpu" else None
    if where == "gpu" and stored is None:
        logger.warning("nvImageCodec could not decode every frame: decoding the series on the CPU")
        where = "processes" if processes is not None else "in_process"
    if stored is None:
        stored = _decode_on_cpu(frames, syntax, pixels, processes if where == "processes" else None)
    logger.info(
        "decoded %d frames of %s (%s) in %.0f ms",
        len(frames),
        transfer_syntaxes.describe(syntax),
        where,
        (time.perf_counter() - start) * 1000,
    )
    return stored


def _chosen(decoder: FrameDecoder, syntax: str, processes: HeaderProcesses | None) -> str:
    if decoder == "gpu" and not (syntax in GPU_SYNTAXES and _gpu_decoder() is not None):
        raise ValueError(f"no GPU decoder for {transfer_syntaxes.describe(syntax)} in this process")
    if decoder == "processes" and processes is None:
        raise ValueError("the processes decoder needs the replica's processes")
    if decoder != "auto":
        return decoder
    if syntax in GPU_SYNTAXES and _gpu_decoder() is not None:
        return "gpu"
    return "processes" if processes is not None else "in_process"


def _decode_on_cpu(
    frames: Sequence[bytes], syntax: str, pixels: FramePixels, processes: HeaderProcesses | None
) -> np.ndarray:
    """pydicom's decoders: in ``processes``' runs of consecutive frames, else in threads of this process."""
    decode = functools.partial(_decoded_runs, syntax=syntax, pixels=pixels)
    try:
        if processes is not None:
            runs = processes.map(decode, list(frames))
        else:
            count = max(1, min(len(frames), os.cpu_count() or 1))
            bounds = [len(frames) * i // count for i in range(count + 1)]
            with ThreadPoolExecutor(count, thread_name_prefix="frame-decode") as pool:
                parts = pool.map(decode, [frames[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
                runs = [run for part in parts for run in part]
    except InvalidStudy:
        raise
    except Exception as e:  # pydicom raises many types for pixel data it cannot decode
        raise InvalidStudy(f"the pixel data cannot be decoded ({transfer_syntaxes.describe(syntax)})") from e
    return np.concatenate(runs) if len(runs) > 1 else runs[0]


def _decoded_runs(frames: list[bytes], *, syntax: str, pixels: FramePixels) -> list[np.ndarray]:
    """``frames`` decoded by pydicom: one (len(frames), rows, columns) array, in a list (``HeaderProcesses.map``
    joins its runs' lists). Runs in a worker process too."""
    array, _ = get_decoder(syntax).as_array(
        encapsulate(list(frames)),
        rows=pixels.rows,
        columns=pixels.columns,
        samples_per_pixel=1,
        bits_allocated=pixels.bits_allocated,
        bits_stored=pixels.bits_stored,
        pixel_representation=pixels.pixel_representation,
        photometric_interpretation=pixels.photometric_interpretation,
        number_of_frames=len(frames),
        pixel_keyword="PixelData",
    )
    return [array.astype(pixels.dtype, copy=False).reshape(len(frames), pixels.rows, pixels.columns)]


class _GpuDecoder:
    """nvImageCodec's decoder on this process's current GPU, its CUDA and GPU-only backends (no CPU fallback inside
    it: ``decode_frames`` falls back to pydicom's decoders, whose results are the reference). One call at a time."""

    def __init__(self):
        from nvidia import nvimgcodec

        self._nvimgcodec = nvimgcodec
        self._decoder = nvimgcodec.Decoder(
            backends=[nvimgcodec.Backend(nvimgcodec.GPU_ONLY), nvimgcodec.Backend(nvimgcodec.HYBRID_CPU_GPU)]
        )
        # Stored values as they are: no scaling to 8 bits, no colour conversion.
        self._params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)
        self._lock = threading.Lock()

    def decode(self, frames: Sequence[bytes], pixels: FramePixels) -> np.ndarray | None:
        codestreams = [self._nvimgcodec.CodeStream(bytes(frame)) for frame in frames]
        with self._lock:
            images = self._decoder.decode(codestreams, params=self._params)
            if any(image is None for image in images):
                return None
            hosts = [np.asarray(image.cpu()) for image in images]
        out = np.empty((len(frames), pixels.rows, pixels.columns), pixels.dtype)
        for k, host in enumerate(hosts):
            if host.shape[:2] != out.shape[1:] or host.size != out[k].size:
                raise InvalidStudy(
                    f"a frame decodes to {host.shape[1]}x{host.shape[0]} pixels, not its Columns x Rows "
                    f"{pixels.columns}x{pixels.rows}"
                )
            plane = host.reshape(out.shape[1:])
            out[k] = plane.view(out.dtype) if plane.dtype.itemsize == out.itemsize else plane
        unused = out.itemsize * 8 - pixels.bits_stored
        if pixels.pixel_representation and unused > 0:
            # A JPEG codestream holds the bits_stored bits unsigned; their sign is extended as pydicom does.
            np.left_shift(out, unused, out=out)
            np.right_shift(out, unused, out=out)
        return out


@functools.cache
def _gpu_decoder() -> _GpuDecoder | None:
    """This process's GPU decoder; None where nvImageCodec or a GPU is missing (checked once a process)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return _GpuDecoder()
    except Exception as e:  # ImportError without the gpu extra; a driver or library nvImageCodec cannot load
        logger.info("no GPU frame decoder in this process: %s", e)
        return None


def _decode_on_gpu(frames: Sequence[bytes], syntax: str, pixels: FramePixels) -> np.ndarray | None:
    """The frames decoded on the GPU; None when nvImageCodec leaves any undecoded."""
    try:
        return _gpu_decoder().decode(frames, pixels)
    except InvalidStudy:
        raise
    except Exception as e:  # nvImageCodec's own errors (a corrupt codestream, a CUDA failure)
        logger.warning("nvImageCodec failed on %s: %s", transfer_syntaxes.describe(syntax), e)
        return None
