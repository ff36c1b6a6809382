"""The audit trail: one JSON line per request, to a rotating file and to stdout.

A line names the tenant, model and version, the outcome and HTTP status and per-stage timings, and
the StudyInstanceUID only as HMAC-SHA256 under a secret salt: the same study always gets the same
hash (so an audit can follow it), but the hash cannot be turned back into the UID without the salt.
Nothing a client sent goes in verbatim: no file names, no patient tags, no raw UIDs.

The salt is ``$MEDSERVE_AUDIT_SALT`` where the cluster runs, else a random one made once and kept
at ``<audit directory>/salt`` (mode 0600), which every ingress replica on the shared storage reads.
Each ingress replica writes its own file, ``audit-<replica>.log``: two processes must not rotate one file.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path

from serve_app.config.tenancy import AuditConfig
from serve_app.observability.metrics import count_audit_write_failure
from serve_app.storage import private_folder

SALT_ENV = "MEDSERVE_AUDIT_SALT"


def audit_salt(directory: Path) -> bytes:
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV].encode()
    path = directory / "salt"
    if not path.exists():
        # Written aside then hard-linked into place: link fails if another replica won the race,
        # and a reader never sees a half-written salt.
        draft = directory / f".salt.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # 0600 from its first byte
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_bytes().strip()


class AuditLog:
    def __init__(self, settings: AuditConfig, storage_root: Path, writer: str):
        directory = private_folder(settings.directory or storage_root / "audit")
        self.salt = audit_salt(directory)
        self.writer = writer
        self.path = directory / f"audit-{writer}.log"
        self.logger = logging.getLogger(f"medserve.audit.{writer}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # its own handlers only: the lines must not be reformatted elsewhere
        self.logger.handlers.clear()
        for handler in (
            _AuditFileHandler(self.path, maxBytes=settings.max_bytes, backupCount=settings.backup_count),
            _AuditStreamHandler(sys.stdout),
        ):
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)

    def study_hash(self, study_instance_uid: str | None) -> str | None:
        if not study_instance_uid:
            return None
        return hmac.new(self.salt, study_instance_uid.encode(), hashlib.sha256).hexdigest()

    def write(self, record: dict) -> None:
        now = datetime.datetime.now(datetime.UTC)
        line = {"time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), **record}
        self.logger.info(json.dumps(line, separators=(",", ":")))


class _CountedFailures:
    """A handler that counts each line it could not write (``medserve_audit_write_failures``, alerted on) and says so
    in one line on stderr, instead of logging's traceback per line. ``logging`` calls ``handleError`` from inside
    the ``except`` of the failed write."""

    sink = ""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        count_audit_write_failure(self.sink)
        error = sys.exc_info()[1]
        sys.stderr.write(f"medserve: an audit line was not written to {self.sink}: {type(error).__name__}: {error}\n")


class _AuditFileHandler(_CountedFailures, RotatingFileHandler):
    sink = "file"


class _AuditStreamHandler(_CountedFailures, logging.StreamHandler):
    sink = "stdout"
