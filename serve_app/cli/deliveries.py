"""``medserve deliveries``: the DICOM node's deliveries of the tenant's results to PACS, over the API; ``--resend ID``
sends one again.

    $ medserve deliveries
    9d1c...  pending    pacs      ct-phantom-organ 1.0.0  2 files  attempts 3  2026-12-07T13:02:11
    last error: PACS_MAIN at 10.0.0.5:4242 could not be reached
    $ medserve deliveries --resend 9d1c...
"""

from __future__ import annotations

import os

import httpx

from serve_app.cli.errors import json_answer
from serve_app.cli.segment import API_KEY_ENV, DEFAULT_URL

__all__ = ["add_commands", "delivery_line"]


def add_commands(commands) -> None:
    listing = commands.add_parser("deliveries", help="the tenant's DICOM deliveries to PACS: state, attempts, errors")
    listing.add_argument("--state", choices=["pending", "delivered", "failed"], help="only deliveries in this state")
    listing.add_argument("--resend", metavar="ID", help="send this delivery again (it is pending at once)")
    listing.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL}, or $MEDSERVE_URL)")
    listing.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"the tenant's API key (default ${API_KEY_ENV})"
    )
    listing.add_argument("--timeout", type=float, default=60, help="seconds to wait for the answer (default 60)")
    listing.set_defaults(run=_deliveries)


def delivery_line(delivery: dict) -> str:
    """One delivery as a line (and its last error on a second)."""
    line = (
        f"{delivery['id']}  {delivery['state']:<9}  {delivery['destination']}  {delivery['model']} "
        f"{delivery['model_version']}  {delivery['files']} files  attempts {delivery['attempts']}  "
        f"{delivery['created'][:19]}"
    )
    if delivery.get("last_error"):
        line += f"\n    last error: {delivery['last_error']}"
    return line


def _deliveries(args) -> int:
    auth = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=args.timeout, headers=auth) as client:
        if args.resend:
            print(delivery_line(json_answer(client.post(f"/v1/deliveries/{args.resend}/resend"))))
            return 0
        deliveries = json_answer(client.get("/v1/deliveries"))["deliveries"]
    for delivery in deliveries:
        if args.state is None or delivery["state"] == args.state:
            print(delivery_line(delivery))
    return 0
