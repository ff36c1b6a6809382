"""``medserve import-bundle``: check a MONAI bundle and copy it into a model repository; ``medserve sample-bundle``:
write the embedded model as one; ``medserve input-reference``: a model's reference distribution of inputs.

    medserve sample-bundle /tmp/organ-bundle --format yaml --weights ts
    medserve import-bundle /tmp/organ-bundle --name organ --repository /srv/models   # /srv/models/organ/1.0.0/
    medserve reload --config my.yaml                                                    # served beside the others
"""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from serve_app.cli.errors import CommandError
from serve_app.config import EMBEDDED_MODEL_REPOSITORY, load_config

__all__ = ["add_commands"]

_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")  # ModelSpec.name's pattern


def add_commands(commands) -> None:
    imports = commands.add_parser(
        "import-bundle",
        help="check a MONAI bundle (read, network built, weights loaded, one input run) and copy it into a model "
        "repository as <name>/<version>/",
    )
    imports.add_argument("bundle", type=Path, help="the bundle's folder (configs/, models/)")
    imports.add_argument("--name", help="the model's name (default: the bundle folder's name)")
    imports.add_argument(
        "--repository", type=Path, help="the model repository to copy it into (default: the config's model_repository)"
    )
    imports.add_argument("--config", type=Path, help="application YAML whose model repository to use")
    imports.add_argument("--replace", action="store_true", help="replace the same version if it is there")
    imports.set_defaults(run=_import_bundle)

    sample = commands.add_parser("sample-bundle", help="write the embedded CT model as a MONAI bundle")
    sample.add_argument("out", type=Path, help="the bundle folder to write")
    sample.add_argument("--format", choices=["json", "yaml"], default="json", help="configs/inference.<format>")
    sample.add_argument(
        "--weights", choices=["pt", "ts", "both"], default="pt", help="models/model.pt (state dict), model.ts or both"
    )
    sample.set_defaults(run=_sample_bundle)

    reference = commands.add_parser(
        "input-reference",
        help="compute a model version's reference distribution of inputs (input monitoring) from reference studies "
        "or slides, and write it beside its files (input_reference.json)",
    )
    reference.add_argument("model", help="model name in the config's model repository")
    reference.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        help="reference inputs: studies (a folder of one DICOM series, or a NIfTI file) for a segmentation model, "
        "slides for a tile classifier",
    )
    reference.add_argument("--version", help="the model's version (default: its newest)")
    reference.add_argument("--config", type=Path, help="application YAML whose model repository to use")
    reference.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="use N synthetic inputs instead (CT phantoms written as DICOM, or H&E slides): the embedded demo "
        "models' reference",
    )
    reference.add_argument("--seed", type=int, default=0, help="first seed of the synthetic inputs (default 0)")
    reference.set_defaults(run=_input_reference)


def _import_bundle(args) -> int:
    from serve_app.engines.torch_engine import check_network
    from serve_app.model_spec import ModelRepositoryError
    from serve_app.monai_bundle import read_bundle

    source = args.bundle.resolve()
    name = args.name or source.name
    if not _MODEL_NAME.match(name):
        raise CommandError(f"model name {name!r} must be lower case letters, digits, '.', '_' or '-' (give --name)")
    repository = args.repository or load_config(args.config).model_repository
    if repository.resolve() == EMBEDDED_MODEL_REPOSITORY.resolve():
        raise CommandError(
            "the embedded model repository is part of the package: give --repository DIR (and model_repository: DIR "
            "in your config)"
        )
    if not source.is_dir():
        raise CommandError(f"{args.bundle} is not a folder")
    try:
        spec = read_bundle(source, name)
        check_network(spec)
    except ModelRepositoryError as e:
        raise CommandError(f"{args.bundle} cannot be served: {e}") from None
    model_folder = repository / name
    if (model_folder / "model.yaml").is_file() or (model_folder / "configs").is_dir():
        raise CommandError(
            f"{model_folder} holds a model of one version: move it into {model_folder}/<its version>/ first, so that "
            "versions can sit side by side"
        )
    destination = model_folder / spec.version
    if destination.exists() and not args.replace:
        raise CommandError(f"{destination} exists: version {spec.version} is there (--replace replaces it)")
    # Copied beside it first, then moved into place: a reload never reads half a bundle.
    staging = model_folder / f".importing-{uuid.uuid4().hex}"
    shutil.copytree(source, staging)
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    print(
        f"imported {name} version {spec.version} ({spec.weights.file}, labels "
        f"{', '.join(label.name for label in spec.labels.values())}) into {destination}; "
        "`medserve reload` serves it"
    )
    return 0


def _sample_bundle(args) -> int:
    from serve_app.model_repository import ModelRepository
    from serve_app.samples.bundles import write_bundle

    if args.out.exists() and any(args.out.iterdir()):
        raise CommandError(f"{args.out} exists and is not empty")
    spec = ModelRepository(EMBEDDED_MODEL_REPOSITORY).get("ct-phantom-organ")
    write_bundle(spec, args.out, config_format=args.format, weights=args.weights)
    print(f"wrote the embedded model {spec.name} {spec.version} as a MONAI bundle in {args.out}")
    return 0


def _input_reference(args) -> int:
    import tempfile

    from serve_app.errors import RequestError
    from serve_app.model_repository import ModelRepository
    from serve_app.observability.input_drift import build_reference

    config = load_config(args.config)
    try:
        spec = ModelRepository(config.model_repository).get(args.model, args.version)
    except RequestError as e:
        raise CommandError(str(e)) from None
    slides = spec.task == "tile_classification"
    if bool(args.inputs) == bool(args.synthetic):
        raise CommandError("give reference inputs, or --synthetic N, not both")
    with tempfile.TemporaryDirectory(prefix="medserve-reference-") as scratch:
        paths = args.inputs or _synthetic_inputs(slides, args.synthetic, args.seed, Path(scratch))
        features = []
        for path in paths:
            try:
                features.append(_slide_features(path) if slides else _study_features(path, config.limits))
            except (RequestError, OSError, ValueError) as e:
                raise CommandError(f"{path}: cannot be read ({e})") from None
    reference = build_reference(spec.name, spec.version, features)
    written = reference.save(spec.folder)
    print(f"wrote the input reference of {spec.name} {spec.version} from {len(features)} inputs to {written}")
    return 0


def _study_features(path: Path, limits) -> dict:
    from serve_app.observability.input_features import study_features
    from serve_app.studies.nifti import read_nifti
    from serve_app.studies.reader import read_study

    volume = read_study(path, limits) if path.is_dir() else read_nifti(path, limits)
    return study_features(volume)


def _slide_features(path: Path) -> dict:
    from serve_app.observability.input_features import slide_features
    from serve_app.wsi.slides import open_slide
    from serve_app.wsi.tissue import detect_tissue

    slide = open_slide(str(path))
    try:
        return slide_features(slide.levels[0].mpp, detect_tissue(slide).stain_od)
    finally:
        slide.close()


def _synthetic_inputs(slides: bool, count: int, seed: int, folder: Path) -> list[Path]:
    """``count`` synthetic inputs written under ``folder``, as a client would send them: DICOM CT series (the
    demo's phantoms), or H&E slides of the demo's size and mpp."""
    import numpy as np

    from serve_app.samples.phantoms import ct_phantom
    from serve_app.samples.study_files import write_ct_series
    from serve_app.samples.synthetic_slides import write_slide

    paths = []
    for i in range(seed, seed + count):
        if slides:
            paths.append(write_slide(folder / f"slide-{i}.tiff", 3000, 2000, seed=i).path)
        else:
            write_ct_series(ct_phantom(np.random.default_rng(i)).volume, folder / f"series-{i}")
            paths.append(folder / f"series-{i}")
    return paths
