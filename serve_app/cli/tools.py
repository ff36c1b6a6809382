"""The other commands: ``tenant-key``, ``sample-ct``, ``sample-slide``, ``export-onnx`` and ``build-tensorrt``.

The benchmarks are no command of the installed package: they run from a checkout (``python -m benchmarks.pipeline``,
``make bench``)."""

from __future__ import annotations

import sys
from pathlib import Path

from serve_app.cli.errors import CommandError
from serve_app.config import load_config

__all__ = ["add_commands"]


def add_commands(commands) -> None:
    tenant_key = commands.add_parser(
        "tenant-key", help="make a new API key for a tenant; prints it once, with its hash for the config"
    )
    tenant_key.add_argument("tenant_id")
    tenant_key.set_defaults(run=_tenant_key)

    sample = commands.add_parser("sample-ct", help="write a synthetic CT series (DICOM) and its ground truth")
    sample.add_argument("out", type=Path)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=_sample_ct)

    slide = commands.add_parser(
        "sample-slide", help="write a synthetic H&E whole-slide image (pyramidal JPEG TIFF) and its ground truth"
    )
    slide.add_argument("out", type=Path, help="the slide file to write, e.g. demo-data/slide.tiff")
    slide.add_argument("--width", type=int, default=6000, help="pixels at level 0 (default 6000)")
    slide.add_argument("--height", type=int, default=4000, help="pixels at level 0 (default 4000)")
    slide.add_argument("--mpp", type=float, default=0.5, help="microns per pixel of level 0 (default 0.5)")
    slide.add_argument("--seed", type=int, default=0)
    slide.set_defaults(run=_sample_slide)

    export = commands.add_parser("export-onnx", help="export a model to ONNX and check it against torch")
    export.add_argument("model", help="model name in the config's model repository")
    export.add_argument(
        "--out",
        type=Path,
        help="ONNX file to write (default: the engine cache the onnxruntime and tensorrt backends read)",
    )
    export.add_argument(
        "--config", type=Path, help="application YAML whose model repository to use (default: the packaged one)"
    )
    export.add_argument(
        "--tolerance", type=float, help="largest max abs difference from torch accepted (default: 1e-3, for fp32)"
    )
    export.set_defaults(run=_export_onnx)

    tensorrt = commands.add_parser(
        "build-tensorrt",
        help="build a tensorrt model's engine for this node's GPU into the engine cache (int8: calibrated on "
        "synthetic CT phantoms); replicas load it from there",
    )
    tensorrt.add_argument("model", help="model name in the config's model repository")
    tensorrt.add_argument(
        "--config", type=Path, help="application YAML whose model repository to use (default: the packaged one)"
    )
    tensorrt.set_defaults(run=_build_tensorrt)


def _sample_slide(args) -> int:
    from serve_app.samples.synthetic_slides import write_slide

    if args.width < 256 or args.height < 256:
        raise CommandError(f"a slide needs at least 256 x 256 pixels (got {args.width} x {args.height})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    slide = write_slide(args.out, args.width, args.height, mpp=args.mpp, seed=args.seed)
    levels = " ".join(f"{w}x{h}" for h, w in slide.level_shapes)
    print(f"wrote {args.out} (levels {levels} px at {args.mpp:g} mpp, JPEG tiles) and its truth {slide.truth_path}")
    return 0


def _tenant_key(args) -> int:
    from serve_app.tenancy.keys import hash_api_key, new_api_key

    key = new_api_key()
    print(
        f"New API key for tenant {args.tenant_id}; it is shown only this once, give it to the hospital:",
        file=sys.stderr,
    )
    print(key)
    print(f"Add its hash to the config, under tenants.{args.tenant_id}.api_key_hashes:", file=sys.stderr)
    print(f"  - {hash_api_key(key)}")
    return 0


def _sample_ct(args) -> int:
    import numpy as np
    from pydicom.uid import generate_uid

    from serve_app.samples.phantoms import ct_phantom
    from serve_app.samples.study_files import write_ct_series, write_nifti

    phantom = ct_phantom(np.random.default_rng(args.seed))
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = write_ct_series(
        phantom.volume, args.out / "series", study_instance_uid=study_uid, series_instance_uid=series_uid
    )
    write_nifti(phantom.label, phantom.volume.affine, args.out / "truth.nii.gz")
    # For a shell to `source`: the PACS walk-through of the README names the series by these.
    (args.out / "uids.env").write_text(f"STUDY={study_uid}\nSERIES={series_uid}\n")
    print(
        f"wrote {len(paths)} DICOM slices to {args.out / 'series'} and the ground truth to {args.out / 'truth.nii.gz'}"
    )
    print(f"study {study_uid}, series {series_uid} (also in {args.out / 'uids.env'})")
    return 0


def _model(args):
    """The model ``args.model`` of the config's repository; CommandError naming why not."""
    from serve_app.errors import ModelNotFound
    from serve_app.model_repository import ModelRepository
    from serve_app.model_spec import ModelRepositoryError

    try:
        return ModelRepository(load_config(args.config).model_repository).get(args.model)
    except (ModelNotFound, ModelRepositoryError) as e:
        raise CommandError(e) from None


def _export_onnx(args) -> int:
    from serve_app.engines.onnx_export import FP32_TOLERANCE, OnnxCheckFailed, cached_onnx_path, export_checked

    spec = _model(args)
    out = args.out or cached_onnx_path(spec)
    try:
        check = export_checked(spec, out, FP32_TOLERANCE if args.tolerance is None else args.tolerance)
    except OnnxCheckFailed as e:
        raise CommandError(f"the ONNX export of {args.model} does not match torch, nothing written: {e}") from None
    print(check)
    print(f"wrote {out}")
    return 0


def _build_tensorrt(args) -> int:
    import torch

    from serve_app.engines.devices import replica_device
    from serve_app.engines.tensorrt_engine import cached_plan
    from serve_app.samples.calibration import calibration_batches

    spec = _model(args)
    if spec.engine.backend != "tensorrt":
        raise CommandError(f"model {spec.name} runs on backend {spec.engine.backend}, not tensorrt: nothing to build")
    device = replica_device()
    if device.type != "cuda":
        raise CommandError("a TensorRT engine is built on the GPU it runs on: this node has none")
    try:
        calibration = calibration_batches(spec, device) if spec.engine.precision == "int8" else None
        plan = cached_plan(spec, device, calibration)
    except (ImportError, ValueError) as e:
        raise CommandError(e) from None
    print(f"{spec.name}: {spec.engine.precision} engine for {torch.cuda.get_device_name(device)} in {plan}")
    return 0
