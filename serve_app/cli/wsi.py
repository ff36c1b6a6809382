"""``medserve wsi``: whole-slide-image jobs over the API: submit (with a live progress bar), status, wait,
cancel, list.

    $ medserve wsi submit /mnt/slides/case-1.svs /mnt/slides/case-2.svs --model he-tile-tumour --out night-1
    job 3f2c...: 2 slides, out night-1
    [##########----------]  1,208/2,410 tiles  812 tiles/s  ETA 0:00:01
    done: 2 slides done, 0 failed; results in /tmp/medserve/wsi/anonymous/night-1

Slide paths are sent as given (made absolute): the server reads them from storage every node mounts,
inside its ``wsi.slide_roots``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx

from serve_app.cli.errors import CommandError, json_answer, reason_of
from serve_app.cli.segment import API_KEY_ENV, DEFAULT_URL, file_chunks

__all__ = ["add_commands"]

_POLL_S = 1.0
_BAR = 24


def add_commands(commands) -> None:
    wsi = commands.add_parser("wsi", help="whole-slide-image jobs: submit, status, wait, cancel, list")
    actions = wsi.add_subparsers(dest="wsi_command", required=True)

    submit = actions.add_parser("submit", help="run slides through a tile classifier; shows progress")
    submit.add_argument("slides", nargs="+", help="slide files on storage the server mounts")
    submit.add_argument("--model", required=True, help="a tile_classification model (see GET /v1/models)")
    submit.add_argument("--out", help="output folder name on the server; the same name resumes a job")
    submit.add_argument("--mpp", type=float, help="microns per pixel, for slides whose files do not say")
    submit.add_argument(
        "--upload", action="store_true", help="send the slide files to the server first (not on shared storage)"
    )
    submit.add_argument("--detach", action="store_true", help="print the job id and return at once")
    _connection(submit)
    submit.set_defaults(run=_submit)

    for name, run, text in (
        ("status", _status, "a job's state and each slide's"),
        ("wait", _wait, "follow a job to its end, with progress"),
        ("cancel", _cancel, "stop a job (finished work is kept: submit again with the same --out to resume)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("job_id")
        _connection(action)
        action.set_defaults(run=run)

    listing = actions.add_parser("list", help="the tenant's jobs, newest first")
    _connection(listing)
    listing.set_defaults(run=_list)


def _connection(parser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL}, or $MEDSERVE_URL)")
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"the tenant's API key (default ${API_KEY_ENV})"
    )
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for each answer (default 60)")


def _client(args) -> httpx.Client:
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, timeout=args.timeout, headers=auth)


def _submit(args) -> int:
    body = {"model": args.model, "slides": [os.path.abspath(s) for s in args.slides]}
    if args.out:
        body["out"] = args.out
    if args.mpp:
        body["mpp"] = args.mpp
    with _client(args) as client:
        if args.upload:
            body["slides"] = [_upload(client, Path(slide)) for slide in body["slides"]]
        response = client.post("/v1/wsi/jobs", json=body)
        if response.status_code != 202:
            raise CommandError(reason_of(response))
        job = response.json()
        print(f"job {job['job_id']}: {len(job['slides'])} slides, out {job['out']}", file=sys.stderr)
        if args.detach:
            print(job["job_id"])
            return 0
        return _follow(client, job["job_id"])


def _upload(client: httpx.Client, slide: Path) -> str:
    """Stream one slide file to the server; the path it stored it at."""
    if not slide.is_file():
        raise CommandError(f"{slide} is not a file")
    with open(slide, "rb") as file:
        headers = {"content-length": str(os.fstat(file.fileno()).st_size)}
        response = client.post(
            "/v1/wsi/slides", params={"name": slide.name}, content=file_chunks(file), headers=headers
        )
    if response.status_code != 201:
        raise CommandError(f"uploading {slide.name}: {reason_of(response)}")
    return response.json()["slide"]


def _wait(args) -> int:
    with _client(args) as client:
        return _follow(client, args.job_id)


def _follow(client: httpx.Client, job_id: str) -> int:
    """Poll the job, drawing a progress bar on a terminal (a line every 10 s otherwise), until it ends."""
    tty, last_line = sys.stderr.isatty(), 0.0
    while True:
        job = json_answer(client.get(f"/v1/wsi/jobs/{job_id}"))
        if job["state"] not in ("queued", "running"):
            break
        if tty:
            print(f"\r{_progress(job)}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - last_line >= 10:
            print(_progress(job), file=sys.stderr, flush=True)
            last_line = time.monotonic()
        time.sleep(_POLL_S)
    print(("\r" if tty else "") + _progress(job), file=sys.stderr)
    _print_slides(job)
    return 0 if job["state"] == "done" else 1


def _progress(job: dict) -> str:
    done, total = job["tiles_done"], job["tiles_total"]
    filled = int(_BAR * done / total) if total else 0
    eta = f"ETA {timedelta(seconds=round(job['eta_s']))}" if job.get("eta_s") is not None else "ETA -"
    return f"[{'#' * filled}{'-' * (_BAR - filled)}] {done:,}/{total:,} tiles  {job['tiles_per_s']:,.0f} tiles/s  {eta}"


def _print_slides(job: dict) -> None:
    states = [s["state"] for s in job["slides"]]
    print(
        f"{job['state']}: {states.count('done')} slides done, {states.count('failed')} failed; "
        f"results in {job['out_path']}",
        file=sys.stderr,
    )
    for index, slide in enumerate(job["slides"]):
        if slide["state"] == "failed":
            print(f"  slide {index} ({_slide_name(slide['slide'])}): failed: {slide['error']}", file=sys.stderr)
        elif slide["summary"]:
            s = slide["summary"]
            print(
                f"  slide {index} ({_slide_name(slide['slide'])}): {s['tiles_tissue']:,} tissue tiles, "
                f"{s['tiles_positive']:,} positive, tumour {s['tumour_area_mm2']:.2f} mm²  -> {slide['key']}/",
                file=sys.stderr,
            )


def _slide_name(slide: str | dict) -> str:
    """A slide file's name, or, for a slide on a PACS ({"pacs", "study_instance_uid", "series_instance_uid"}), its
    PACS and series."""
    if isinstance(slide, dict):
        return f"PACS {slide['pacs']} series {slide['series_instance_uid']}"
    return Path(slide).name


def _status(args) -> int:
    with _client(args) as client:
        job = json_answer(client.get(f"/v1/wsi/jobs/{args.job_id}"))
    print(_progress(job), file=sys.stderr)
    _print_slides(job)
    return 0


def _cancel(args) -> int:
    with _client(args) as client:
        job = json_answer(client.delete(f"/v1/wsi/jobs/{args.job_id}"))
    print(f"job {job['job_id']}: cancel requested ({job['tiles_done']:,} tiles done are kept)", file=sys.stderr)
    return 0


def _list(args) -> int:
    with _client(args) as client:
        jobs = json_answer(client.get("/v1/wsi/jobs"))["jobs"]
    for job in jobs:
        print(
            f"{job['job_id']}  {job['state']:<11} {job['model']}  {len(job['slides'])} slides  "
            f"{job['tiles_done']:,}/{job['tiles_total']:,} tiles  out {job['out']}  {job['created'][:19]}"
        )
    return 0
