"""The tenant gate lost under load: its replica SIGKILLed while four clients send, on the shared tenant application.

The gate (``deployments/gate.py``, one replica) counts every tenant's quotas. While Serve replaces it, the ingress
replicas refuse what needs quotas with 503 + Retry-After at once instead of waiting for the new one
(``serve_app/tenancy/gate_link.py``); the new gate learns the requests still running from the ingress replicas'
leases, so a tenant's concurrency quota holds across the restart. Measured here: the longest any request waited, how
long until requests were admitted again, and what the ingress replicas logged.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
from fault_load import SUMMARY

from helpers import SEGMENT, ZIP, auth, stall_uploads
from serve_app.tenancy.quota import Lease, Quotas

CLIENTS = 4
KILL_AT_S = 2.0
STALL_BOUND_S = 2.0  # no request may wait longer than this, the kill included
BACK_WITHIN_S = 60.0  # Serve must have replaced the gate by then
GATE_HEADING = f"the tenant gate SIGKILLed under {CLIENTS} clients"


def _gate_process(app: str) -> psutil.Process:
    title = f"ray::ServeReplica:{app}:TenantGate"
    for process in psutil.process_iter(["cmdline"]):
        if " ".join(process.info["cmdline"] or []).startswith(title):
            return process
    raise AssertionError(f"no {title} process")


def _gate_stats(app: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("TenantGate", app).stats.remote().result(timeout_s=30)


def _ingress_logs(app: str) -> list[Path]:
    """The ingress replicas' Serve logs, and their processes' stderr (where asyncio and Python print tracebacks)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    title = f"ray::ServeReplica:{app}:Ingress"
    pids = [p.pid for p in psutil.process_iter(["cmdline"]) if " ".join(p.info["cmdline"] or []).startswith(title)]
    assert pids, f"no {title} process"
    stderr = [path for pid in pids for path in logs.glob(f"worker-*-{pid}.err")]
    return sorted(logs.glob(f"serve/replica_{app}_Ingress_*.log")) + stderr


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_killed_gate_stalls_no_request_and_its_successor_keeps_the_counts(tenant_url, tenant_keys, tenant_config):
    app = tenant_config.name
    assert _gate_stats(app)["in_flight"]["rural-clinic"] == 0
    # Two requests of rural-clinic (concurrency 2) hold their counts across the kill: the new gate must know them.
    held = stall_uploads(tenant_url, tenant_keys["rural-clinic"], 2)
    _wait_for(lambda: _gate_stats(app)["in_flight"]["rural-clinic"] == 2)
    log_sizes = {path: path.stat().st_size for path in _ingress_logs(app)}

    # (sent, answered, status, reason, Retry-After), monotonic seconds. An empty upload is admitted at the gate,
    # then refused (422) for its body: each request is one count in and out, at no cost to the CPU.
    answers: list[tuple[float, float, int | str, str, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(
                        f"{tenant_url}{SEGMENT}", content=b"", headers={**ZIP, **auth(tenant_keys["st-marys"])}
                    )
                    reason = answer.json()["error"]["reason"] if answer.status_code != 200 else ""
                    answers.append(
                        (sent, time.monotonic(), answer.status_code, reason, answer.headers.get("retry-after"))
                    )
                except httpx.HTTPError as e:
                    answers.append((sent, time.monotonic(), type(e).__name__, str(e)[:200], None))
                time.sleep(0.1)  # well under st-marys's 100 requests/s

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(KILL_AT_S)
        gate = _gate_process(app)
        killed = time.monotonic()
        gate.send_signal(signal.SIGKILL)
        # Until an admitted request (422) is answered again, sent after the kill: the new gate counts.
        deadline = killed + BACK_WITHIN_S
        while not any(sent > killed and status == 422 for sent, _, status, _, _ in list(answers)):
            assert time.monotonic() < deadline, f"requests not admitted again {BACK_WITHIN_S} s after the kill"
            time.sleep(0.1)
        back = min(answered for sent, answered, status, _, _ in list(answers) if sent > killed and status == 422)
        time.sleep(1.0)  # and a second of steady service after it
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    statuses = Counter(status for _, _, status, _, _ in answers)
    longest = max(answered - sent for sent, answered, _, _, _ in answers)
    refused = [(reason, retry_after) for _, _, status, reason, retry_after in answers if status == 503]
    line = (
        f"{len(answers)} requests, answers {dict(statuses)}; longest wait {longest:.2f} s; "
        f"admitted again {back - killed:.1f} s after the kill"
    )
    SUMMARY.setdefault(GATE_HEADING, []).append(line)
    print(line)
    assert set(statuses) <= {422, 503}, answers
    assert statuses[503] >= 1, "no request refused while the gate was away: was it killed?"
    assert all("tenant gate" in reason and retry_after == "1" for reason, retry_after in refused), refused
    assert longest <= STALL_BOUND_S, line

    # The new gate counted the two held uploads in from their leases: rural-clinic's third request is over quota.
    _wait_for(lambda: _gate_stats(app)["in_flight"]["rural-clinic"] == 2, timeout_s=10)
    third = httpx.post(f"{tenant_url}{SEGMENT}", content=b"", headers={**ZIP, **auth(tenant_keys["rural-clinic"])})
    assert third.status_code == 429 and "concurrency" in third.json()["error"]["reason"], third.text
    for connection in held:
        connection.close()
    _wait_for(lambda: _gate_stats(app)["in_flight"] == {tenant: 0 for tenant in tenant_config.tenants})

    # One line per ingress replica that saw the gate go (and one as it came back), no traceback per request.
    time.sleep(1)  # the replicas' file handlers have flushed by now
    logged = "".join(
        path.read_bytes()[log_sizes.get(path, 0) :].decode(errors="replace") for path in _ingress_logs(app)
    )
    assert "Traceback" not in logged and "ActorDiedError" not in logged.replace("(ActorDiedError)", ""), logged[-3000:]
    # Serve's logger writes each line to the replica's log file and to its stderr: counted in the log files.
    in_serve_logs = "".join(
        path.read_bytes()[log_sizes.get(path, 0) :].decode(errors="replace")
        for path in _ingress_logs(app)
        if path.parent.name == "serve"
    )
    assert 1 <= in_serve_logs.count("the tenant gate is away") <= 2, in_serve_logs[-3000:]


def test_a_restarted_gate_counts_in_the_leases_it_is_handed_but_not_those_that_ended():
    """In process, on ``Quotas`` alone: a new gate adopts running requests from the leases an ingress renews (and
    their slots), never one that already ended here, and an unknown tenant's not at all."""
    now = [0.0]
    tenants = {"a": _tenant(max_concurrent=2)}
    quotas = Quotas(tenants, processing_slots=1, lease_s=10, clock=lambda: now[0])
    quotas.leave("ended")  # its count out arrived before a late renewal
    quotas.renew_leases(
        [Lease("running", "a", holding=True), Lease("ended", "a", holding=False), Lease("x", "nobody", False)]
    )
    assert quotas.stats() == {"in_flight": {"a": 1}, "holding": 1, "queued": 0}
    assert quotas.admit("a", "new") is None
    assert quotas.admit("a", "third").reason == "concurrency"
    now[0] = 11.0  # the running request's ingress stopped renewing: it is given back after the lease
    assert quotas.stats() == {"in_flight": {"a": 0}, "holding": 0, "queued": 0}


def _tenant(max_concurrent: int):
    from serve_app.config.tenancy import TenantConfig

    return TenantConfig.model_validate(
        {
            "name": "A",
            "api_key_hashes": ["sha256:" + "0" * 64],
            "models": ["*"],
            "rate": {"per_second": 100, "burst": 100},
            "max_concurrent": max_concurrent,
        }
    )
