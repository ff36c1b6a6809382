"""Image decoding, every backend side by side in one run:

1. WSI JPEG tiles (256² file tiles of a synthetic slide, as ``TiffSlide.jpeg_tiles`` gives them): tiles/s and CPU
   µs a tile for nvImageCodec's hardware engines, its CUDA decoder, both together, its hybrid decoder, torchvision's
   nvJPEG and libjpeg-turbo (imagecodecs) on CPU threads; each GPU decoder's grey-level difference from libjpeg-turbo;
2. a CT series (512² 16-bit frames) in each transfer syntax: ms to decode all its frames in the replica
   (threads), in worker processes and on the GPU (``serve_app.studies.frame_decoders``), voxel-identity with
   pydicom's decode of the uncompressed frames; and the whole reader (``read_dicom_series``) on its automatic choice.

    python -m benchmarks.decode --slices 60                  # this CPU machine: the GPU parts reported as not run
    python -m benchmarks.decode --out DIR                     # the GPU machine: 300 slices

Writes ``decode-<device>-<date>.json``. A part that cannot run here (no GPU, a decoder that will not start) is
recorded with the reason, never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import imagecodecs
import numpy as np
import torch
from pydicom import uid

from serve_app.samples.encoded_frames import encode_frame
from serve_app.studies.frame_decoders import FramePixels, decode_frames
from serve_app.studies.header_processes import HeaderProcesses

ROUNDS = 4  # passes over the slide's tiles a GPU decoder is timed on
GPU_JPEG_DECODERS = ("hardware", "hybrid", "torchvision")
SYNTAXES = {
    "uncompressed": uid.ExplicitVRLittleEndian,
    "rle": uid.RLELossless,
    "jpeg_lossless": uid.JPEGLosslessSV1,
    "jpeg2000_lossless": uid.JPEG2000Lossless,
    "htj2k_lossless": uid.HTJ2KLossless,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--slices", type=int, default=300, help="frames of the CT series")
    parser.add_argument("--slide-side", type=int, default=8192, help="the synthetic slide's side, pixels")
    parser.add_argument("--batch", type=int, default=256, help="JPEG tiles a GPU decode call takes (a work unit)")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else f"CPU {os.cpu_count()} cores"
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    work = Path(tempfile.mkdtemp(prefix="medserve-decode-"))
    report = {
        "device": device,
        "date": date,
        "settings": {
            "cpu_cores": os.cpu_count(),
            "slices": args.slices,
            "slide_side": args.slide_side,
            "tile": 256,
            "gpu_batch": args.batch,
        },
        "versions": _versions(),
        "wsi_tiles": wsi_tiles(work, args.slide_side, args.batch, gpu),
        "dicom_series": dicom_series(work, args.slices, gpu),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-{device.replace(' ', '_')}-{date}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")


def _versions() -> dict:
    versions = {"torch": torch.__version__, "imagecodecs": imagecodecs.__version__}
    try:
        from nvidia import nvimgcodec

        versions["nvimgcodec"] = nvimgcodec.__version__
    except Exception as e:  # the gpu extra is not installed here
        versions["nvimgcodec"] = f"not importable: {e}"
    return versions


def wsi_tiles(work: Path, side: int, batch: int, gpu: bool) -> dict:
    """Tiles/s of each decoder on the level-0 JPEG tiles of a synthetic slide, and its pixels against
    libjpeg-turbo's."""
    from serve_app.samples.synthetic_slides import write_slide
    from serve_app.wsi.slides import open_slide

    path = work / "slide.tiff"
    write_slide(path, side, side, tile=256, levels=1)
    with open_slide(path, reader="tifffile") as slide:
        tiles = slide.jpeg_tiles(0, 0, 0, side, side)
        jpegtables = bool(slide._parsed[0].page.jpegtables)  # noqa: SLF001  what the streams were spliced from
    streams = [tile.stream for tile in tiles]
    reference = [imagecodecs.jpeg8_decode(s) for s in streams[:batch]]
    result = {
        "tiles": len(streams),
        "mean_tile_bytes": round(statistics.mean(map(len, streams))),
        "jpegtables_spliced": jpegtables,
        "cpu_threads": _cpu_threads(streams),
    }
    for name in GPU_JPEG_DECODERS:
        result[name] = _gpu_tiles(tiles, batch, name, reference) if gpu else {"not_run": "no CUDA GPU here"}
    if gpu:
        result["cuda_configurations"] = _cuda_configurations(streams[:batch])
    return result


def _cpu_threads(streams: list[bytes]) -> dict:
    """libjpeg-turbo (imagecodecs, which tifffile decodes with) on one thread a core; it releases the GIL."""
    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(imagecodecs.jpeg8_decode, streams[:64]))  # warm
        wall, cpu = time.perf_counter(), time.process_time()
        list(pool.map(imagecodecs.jpeg8_decode, streams))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "threads": threads,
        "tiles_per_s": round(len(streams) / wall),
        "cpu_us_per_tile": round(cpu / len(streams) * 1e6, 1),
    }


def _gpu_tiles(tiles: list, batch: int, decoder: str, reference: list[np.ndarray]) -> dict:
    """One decoder's tiles/s over every tile, in batches of ``batch``, and its first batch's pixels against
    ``reference``."""
    from serve_app.wsi.cuda_regions import decode_jpeg_tiles

    device = torch.device("cuda")
    batches = [tiles[i : i + batch] for i in range(0, len(tiles), batch)]
    try:
        first = decode_jpeg_tiles(batches[0], device, decoder)  # warm: the decoder is made here
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(ROUNDS):
            for part in batches:
                decode_jpeg_tiles(part, device, decoder)
        torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    except Exception as e:  # a decoder that will not start here: recorded, the others still measured
        return {"error": f"{type(e).__name__}: {e}"}
    decoded = len(tiles) * ROUNDS
    difference = np.concatenate(
        [np.abs(i.cpu().numpy().astype(np.int16) - ref).ravel() for i, ref in zip(first, reference, strict=True)]
    )
    return {
        "tiles_per_s": round(decoded / wall),
        "cpu_us_per_tile": round(cpu / decoded * 1e6, 1),
        "max_grey_level_difference": int(difference.max()),
        "mean_grey_level_difference": round(float(difference.mean()), 3),
        "share_within_1_grey_level": round(float((difference <= 1).mean()), 5),
    }


def _cuda_configurations(streams: list[bytes]) -> dict:
    """Whether nvImageCodec's CUDA (GPU_ONLY) decoder starts, and decodes, in a few configurations."""
    from nvidia import nvimgcodec

    found = {}
    for name, backends, options in (
        ("GPU_ONLY", [nvimgcodec.Backend(nvimgcodec.GPU_ONLY)], ""),
        (
            "GPU_ONLY, no hybrid Huffman",
            [nvimgcodec.Backend(nvimgcodec.GPU_ONLY)],
            "nvjpeg_cuda_decoder:hybrid_huffman_threshold=0",
        ),
        ("default backends", None, ""),
    ):
        try:
            decoder = nvimgcodec.Decoder(backends=backends, options=options)
            images = decoder.decode([nvimgcodec.CodeStream(s) for s in streams])
            found[name] = {"decoded": sum(image is not None for image in images), "of": len(streams)}
        except Exception as e:
            found[name] = {"error": f"{type(e).__name__}: {e}"}
    return found


def dicom_series(work: Path, slices: int, gpu: bool) -> dict:
    """ms to decode a CT series' frames in each syntax, by each path, and whether the voxels are pydicom's."""
    from serve_app.config import LimitsConfig
    from serve_app.samples.phantoms import ct_phantom
    from serve_app.samples.study_files import write_ct_series
    from serve_app.studies.dicom_series import read_dicom_series

    volume = ct_phantom(np.random.default_rng(0), shape=(512, 512, slices), spacing=(0.7, 0.7, 1.0)).volume
    plain = write_ct_series(volume, work / "uncompressed")
    pixels = FramePixels(512, 512, 16, 16, 1)
    truth = np.stack([_plain_frame(p) for p in plain])
    limits = LimitsConfig()
    reference = read_dicom_series(plain, limits).array
    all_cores = os.cpu_count() or 1
    default = min(8, all_cores // 4)
    pools = {"processes_all_cores": HeaderProcesses(all_cores)}
    if default >= 2:
        pools["processes_default"] = HeaderProcesses(default)
    for pool in pools.values():
        pool.warm_up()
    result = {"frames": slices, "processes": {"all_cores": all_cores, "default": default}}
    every_core = pools["processes_all_cores"]
    with ProcessPoolExecutor(all_cores) as encoders:
        for name, syntax in SYNTAXES.items():
            entry = result[name] = {}
            if syntax == uid.ExplicitVRLittleEndian:
                entry["reader_ms"], _ = _timed(lambda: read_dicom_series(plain, limits, every_core))
                continue
            frames = list(encoders.map(encode_frame, list(truth), [syntax] * len(truth), chunksize=8))
            entry["mean_frame_bytes"] = round(statistics.mean(map(len, frames)))
            paths = _write_series(plain, frames, syntax, work / name)
            for path_name, decoder, pool in (
                ("in_process", "in_process", None),
                *((key, "processes", pool) for key, pool in pools.items()),
                ("gpu", "gpu", None),
            ):
                if path_name == "gpu" and not gpu:
                    entry[path_name] = {"not_run": "no CUDA GPU here"}
                    continue
                entry[path_name] = _decode_path(frames, syntax, pixels, pool, decoder, truth)
            entry["reader_ms"], read = _timed(lambda p=paths: read_dicom_series(p, limits, every_core))
            entry["reader_voxel_identical"] = bool(np.array_equal(read.array, reference))
    for pool in pools.values():
        pool.close()
    return result


def _decode_path(frames, syntax, pixels, pool, decoder, truth) -> dict:
    try:
        ms, decoded = _timed(lambda: decode_frames(frames, syntax, pixels, pool, decoder=decoder))
    except Exception as e:  # a path that cannot run here: recorded
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ms": ms, "voxel_identical": bool(np.array_equal(decoded, truth))}


def _plain_frame(path: Path) -> np.ndarray:
    import pydicom

    return pydicom.dcmread(path).pixel_array


def _write_series(plain: list[Path], frames: list[bytes], syntax: str, folder: Path) -> list[Path]:
    """The uncompressed series' files again, their pixel data ``frames`` encapsulated in ``syntax``."""
    import pydicom
    from pydicom.encaps import encapsulate

    folder.mkdir()
    paths = []
    for path, frame in zip(plain, frames, strict=True):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].is_undefined_length = True
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / path.name, enforce_file_format=True)
        paths.append(folder / path.name)
    return paths


def _timed(call, repeats: int = 3) -> tuple[float, object]:
    """(ms: the median of up to ``repeats`` calls, one when the first takes over 2 s; the last call's result)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        if times[0] > 2:
            break
    return round(statistics.median(times) * 1000, 1), result


if __name__ == "__main__":
    main()
