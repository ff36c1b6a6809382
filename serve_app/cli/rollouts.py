"""``medserve rollout promote|abort MODEL``: end a model's rollout (``rollouts.<model>`` in the config).

    $ medserve rollout promote organ
    medserve: the rollout of organ 1.1.0 is promoted: version 1.1.0 answers every study of organ
    $ medserve rollout abort organ --reason "volumes too small on our scanners"

An administrator's action, as ``medserve down`` is: it writes the rollout's new state to the application's shared
storage (``<storage.root>/rollouts/``), where every ingress replica sees it within a request, and audits it. Whoever
runs it needs the config and that storage, not an API key. ``GET /v1/models/{name}/rollout`` shows the state.
"""

from __future__ import annotations

import getpass
from pathlib import Path

from serve_app.cli.errors import CommandError

__all__ = ["add_commands"]


def add_commands(commands) -> None:
    rollout = commands.add_parser("rollout", help="promote or abort a model's rollout (shadow or canary)")
    actions = rollout.add_subparsers(dest="action", required=True)
    for action, text in (
        ("promote", "the candidate answers every study of the model from now on"),
        ("abort", "the live version answers every study of the model again; the candidate runs no more"),
    ):
        parser = actions.add_parser(action, help=text)
        parser.add_argument("model", help="the model's name (a key of rollouts: in the config)")
        parser.add_argument("--reason", help="why, for the audit line and GET /v1/models/{name}/rollout")
        parser.add_argument("--config", type=Path, help="application YAML (default: the one medserve up was given)")
        parser.set_defaults(run=_change, state="promoted" if action == "promote" else "aborted", address=None)


def _change(args) -> int:
    from serve_app.cli.cluster import _started_application
    from serve_app.segmentation.rollouts import RolloutLedger, audit_rollout, rollout_id
    from serve_app.tenancy.audit import AuditLog

    config, _, _ = _started_application(args)
    rollout = config.rollouts.get(args.model)
    if rollout is None:
        configured = ", ".join(config.rollouts) or "none"
        raise CommandError(f"model {args.model!r} has no rollout in the config (rollouts: {configured})")
    ledger = RolloutLedger.of(config, args.model)
    identity = rollout_id(args.model, rollout)
    by = f"medserve rollout {'promote' if args.state == 'promoted' else 'abort'} by {getpass.getuser()}"
    reason = args.reason or ("promoted by an operator" if args.state == "promoted" else "aborted by an operator")
    changed = ledger.change(identity, args.state, f"{reason} ({by})")
    if changed is None:
        state = ledger.state(identity)
        raise CommandError(f"the rollout of {args.model} {rollout.candidate} is already {state.state}: {state.reason}")
    event = "promoted" if args.state == "promoted" else "aborted"
    audit_rollout(AuditLog(config.audit, config.storage.root, "cli"), args.model, rollout.candidate, event, reason, by)
    answers = f"version {rollout.candidate}" if args.state == "promoted" else "the live version"
    print(f"medserve: the rollout of {args.model} {rollout.candidate} is {event}: {answers} answers every study")
    return 0
