"""``medserve segment``: send a study (a DICOM folder, a zip, a .dcm or a NIfTI), or name a series a configured
PACS holds; print the answer, fetch the mask."""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx

from serve_app.cli.errors import CommandError, json_answer, reason_of
from serve_app.cli.up_record import UpRecord

__all__ = ["API_KEY_ENV", "DEFAULT_URL", "add_commands", "file_chunks"]


def _default_url() -> str:
    """$MEDSERVE_URL, else the URL of the application `medserve up` last started, else the packaged config's."""
    if os.environ.get("MEDSERVE_URL"):
        return os.environ["MEDSERVE_URL"]
    record = UpRecord.read()
    return record.url if record else "http://127.0.0.1:8000"


DEFAULT_URL = _default_url()
API_KEY_ENV = "MEDSERVE_API_KEY"
_CHUNK = 1 << 20


def add_commands(commands) -> None:
    segment = commands.add_parser(
        "segment", help="segment a study: a DICOM folder, a zip, a .dcm or a NIfTI; or a series in a PACS"
    )
    segment.add_argument("path", type=Path, nargs="?", help="the study (leave out with --pacs)")
    pacs = segment.add_argument_group("a series a PACS holds (instead of a path)")
    pacs.add_argument("--pacs", help="a PACS of the server's config, by name")
    pacs.add_argument("--study", help="the StudyInstanceUID")
    pacs.add_argument("--series", help="the SeriesInstanceUID")
    pacs.add_argument(
        "--store-results",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store the DICOM SEG and SR back to the PACS (default: the PACS's store_results setting)",
    )
    segment.add_argument("--model", help="model name (default: the server's only segmentation model)")
    segment.add_argument("--out", type=Path, help="where to write the mask (NIfTI)")
    segment.add_argument("--truth", type=Path, help="a ground-truth mask (NIfTI) to report Dice against")
    segment.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL}, or $MEDSERVE_URL)")
    segment.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"the tenant's API key (default ${API_KEY_ENV})"
    )
    segment.add_argument("--stat", action="store_true", help="an emergency read: overtakes queued routine work")
    segment.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server (default 600)")
    segment.set_defaults(run=_segment)


def _segment(args) -> int:
    from_pacs = (args.pacs, args.study, args.series)
    if args.path is None and not all(from_pacs):
        raise CommandError("give a study's path, or --pacs, --study and --series")
    if args.path is not None and any(from_pacs):
        raise CommandError("give a study's path or a PACS series (--pacs, --study, --series), not both")
    if args.path is not None and not args.path.exists():
        raise CommandError(f"{args.path} does not exist")
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=auth) as client:
        model = args.model or _only_model(client)
        route, params = f"/v1/models/{model}/segment", {"stat": "true"} if args.stat else {}
        if args.path is None:
            order = {"pacs": args.pacs, "study_instance_uid": args.study, "series_instance_uid": args.series}
            if args.store_results is not None:
                order["store_results"] = args.store_results
            response = client.post(route, json=order, params=params)
        else:
            with _upload_body(args.path) as (body, content_type):
                headers = {"content-type": content_type, "content-length": str(os.fstat(body.fileno()).st_size)}
                response = client.post(route, content=file_chunks(body), headers=headers, params=params)
        result = json_answer(response)
        if args.out or args.truth:
            mask = client.get(result["mask_url"])
            if mask.status_code != 200:
                raise CommandError(reason_of(mask))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_bytes(mask.content)
        print(f"mask written to {args.out}", file=sys.stderr)
    if args.truth:
        for label, score in _dice_per_label(mask.content, args.truth, result["labels"]).items():
            print(f"Dice against {args.truth} for {label}: {score:.3f}", file=sys.stderr)
    return 0


def _dice_per_label(mask_gz: bytes, truth_path: Path, labels: list[dict]) -> dict[str, float]:
    import nibabel as nib
    import numpy as np

    mask = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(mask_gz)).dataobj)
    truth = np.asarray(nib.load(truth_path).dataobj)
    if mask.shape != truth.shape:
        raise CommandError(f"the mask has shape {mask.shape} but {truth_path} has {truth.shape}")
    scores = {}
    for label in labels:
        a, b = mask == label["label"], truth == label["label"]
        scores[label["name"]] = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    return scores


def _only_model(client: httpx.Client) -> str:
    models = json_answer(client.get("/v1/models"))["models"]
    names = [m["name"] for m in models if m["task"] == "segmentation"]
    if len(names) != 1:
        listed = ", ".join(names) or "none"
        raise CommandError(f"the server has {len(names)} segmentation models ({listed}); choose one with --model")
    return names[0]


def file_chunks(file: BinaryIO) -> Iterator[bytes]:
    """A file's bytes a MiB at a time: an upload body httpx streams without holding the file in memory."""
    while chunk := file.read(_CHUNK):
        yield chunk


@contextlib.contextmanager
def _upload_body(path: Path) -> Iterator[tuple[BinaryIO, str]]:
    """The upload's body and content type: the file itself, or a folder zipped to a temporary file."""
    if not path.is_dir():
        with open(path, "rb") as file:
            yield file, "application/octet-stream"
        return
    with tempfile.NamedTemporaryFile(suffix=".zip") as archive:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                zf.write(f, f.relative_to(path).as_posix())
        archive.seek(0)
        yield archive, "application/zip"
