"""docs/benchmarks.md, generated from the result files in benchmarks/results/.

    python -m benchmarks.docs_page            # rewrite docs/benchmarks.md
    python -m benchmarks.docs_page --check    # exit 1 if the committed page is not what the results give

Each benchmark gets one table of its current figures: for every device, its newest complete result file (the latest
date, then the highest `-runN`; files named `-partial`, runs cut short, are left out but for the DICOM decode times,
which a run measures before anything it may be cut short in). Every figure links the file it
comes from. Absolute times are shown only from GPU machines; a CPU machine's run, whose times say more about the
machine than about medserve, is shown as ratios. History stays in the result files and in git.

The module is also the site's MkDocs hook (mkdocs.yml: `hooks`): `on_files` publishes the result files at
`results/<name>` in the built site, where the page's links point. It imports nothing of medserve (nor Ray).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PAGE", "RESULTS", "on_files", "render"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
_SITE_FOLDER = "results"  # where the result files are published in the site, beside benchmarks.md
_RUN = re.compile(r"-run(\d+)")


_PIPELINE = """\
## Pipeline

`benchmarks/pipeline.py` serves the same volume and model every way medserve can, side by side in one run:

- **a. MONAI CPU reference**: MONAI's CPU transforms, torch fp32 eager, CPU postprocessing, one volume at a time.
- **b. bare loop**: one process, no Serve: the same stage objects medserve runs, on the GPU, with the best engine
  options and batch size from a sweep (the *network alone* row: the model with nothing around it).
- **c. handles**: medserve through Serve's DeploymentHandles, a closed loop of concurrent requests, in the fused
  layout (the three stages in one replica per model) and the split one.
- **d. HTTP**: medserve through its HTTP ingress, each request a 157 MB raw NIfTI upload, a closed loop at the
  concurrency shown (and again at the higher ones).
- **open loops** at 80 % of c's and of d's peak rate: latency at a steady arrival rate, as a hospital's traffic
  arrives.
- **HTTP, zipped DICOM series** (300 files), **`.nii.gz`**, and raw NIfTI sent with **`Content-Encoding: gzip`** or
  **`zstd`**: the same volume as other bodies.
- **transport ceiling**: the same uploads, at the same concurrency and through the same ingress, to a deployment
  that only receives them (`benchmarks/transport.py`): what the host's HTTP path carries at most.

Every phase's mask is compared with a's (Dice). Each served phase also records where the host's CPU went (`cpu`:
busy cores and CPU milliseconds per request for each kind of process, `benchmarks/cpu_accounting.py`) and, for
closed loops, the two slowest requests and where their time went (`slowest_ms`): see the JSON.

```bash
make bench                                                # = python -m benchmarks.pipeline --size small
.venv/bin/python -m benchmarks.pipeline --size full       # a GPU host: a 512x512x300 CT, the MSD-spleen UNet
.venv/bin/python -m benchmarks.pipeline --size full --compare proxy,time-slicing,again
.venv/bin/python -m benchmarks.pipeline --help            # phases, layouts, concurrency, replicas
```

It writes `benchmarks/results/pipeline-<size>-<models>-<device>-<date>.json` and `.md`. `--compare` serves d and the
DICOM phase again with one change at a time, each on an application deployed afresh: `proxy` (Serve's Python proxy
instead of HAProxy), `time-slicing` (instead of MPS), `throughput-optimized` (Serve's throughput-optimized mode),
`twice-the-replicas`, and `again` (the same settings: the control for being measured later). HTTP load comes from
four client processes (`benchmarks/http_load.py`) on the same host, so the server shares its CPU with its clients.
Runs on one kind of machine differ by 20 % or more from one host to the next: compare figures within one run.

Volumes/s (p50 / p99 ms; "max of N" where a phase had fewer than 100 requests, so its p99 is its slowest); a
dash where that run left the phase out:

"""

_DICOM_DECODE = """\
## Reading a DICOM series

The pipeline benchmark also times reading the same 512×512×300 int16 CT once each way, in one process
(`decode_ms` in its JSON; leave it out with `--no-decode`), milliseconds:

"""

_UPLOAD_PATH = """\
## Upload path

`benchmarks/upload_path.py` times one 157 MB body at a time through uvicorn, the ingress's web server, without Ray:
the server receiving and counting it (what the transport ceiling's sink does), the server spooling it to `/dev/shm`
(what the ingress does with every upload), and the CPU a load client spends sending it (httpx's async client against
`http.client` with one `sendall`, what `benchmarks/http_load.py` uses); and the host's memory copy rate. Seconds to
run:

```bash
.venv/bin/python -m benchmarks.upload_path
```

"""

_NOISY_NEIGHBOUR = """\
## Noisy neighbour

`benchmarks/noisy_neighbour.py` starts its own local Ray cluster and deploys medserve with two tenants. B sends a CT
study at a steady 1 request/s, alone, then while A (quota 0.25/s, burst 1, one at a time) sends ten times its quota;
three rounds of alternating phases, open loop. On a GPU host each round is B alone, B alone again (the control: how
much two phases alone differ) and B with A's flood. Target: B's p99 with the flood at most 1.2 × alone, no 429 for
B, only 200s and 429s for A.

```bash
make bench-tenants                                            # = python -m benchmarks.noisy_neighbour
.venv/bin/python -m benchmarks.noisy_neighbour --gpu --study full   # a GPU host: 512x512x300 CT, zipped
```

"""

_WSI = """\
## Whole-slide images

`benchmarks/wsi.py` writes one generated slide (60,000 × 60,000 px at 0.5 mpp, 256 px JPEG tiles, every tile tissue)
and classifies it with a MONAI 2D ResNet-18 (random weights, 224 px tiles, fp16 + channels-last): **model only**,
the network on device-resident random tiles at its best batch; **medserve end to end**, a real job submitted over
HTTP to a local Ray cluster and timed from submission to its record saying `done` (driver start, open, tissue, every
work unit, Zarr, overlay, GeoJSON, summary), once with JPEG decoding on CPU threads and once with nvJPEG
(`wsi.gpu_decode`); **work units only**, the same job's tiles over the time its work units flowed; a **naive loop**
that reads one tile and classifies it. A minute on a CPU:

```bash
make bench-wsi                                     # = python -m benchmarks.wsi --size small
.venv/bin/python -m benchmarks.wsi --size large    # a GPU host
```

"""

_DECODE = """\
## Image decoding

`benchmarks/decode.py` decodes, in one run, (1) the JPEG tiles of a generated slide (256 px file tiles, batches of
256) with each GPU decoder (`wsi.gpu_jpeg_decoder`) and with libjpeg-turbo on one CPU thread a core, and compares
each GPU decoder's pixels with libjpeg-turbo's; (2) a 300-frame 512 × 512 16-bit CT series in each transfer
syntax, in the replica's process, in a process a core, and on the GPU (nvImageCodec), each checked voxel for voxel
against the uncompressed frames, and the whole reader (`read_dicom_series`) on its own choice. About a minute:

```bash
.venv/bin/python -m benchmarks.decode --slices 60     # a CPU host: the GPU parts say why they did not run
.venv/bin/python -m benchmarks.decode                 # a GPU host with the gpu extra
```

"""

_TRITON_COMPARE = """\
## medserve and Triton

`benchmarks/triton_compare.py` serves the MSD-spleen UNet (fp16, channels-last, CUDA graphs) on one GPU two ways, one
after the other in one run, and loads each with NVIDIA's `tritonclient` from client processes (a closed loop, one
request in flight per process), over HTTP with binary tensors and over gRPC, sending a 512 × 512 × 300 int16 CT:
**Triton** (Triton Inference Server through PyTriton, the bound callable doing MONAI's preprocessing, the network and
medserve's postprocessing on the GPU, as many instances as medserve has replicas, dynamic batching to the same batch
size and delay) and **medserve** (its fused layout through its inference-protocol routes, which also keep each result
as a study's). The masks of the two are compared voxel for voxel. It needs a CUDA host with `nvidia-pytriton` and
`tritonclient[all]` installed beside the `gpu` extra:

```bash
.venv/bin/python -m benchmarks.triton_compare --size full --concurrency 8
```
"""

_GPU_SCALING = """\
## Multi-GPU scale-out

`benchmarks/gpu_scaling.sh` runs, for each GPU count k a host has, the 3D pipeline over HTTP with 4k fused replicas
at a quarter of a GPU each (`python -m benchmarks.pipeline --gpus k --fused-replicas 4k`) and a WSI job of four
slides with the tile model's replicas on all k GPUs (`python -m benchmarks.wsi --scaling k --slides 4`), scraping
per-GPU utilisation and where each replica landed (`ray_medserve_replica_gpus`). Efficiency is the throughput on the
most GPUs over k × the throughput on one; target ≥ 0.9.

```bash
bash benchmarks/gpu_scaling.sh 1 2 4    # GPU counts; those the host lacks are skipped
```

"""

_POSTPROCESS_PROFILE = """\
## Postprocessing, step by step

`benchmarks/postprocess_profile.py` times each postprocessing step on the same logits of a full-size CT
(512×512×300), on the whole image grid and in the organ's box that medserve uses (the largest component on the
model's grid, grown by one voxel); inside the box the mask equals the whole-grid mask
(`tests/test_postprocessing.py`).

```bash
.venv/bin/python -m benchmarks.postprocess_profile
```

"""


@dataclass(frozen=True)
class _Result:
    """One result file: its name, its device as the page names it, whether that device has a GPU, its data.

    `kind` tells apart results of one benchmark and device that are not comparable (the pipeline's models).
    """

    name: str
    kind: str
    device: str
    gpu: bool
    date: str
    run: int
    data: dict

    def link(self, text: object) -> str:
        return f"[{text}]({_SITE_FOLDER}/{self.name})"


def _load(
    pattern: str,
    device_of: Callable[[str, dict], tuple[str, bool]],
    kind_of: Callable[[dict], str] = lambda _: "",
    partial: bool = False,
) -> list[_Result]:
    """The result files matching `pattern`; those of runs cut short (`-partial`) only if `partial`."""
    results = []
    for path in sorted(RESULTS.glob(pattern)):
        if "-partial" in path.stem and not partial:
            continue
        data = json.loads(path.read_text()) if path.suffix == ".json" else {"text": path.read_text()}
        device, gpu = device_of(path.stem, data)
        run = _RUN.search(path.stem)
        date = str(data.get("date") or re.search(r"\d{4}-\d\d-\d\d", path.stem).group())
        results.append(_Result(path.name, kind_of(data), device, gpu, date, int(run.group(1)) if run else 0, data))
    return results


def _newest_per_device(results: Iterable[_Result]) -> list[_Result]:
    """The newest result of each kind and device, GPU machines first, in a stable order."""
    newest: dict[tuple[str, str], _Result] = {}
    for result in results:
        kept = newest.get((result.kind, result.device))
        if kept is None or (result.date, result.run) > (kept.date, kept.run):
            newest[result.kind, result.device] = result
    return sorted(newest.values(), key=lambda r: (not r.gpu, r.device, r.kind))


def _device_in_name(prefix: str) -> Callable[[str, dict], tuple[str, bool]]:
    """`<prefix>-<device>-<date>[-…]`: the device as the benchmark wrote it, underscores for spaces."""

    def device_of(stem: str, data: dict) -> tuple[str, bool]:
        device = re.match(rf"{re.escape(prefix)}-(.+?)-\d{{4}}-\d\d-\d\d", stem).group(1).replace("_", " ")
        return device, not device.startswith("CPU")

    return device_of


def _noisy_neighbour_device(stem: str, data: dict) -> tuple[str, bool]:
    device = data["device"]
    if device.get("gpu"):
        return device["gpu"], True
    return f"CPU {device['cores']} cores", False


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _number(value: float) -> str:
    """Figures as the page shows them: thousands grouped, three significant digits below 100."""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _latency(phase: dict) -> str:
    # A p99 of fewer than 100 requests is the slowest of them: said so.
    requests = phase.get("requests", 100)
    slowest = f", max of {requests}" if requests < 100 else ""
    return f"{_number(phase['p50_ms'])} / {_number(phase['p99_ms'])}{slowest}"


def _pipeline_columns(result: _Result) -> list[tuple[str, _Result, dict]]:
    return [(f"{result.device}, {model}", result, phases) for model, phases in result.data["models"].items()]


def _pipeline_gpu_rows(columns: list[tuple[str, _Result, dict]]) -> list[list[str]]:
    """One row per phase, volumes/s with p50 / p99 ms; a dash where a run left the phase out."""

    def cell(result: _Result, phase: dict | None, rate: str = "volumes_per_s") -> str:
        if not phase:
            return "—"
        return f"{result.link(_number(phase[rate]))} ({_latency(phase)})"

    def row(label: str, pick: Callable[[_Result, dict], str]) -> list[str] | None:
        cells = [pick(result, phases) for _, result, phases in columns]
        return [label, *cells] if any(c != "—" for c in cells) else None

    def http_at(concurrency: str) -> Callable[[_Result, dict], str]:
        return lambda r, p: cell(r, p.get("http_at_concurrency", {}).get(concurrency))

    def open_loop(key: str) -> Callable[[_Result, dict], str]:
        def pick(r: _Result, p: dict) -> str:
            loop = p.get(key)
            return f"{r.link(_number(loop['rate_per_s']))}/s ({_latency(loop)})" if loop else "—"

        return pick

    def concurrency(r: _Result, p: dict) -> str:
        return str(p["http"].get("concurrency", "—")) if "http" in p else "—"

    def gpu_during_http(r: _Result, p: dict) -> str:
        return f"{r.link(_number(p['http']['gpu_util_percent']))} %" if "http" in p else "—"

    def network_only(r: _Result, p: dict) -> str:
        rate = p.get("network_only_volumes_per_s") or max(p.get("engine_volumes_per_s", {}).values(), default=None)
        return r.link(_number(rate)) if rate else "—"

    def transport(r: _Result, p: dict) -> str:
        ceiling = p.get("transport_ceiling")
        return f"{r.link(_number(ceiling['uploads_per_s']))} ({_latency(ceiling)})" if ceiling else "—"

    def dice(r: _Result, p: dict) -> str:
        values = [v["dice_vs_reference"] for v in _phases(p) if "dice_vs_reference" in v]
        return f"≥ {r.link(f'{min(values):.4f}')}" if values else "—"

    def settings(r: _Result, p: dict) -> str:
        s = p.get("settings")
        if not s:
            return f"batch {p['batch_size']}, {p['engine']['precision']}"
        return (
            f"{s['model_replicas']} replicas, {s['ingress_replicas']} ingress replicas, {s['ingress']}, "
            f"{s['gpu_sharing']}, batch {s['batch_size']}, {p['engine']['precision']}"
        )

    concurrencies = sorted({c for _, _, p in columns for c in p.get("http_at_concurrency", {})}, key=int)
    candidates = [
        row("result file", lambda r, p: r.link(re.search(r"\d{4}-\d\d-\d\d.*", r.name.removesuffix(".json")).group())),
        row("settings", settings),
        row("network alone, best engine and batch", network_only),
        row("a. MONAI CPU reference", lambda r, p: cell(r, p.get("reference"))),
        row("b. bare loop, one process", lambda r, p: cell(r, p.get("bare"))),
        row("c. handles, fused layout", lambda r, p: cell(r, p.get("handles_fused"))),
        row("c. handles, split layout", lambda r, p: cell(r, p.get("handles_split"))),
        row("open loop through the handles at 80 % of c, requests/s", open_loop("open_loop_80pct")),
        row("d. HTTP, raw NIfTI", lambda r, p: cell(r, p.get("http"))),
        row("d: concurrent uploads", concurrency),
        *(row(f"d at concurrency {c}", http_at(c)) for c in concurrencies),
        row("GPU utilisation during d", gpu_during_http),
        row("HTTP, zipped DICOM series", lambda r, p: cell(r, p.get("http_dicom_zip"))),
        row("HTTP, `.nii.gz`", lambda r, p: cell(r, p.get("http_nii_gz"))),
        row("HTTP, raw NIfTI, `Content-Encoding: gzip`", lambda r, p: cell(r, p.get("http_gzip"))),
        row("HTTP, raw NIfTI, `Content-Encoding: zstd`", lambda r, p: cell(r, p.get("http_zstd"))),
        row("transport ceiling, uploads/s", transport),
        row("open loop over HTTP at 80 % of d, requests/s", open_loop("open_loop_http_80pct")),
        row("Dice against a, every phase", dice),
    ]
    return [r for r in candidates if r]


def _phases(phases: dict) -> list[dict]:
    found = [v for v in phases.values() if isinstance(v, dict) and "volumes_per_s" in v]
    return found + list(phases.get("http_at_concurrency", {}).values())


def _pipeline(results: list[_Result]) -> list[str]:
    full = _newest_per_device(r for r in results if r.data["size"] == "full" and r.gpu)
    columns = [column for result in full for column in _pipeline_columns(result)]
    lines = [
        *_PIPELINE.splitlines(),
        *_table(["", *(label for label, _, _ in columns)], _pipeline_gpu_rows(columns)),
        "",
    ]
    cpu = _newest_per_device(r for r in results if not r.gpu)
    if cpu:
        rows = []
        for result in cpu:
            for model, phases in result.data["models"].items():
                ratios = phases["ratios"]
                rows.append(
                    [
                        result.link(f"{result.device}, {result.data['size']}, {model}"),
                        _number(ratios["handles_over_bare"]),
                        _number(ratios["http_over_bare"]),
                        _number(ratios["bare_over_reference"]),
                        phases["faster_layout"],
                    ]
                )
        lines += [
            "On a CPU machine (`--size small`, or `tiny` as CI's smoke test `tests/test_benchmark_smoke.py` runs it), "
            "as ratios of throughput:",
            "",
            *_table(["run", "c / b", "d / b", "b / a", "faster layout"], rows),
            "",
        ]
    return lines


_DECODE_ROWS = {
    "dicom_series": "300 uncompressed files",
    "dicom_series_one_process": "the same, headers in the replica's own process",
    "dicom_series_rle": "300 RLE Lossless files",
    "dicom_series_jpeg2000": "300 JPEG 2000 lossless files",
    "nifti": "one uncompressed NIfTI",
}


def _dicom_decode(results: list[_Result]) -> list[str]:
    """decode_ms, timed before any phase is served: a run cut short later still measured it."""
    measured = _newest_per_device(r for r in results if r.gpu and r.data.get("decode_ms"))
    if not measured:
        return []
    header = ["the same volume as", *(r.device for r in measured)]
    processes = ["worker processes parsing a series' headers"]
    processes += [str(r.data["decode_ms"].get("header_processes", "none")) for r in measured]
    rows = [processes] + [
        [label, *(r.link(_number(r.data["decode_ms"][key])) if key in r.data["decode_ms"] else "—" for r in measured)]
        for key, label in _DECODE_ROWS.items()
        if any(key in r.data["decode_ms"] for r in measured)
    ]
    return [*_DICOM_DECODE.splitlines(), *_table(header, rows), ""]


def _upload_path(results: list[_Result]) -> list[str]:
    gpu = [r for r in _newest_per_device(results) if r.gpu]
    cpu = [r for r in _newest_per_device(results) if not r.gpu]
    lines = _UPLOAD_PATH.splitlines()
    if gpu:
        rows = []
        for r in gpu:
            server, client = r.data["server"], r.data["client_cpu_ms_per_upload"]
            copy = r.data.get("memory_copy_gb_per_s")
            rows.append(
                [
                    r.device,
                    f"{r.link(_number(server['receive']['cpu_ms']))} ({_number(server['receive']['wall_ms'])})",
                    f"{r.link(_number(server['spool']['cpu_ms']))} ({_number(server['spool']['wall_ms'])})",
                    f"{r.link(_number(client['httpx_async']))}; {_number(client['http_client'])}",
                    f"{r.link(_number(copy['one_thread']))}; {_number(copy['eight_threads'])}" if copy else "—",
                ]
            )
        header = ["host", "receive, CPU ms (wall)", "spool, CPU ms (wall)", "client CPU ms: httpx; http.client"]
        lines += [*_table([*header, "memory copy GB/s: 1; 8 threads"], rows), ""]
    if cpu:
        rows = [
            [
                r.link(r.device),
                _number(r.data["ratios"]["spool_over_receive_cpu"]),
                _number(r.data["ratios"]["spool_over_receive_wall"]),
                _number(r.data["ratios"]["http_client_over_httpx_cpu"]),
            ]
            for r in cpu
        ]
        header = ["CPU machine", "spool / receive, CPU", "spool / receive, wall", "client CPU: http.client / httpx"]
        lines += ["On a CPU machine, as ratios:", "", *_table(header, rows), ""]
    return lines


def _noisy_neighbour(results: list[_Result]) -> list[str]:
    lines = _NOISY_NEIGHBOUR.splitlines()
    rows = []
    for r in _newest_per_device(results):
        n = r.data["noisy_neighbour"]
        statuses = ", ".join(f"{count} × {code}" for code, count in sorted(n["a_status"].items()))
        b_codes = sorted(set(n["b_status_alone"]) | set(n["b_status_with_flood"]))
        b_got = "only 200" if b_codes == ["200"] else ", ".join(b_codes)
        if r.gpu:
            b50 = f"{r.link(_number(n['p50_alone_ms']))} / {_number(n['p50_flood_ms'])}"
            b99 = f"{_number(n['p99_alone_ms'])} / {_number(n['p99_flood_ms'])}"
        else:
            b50 = r.link(_number(n["p50_flood_ms"] / n["p50_alone_ms"]))
            b99 = "—"
        control = n.get("spread", {}).get("control_ratio", {}).get("median")
        rows.append(
            [
                f"{r.device} ({r.data['parameters']['study']})",
                b50,
                b99,
                f"{r.link(_number(n['p99_ratio']))} (target ≤ {n['target_ratio']})",
                _number(control) if control else "—",
                b_got,
                statuses,
            ]
        )
    header = ["host (study)", "B p50 ms: alone / flood (CPU: ratio)", "B p99 ms: alone / flood"]
    lines += [*_table([*header, "B p99 ratio", "control ratio, median", "B got", "A got"], rows), ""]
    return lines


def _wsi(results: list[_Result]) -> list[str]:
    lines = _WSI.splitlines()
    rows = []
    for r in _newest_per_device(results):
        wsi = r.data["wsi"]
        runs = {run["jpeg_decode"]: run for run in wsi.get("end_to_end_runs", [wsi["end_to_end"]])}
        cells = [r.link(_number(wsi["model_only_tiles_per_s"]))]
        for run in runs.values():
            cells.append(
                f"{r.link(_number(run['tiles_per_s']))} ({_number(run['steady_tiles_per_s'])}; "
                f"GPU {_number(run['gpu_utilisation_pct'])} %)"
            )
        cells.append(r.link(_number(wsi["naive_tiles_per_s"])))
        header = ["host", "model only", *(f"end to end (work units only; GPU), {name}" for name in runs), "naive loop"]
        rows.append([f"{r.device}, {runs and next(iter(runs.values()))['replicas']} replicas", *cells])
    if rows:
        lines += ["Tiles/s:", "", *_table(header, rows), ""]
    return lines


def _decode(results: list[_Result]) -> list[str]:
    lines = _DECODE.splitlines()
    for r in _newest_per_device(results):
        if not r.gpu:
            continue  # a CPU host's decode times are the host's, not the product's: see its file
        tiles = r.data["wsi_tiles"]
        rows = []
        for name, entry in tiles.items():
            if not isinstance(entry, dict) or not ("tiles_per_s" in entry or "error" in entry):
                continue
            if "error" in entry:
                rows.append([name, "did not run: " + r.link(entry["error"].split(":")[0]), "—", "—"])
                continue
            difference = (
                f"{entry['max_grey_level_difference']} / {entry['mean_grey_level_difference']}"
                if "max_grey_level_difference" in entry
                else "— (the reference)"
            )
            rows.append([name, r.link(_number(entry["tiles_per_s"])), _number(entry["cpu_us_per_tile"]), difference])
        lines += [f"JPEG tiles, {r.device}:", ""]
        lines += [*_table(["decoder", "tiles/s", "CPU µs a tile", "grey levels from libjpeg-turbo: max / mean"], rows)]
        series = r.data["dicom_series"]
        paths = ["in_process", "processes_all_cores", "processes_default", "gpu"]
        rows = []
        for syntax, entry in series.items():
            if not isinstance(entry, dict) or "reader_ms" not in entry:
                continue
            cells = []
            for path in paths:
                measured = entry.get(path, {})
                if "ms" in measured:
                    mark = "" if measured.get("voxel_identical") else " (not voxel-identical)"
                    cells.append(r.link(_number(measured["ms"])) + mark)
                else:
                    cells.append("—")
            rows.append([syntax, *cells, _number(entry["reader_ms"])])
        processes = series["processes"]
        header = ["syntax", "one process, ms", f"{processes['all_cores']} processes, ms"]
        header += [f"{processes['default']} processes, ms", "GPU, ms", "reader, ms"]
        lines += ["", f"A {series['frames']}-frame CT series, {r.device}:", "", *_table(header, rows), ""]
    return lines


def _triton_compare(results: list[_Result]) -> list[str]:
    lines = _TRITON_COMPARE.splitlines()
    for r in _newest_per_device(results):
        rows = []
        for system, figures in r.data["systems"].items():
            for protocol in ("http", "grpc"):
                phase = figures.get(protocol, {})
                if "volumes_per_s" in phase:
                    gpu = phase.get("gpu_util_percent")
                    cells = [r.link(_number(phase["volumes_per_s"])), _latency(phase), _number(gpu) if gpu else "—"]
                else:
                    reason = str(phase.get("error", figures.get("error", "not run"))).strip().splitlines()[-1]
                    cells = ["did not run: " + r.link(reason[:120]), "—", "—"]
                rows.append([system, protocol, *cells])
        ratios = "; ".join(
            f"{protocol}: throughput {_number(ratio['throughput_medserve_over_triton'])}×, "
            f"p99 {_number(ratio['p99_medserve_over_triton'])}×"
            for protocol, ratio in r.data.get("ratios", {}).items()
        )
        masks = r.data.get("masks_medserve_vs_triton", {})
        lines += [
            "",
            f"{r.device}, {r.data['concurrency']} clients, {r.data['requests']} requests a phase:",
            "",
            *_table(["system", "protocol", "volumes/s", "p50 / p99 ms", "GPU util %"], rows),
            "",
            f"medserve / Triton: {ratios or 'no protocol ran on both'}. Masks: "
            + (
                f"{masks['voxels_equal_fraction']:.6f} of voxels equal, Dice {masks['dice']}."
                if masks.get("compared")
                else "not compared."
            ),
            "",
        ]
    return lines


def _gpu_scaling(results: list[_Result]) -> list[str]:
    lines = _GPU_SCALING.splitlines()
    rows = []
    for r in _newest_per_device(results):
        for gpus, run in sorted(r.data["runs"].items(), key=lambda item: int(item[0])):
            tiles = run.get("wsi_tiles_per_s")
            rows.append(
                [
                    f"{r.device} × {gpus}",
                    f"{r.link(_number(run['pipeline_volumes_per_s']))} "
                    f"(GPU {_number(run['pipeline_gpu_util_percent'])} %)",
                    r.link(_number(tiles)) if tiles else "not measured",
                ]
            )
        scaling = r.data["scaling"]
        for key, label in (("pipeline_efficiency", "pipeline"), ("wsi_efficiency", "WSI")):
            value = scaling.get(key)
            rows.append(
                [f"{r.device}: {label} efficiency", r.link(_number(value)) if value else "one GPU count only", ""]
            )
    if rows:
        lines += [*_table(["GPUs", "pipeline over HTTP, volumes/s", "WSI, tiles/s"], rows), ""]
    return lines


def _postprocess_profile(results: list[_Result]) -> list[str]:
    lines = _POSTPROCESS_PROFILE.splitlines()
    rows = []
    for r in _newest_per_device(results):
        totals = dict(re.findall(r"^(whole|box)\s+total\s+([\d.]+) ms", r.data["text"], re.MULTILINE))
        rows.append([r.device, r.link(totals["whole"]), r.link(totals["box"])])
    lines += [*_table(["GPU", "whole grid, ms", "organ's box, ms"], rows), ""]
    return lines


def render() -> str:
    """The page, from the result files as they are now."""

    def pipeline_device(stem: str, data: dict) -> tuple[str, bool]:
        return data["device"], not data["device"].startswith("CPU")

    pipeline = _load("pipeline-*.json", pipeline_device, lambda data: ",".join(data["models"]))
    sections = [
        _pipeline(pipeline),
        _dicom_decode(_load("pipeline-*.json", pipeline_device, partial=True)),
        _upload_path(_load("upload-path-*.json", _device_in_name("upload-path"))),
        _noisy_neighbour(_load("noisy_neighbour*.json", _noisy_neighbour_device)),
        _wsi(_load("wsi-*.json", _device_in_name("wsi"))),
        _decode(_load("decode-*.json", _device_in_name("decode"))),
        _triton_compare(_load("triton-compare-full-*.json", _device_in_name("triton-compare-full"))),
        _gpu_scaling(_load("gpu-scaling-*.json", _device_in_name("gpu-scaling"))),
        _postprocess_profile(_load("postprocess-profile-*.txt", _device_in_name("postprocess-profile"))),
    ]
    head = [
        "<!-- Generated by `python -m benchmarks.docs_page` from benchmarks/results/: edit that, not this. -->",
        "",
        "# Benchmarks",
        "",
        "Benchmarks are not tests: each compares paths side by side in one run and writes its figures to "
        "`benchmarks/results/`, named with the device and date. This page shows the current figures: for each "
        "benchmark and device, its newest complete result file, each figure linking the file it comes from. Absolute "
        "times are from GPU hosts; a CPU machine's figures are given as ratios. They run from a checkout "
        "(`make venv` first) on any host; GPU figures need a CUDA host with the package's `gpu` extra.",
        "",
    ]
    return "\n".join(head + [line for section in sections for line in section]).rstrip() + "\n"


def on_files(files, config):
    """MkDocs hook: the result files, published at results/<name> beside the page that links them."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.glob("*")):
        if path.suffix in (".json", ".txt"):
            files.append(
                File(
                    f"{_SITE_FOLDER}/{path.name}",
                    src_dir=str(RESULTS.parent),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not current")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if PAGE.read_text() != page:
            print(f"{PAGE} is not current: run python -m benchmarks.docs_page", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
