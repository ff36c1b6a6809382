"""The ``medserve`` command: start and stop the application, send studies, make sample data.

One module per group of sub-commands, each adding its own parsers: ``cluster`` (up, reload, down, cluster
render), ``models`` (import-bundle, sample-bundle, input-reference), ``segment``,
``tools`` (tenant-key, sample-ct, sample-slide, export-onnx, bench, bench-wsi), ``wsi`` (submit, status,
wait, cancel, list), ``deliveries`` (the DICOM node's deliveries to PACS), ``rollouts`` (rollout promote, abort).
Every error a user can fix is one line on stderr and exit status 2: ``main`` prints it, httpx's errors too (worded
by ``errors.describe_http_error``)::

    $ medserve segment study/ --url http://127.0.0.1:8000
    medserve: cannot reach http://127.0.0.1:8000: is the server running? (medserve up)

``python -m serve_app.cli`` runs it too.
"""

from __future__ import annotations

import argparse
import sys

import httpx

from serve_app.cli import cluster, deliveries, models, rollouts, segment, tools, wsi
from serve_app.cli.cluster import wait_until_ready
from serve_app.cli.errors import CommandError, describe_http_error
from serve_app.config import ConfigError
from serve_app.storage import set_private_umask

__all__ = ["CommandError", "main", "wait_until_ready"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medserve", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (cluster, models, segment, tools, wsi, deliveries, rollouts):
        module.add_commands(commands)
    # What any command writes (a drain order, rendered manifests, sample studies) may identify a patient or hold a
    # credential: its user's alone.
    set_private_umask()
    args, unknown_args = parser.parse_known_args(argv)
    if getattr(args, "passes_unknown_args", False):
        args.unknown_args = unknown_args
    elif unknown_args:
        parser.error(f"unrecognized arguments: {' '.join(unknown_args)}")
    try:
        return args.run(args)
    except (ConfigError, CommandError) as e:
        print(f"medserve: {e}", file=sys.stderr)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        print(f"medserve: {describe_http_error(e)}", file=sys.stderr)
    return 2
