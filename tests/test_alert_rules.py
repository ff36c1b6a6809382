"""The alerting rules (``dashboards/alerts/medserve.rules.yml``), proven with promtool (Debian's prometheus package;
``.ci/run`` installs it): valid, each unit-tested on synthetic series so that it fires where it should and stays
quiet where it should not, each with a severity, a summary, a description and a runbook section in docs/alerts.md.
One of them fires live from real traffic in tests/test_observability.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from helpers import skip_unless_installed
from serve_app.config.tenancy import AuditConfig
from serve_app.observability import monitoring
from serve_app.tenancy.audit import AuditLog

ALERTS = monitoring.DASHBOARDS / "alerts"
RULES = ALERTS / "medserve.rules.yml"
RULE_TESTS = ALERTS / "medserve.rules.test.yml"
DOCS = Path(__file__).parent.parent / "docs" / "alerts.md"


def promtool() -> str:
    binary = monitoring.find_binary("promtool")
    if binary is None:
        skip_unless_installed("promtool", "promtool (Debian's prometheus package) is not installed here")
    return binary


def alerting_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_the_rules_are_valid():
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_rule_passes_its_unit_tests():
    tested = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=ALERTS, timeout=120
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing_and_quiet():
    """Each alert has a unit test where it fires and one where it does not (an evaluation that expects nothing)."""
    evaluations = [
        check for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for check in test["alert_rule_test"]
    ]
    for rule in alerting_rules():
        mine = [check for check in evaluations if check["alertname"] == rule["alert"]]
        assert any(check.get("exp_alerts") for check in mine), f"{rule['alert']}: no test where it fires"
        assert any(not check.get("exp_alerts") for check in mine), f"{rule['alert']}: no test where it stays quiet"


def test_every_alert_has_a_severity_its_texts_and_a_runbook_section():
    # The anchors mkdocs makes of the page's "## MedserveName" headings.
    headings = {line[3:].strip().lower() for line in DOCS.read_text().splitlines() if line.startswith("## ")}
    for rule in alerting_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        anchor = rule["annotations"]["runbook_url"].rpartition("#")[2]
        assert anchor == name.lower(), name
        assert anchor in headings, f"docs/alerts.md has no section '## {name}'"
    documented = re.findall(r"^## (Medserve\w+)", DOCS.read_text(), flags=re.MULTILINE)
    assert sorted(documented) == sorted(rule["alert"] for rule in alerting_rules())


def test_prometheus_loads_the_rules():
    config = yaml.safe_load((monitoring.DASHBOARDS / "prometheus.yml").read_text())
    assert [(monitoring.DASHBOARDS / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]
    assert monitoring.prometheus_config()["rule_files"] == [str(RULES)]


def test_an_audit_line_that_cannot_be_written_is_counted_and_said_in_one_line(tmp_path):
    """The audit file on a full disk (``/dev/full``: every write fails with ENOSPC), in a child process so that its
    stderr is its own: one line per lost audit line naming the sink, no traceback; the stdout copy still written.
    The count itself goes to ``medserve_audit_write_failures`` (MedserveAuditWriteFailures)."""
    if not os.path.exists("/dev/full"):
        skip_unless_installed("/dev/full", "this system has no /dev/full to fill")
    folder = tmp_path / "audit"
    folder.mkdir(mode=0o700)
    (folder / "audit-test.log").symlink_to("/dev/full")
    script = (
        "import sys; from pathlib import Path\n"
        "from serve_app.config.tenancy import AuditConfig\n"
        "from serve_app.tenancy.audit import AuditLog\n"
        f"log = AuditLog(AuditConfig(directory=Path({str(folder)!r})), Path({str(tmp_path)!r}), 'test')\n"
        "log.write({'route': 'segment', 'status': 200})\n"
        "log.write({'route': 'segment', 'status': 422})\n"
    )
    written = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    assert written.stdout.count('"route":"segment"') == 2  # the stdout copy is whole
    lost = [line for line in written.stderr.splitlines() if "audit line was not written to file" in line]
    assert len(lost) == 2 and "OSError" in lost[0], written.stderr
    assert "Traceback" not in written.stderr, written.stderr


def test_a_writable_audit_log_counts_no_failure(tmp_path, capfd):
    log = AuditLog(AuditConfig(directory=tmp_path / "audit"), tmp_path, "test")
    log.write({"route": "segment", "status": 200})
    assert "not written" not in capfd.readouterr().err
    assert '"status":200' in log.path.read_text()
