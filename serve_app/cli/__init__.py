"""The ``medserve`` command: start and stop the application, send studies, make sample data."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx

from serve_app.config import ConfigError, load_config

DEFAULT_URL = os.environ.get("MEDSERVE_URL", "http://127.0.0.1:8000")
# Ray's own CLI, installed beside this interpreter: found even where the venv is not activated.
_RAY = str(Path(sys.executable).with_name("ray"))
API_KEY_ENV = "MEDSERVE_API_KEY"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start (or join) a Ray cluster and deploy medserve")
    up.add_argument("--config", type=Path, help="application YAML (default: the packaged one)")
    up.add_argument("--address", help="Ray cluster to join (default: the local one, started if absent)")
    up.add_argument("--monitoring", action="store_true", help="also start Prometheus, the GPU exporter and Grafana (where installed) on loopback")
    up.set_defaults(run=_up)

    down = commands.add_parser("down", help="remove medserve and stop the local Ray cluster")
    down.add_argument("--keep-ray", action="store_true", help="leave the Ray cluster running")
    down.set_defaults(run=_down)

    segment = commands.add_parser("segment", help="segment a study: a DICOM folder, a zip, a .dcm or a NIfTI")
    segment.add_argument("path", type=Path)
    segment.add_argument("--model", help="model name (default: the server's only model)")
    segment.add_argument("--out", type=Path, help="where to write the mask (NIfTI)")
    segment.add_argument("--truth", type=Path, help="a ground-truth mask (NIfTI) to report Dice against")
    segment.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL}, or $MEDSERVE_URL)")
    segment.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"the tenant's API key (default ${API_KEY_ENV})")
    segment.add_argument("--stat", action="store_true", help="an emergency read: overtakes queued routine work")
    segment.set_defaults(run=_segment)

    tenant_key = commands.add_parser("tenant-key", help="make a new API key for a tenant; prints it once, with its hash for the config")
    tenant_key.add_argument("tenant_id")
    tenant_key.set_defaults(run=_tenant_key)

    sample = commands.add_parser("sample-ct", help="write a synthetic CT series (DICOM) and its ground truth")
    sample.add_argument("out", type=Path)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=_sample_ct)

    bench = commands.add_parser("bench", help="the side-by-side pipeline benchmark (benchmarks/pipeline.py)")
    # Its options (--size tiny|small|full, --models, --out) are benchmarks/pipeline.py's own, passed through.
    bench.set_defaults(run=_bench)

    export = commands.add_parser("export-onnx", help="export a model to ONNX and check it against torch")
    export.add_argument("model", help="model name in the config's model repository")
    export.add_argument("--out", type=Path, help="ONNX file to write (default: the engine cache the onnxruntime and tensorrt backends read)")
    export.add_argument("--config", type=Path, help="application YAML whose model repository to use (default: the packaged one)")
    export.add_argument("--tolerance", type=float, help="largest max abs difference from torch accepted (default: 1e-3, for fp32)")
    export.set_defaults(run=_export_onnx)

    args, passed_on = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = passed_on
    elif passed_on:
        parser.error(f"unrecognized arguments: {' '.join(passed_on)}")
    try:
        return args.run(args)
    except (ConfigError, CommandError) as e:
        print(f"medserve: {e}", file=sys.stderr)
        return 2


class CommandError(Exception):
    pass


def _up(args) -> int:
    import ray
    from ray import serve

    from serve_app.app import build_app

    config = load_config(args.config)
    if args.address:
        ray.init(address=args.address, logging_level="ERROR")
    else:
        try:
            ray.init(address="auto", logging_level="ERROR")
        except ConnectionError:
            _start_local_ray(dashboard=args.monitoring)
            ray.init(address="auto", logging_level="ERROR")
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=config.name, route_prefix="/", blocking=False)
    url = f"http://{config.http.host}:{config.http.port}"
    wait_until_ready(url, timeout_s=300)
    print(f"medserve is up at {url}  (models: {url}/v1/models)")
    if args.monitoring:
        _start_monitoring()
    return 0


def _start_monitoring() -> None:
    from serve_app.observability import monitoring

    if not monitoring.RAY_SERVICE_DISCOVERY_FILE.exists():
        print(f"medserve: {monitoring.RAY_SERVICE_DISCOVERY_FILE} is missing: Prometheus finds the Ray cluster through it, "
              "and Ray's dashboard writes it (start Ray with its dashboard)", file=sys.stderr)
    try:
        urls = monitoring.start()
    except FileNotFoundError as e:
        raise CommandError(str(e)) from None
    for name, url in urls.items():
        print(f"{name}: {url}")
    if "grafana" not in urls:
        print("grafana is not installed: dashboards/grafana/ holds its provisioning for a Grafana of your own", file=sys.stderr)


def _start_local_ray(dashboard: bool = False) -> None:
    # Deployments ask for fractions of a CPU; advertising at least 4 lets the whole graph fit on 2 cores.
    cpus = max(4, os.cpu_count() or 1)
    # Ray's dashboard writes the service-discovery file Prometheus reads: only worth its memory when monitored.
    command = [_RAY, "start", "--head", f"--num-cpus={cpus}", "--disable-usage-stats", f"--include-dashboard={str(dashboard).lower()}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Poll /readyz; CommandError when the application is not ready in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise CommandError(f"medserve did not become ready at {url} within {timeout_s:.0f} s")


def _down(args) -> int:
    import ray
    from ray import serve

    from serve_app.observability import monitoring

    for name in monitoring.stop():
        print(f"stopped {name}")
    try:
        ray.init(address="auto", logging_level="ERROR")
        serve.shutdown()
        ray.shutdown()
    except ConnectionError:
        print("medserve: no Ray cluster is running", file=sys.stderr)
    if not args.keep_ray:
        subprocess.run([_RAY, "stop"], check=False, stdout=subprocess.DEVNULL)
    print("medserve is down")
    return 0


def _segment(args) -> int:
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=600, headers=auth) as client:
        model = args.model or _only_model(client)
        with _upload_body(args.path) as (body, content_type):
            headers = {"content-type": content_type, "content-length": str(os.fstat(body.fileno()).st_size)}
            params = {"stat": "true"} if args.stat else {}
            response = client.post(f"/v1/models/{model}/segment", content=_chunks(body), headers=headers, params=params)
        result = response.json()
        if response.status_code != 200:
            raise CommandError(f"{response.status_code}: {result.get('error', {}).get('reason', response.text)}")
        if args.out or args.truth:
            mask = client.get(result["mask_url"])
            mask.raise_for_status()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_bytes(mask.content)
        print(f"mask written to {args.out}", file=sys.stderr)
    if args.truth:
        for label, score in _dice_per_label(mask.content, args.truth, result["labels"]).items():
            print(f"Dice against {args.truth} for {label}: {score:.3f}", file=sys.stderr)
    return 0


def _dice_per_label(mask_gz: bytes, truth_path: Path, labels: list[dict]) -> dict[str, float]:
    import gzip

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
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise CommandError(f"{response.status_code}: {response.json()['error']['reason']}")
    names = [m["name"] for m in response.json()["models"]]
    if len(names) != 1:
        raise CommandError(f"the server has several models ({', '.join(names)}); choose one with --model")
    return names[0]


def _chunks(file, size: int = 1 << 20):
    while chunk := file.read(size):
        yield chunk


class _upload_body:
    """A file-like body for the upload: the file itself, or a folder zipped to a temporary file."""

    def __init__(self, path: Path):
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        self.path = path
        self._tmp = None

    def __enter__(self):
        if self.path.is_dir():
            self._tmp = tempfile.NamedTemporaryFile(suffix=".zip")
            with zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED) as zf:
                for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
                    zf.write(f, f.relative_to(self.path).as_posix())
            self._tmp.seek(0)
            return self._tmp, "application/zip"
        self._file = open(self.path, "rb")
        return self._file, "application/octet-stream"

    def __exit__(self, *exc):
        (self._tmp or self._file).close()


def _bench(args) -> int:
    from benchmarks.pipeline import main as bench_main

    bench_main(args.bench_args)
    return 0


def _tenant_key(args) -> int:
    from serve_app.tenancy.keys import hash_api_key, new_api_key

    key = new_api_key()
    print(f"New API key for tenant {args.tenant_id}; it is shown only this once, give it to the hospital:", file=sys.stderr)
    print(key)
    print(f"Add its hash to the config, under tenants.{args.tenant_id}.api_key_hashes:", file=sys.stderr)
    print(f"  - {hash_api_key(key)}")
    return 0


def _sample_ct(args) -> int:
    import numpy as np

    from serve_app.studies.phantoms import ct_phantom
    from serve_app.studies.sample_data import write_ct_series, write_nifti

    phantom = ct_phantom(np.random.default_rng(args.seed))
    paths = write_ct_series(phantom.volume, args.out / "series")
    write_nifti(phantom.label, phantom.volume.affine, args.out / "truth.nii.gz")
    print(f"wrote {len(paths)} DICOM slices to {args.out / 'series'} and the ground truth to {args.out / 'truth.nii.gz'}")
    return 0


def _export_onnx(args) -> int:
    from serve_app.errors import ModelNotFound
    from serve_app.model_repository import ModelRepository, ModelRepositoryError
    from serve_app.engines.onnx_export import FP32_TOLERANCE, OnnxCheckFailed, cached_onnx_path, export_checked

    try:
        spec = ModelRepository(load_config(args.config).model_repository).get(args.model)
    except (ModelNotFound, ModelRepositoryError) as e:
        raise CommandError(e) from None
    out = args.out or cached_onnx_path(spec)
    try:
        check = export_checked(spec, out, FP32_TOLERANCE if args.tolerance is None else args.tolerance)
    except OnnxCheckFailed as e:
        raise CommandError(f"the ONNX export of {args.model} does not match torch, nothing written: {e}") from None
    print(check)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
