"""Tenants over real HTTP, against an application with four hospitals and two ingress replicas."""

import datetime
import hashlib
import hmac
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import SEGMENT, ZIP, assert_no_markers_in_logs, audit_lines, auth, medserve, stall_uploads, zip_files
from serve_app.config import ConfigError, load_config
from serve_app.samples.phantoms import ct_phantom
from serve_app.samples.study_files import write_ct_series
from serve_app.tenancy.keys import hash_api_key


def _series(tmp_path_factory, name, slices, **write_options):
    # The same body whatever the slice count: thinner series have thicker slices.
    phantom = ct_phantom(np.random.default_rng(10_004), shape=(64, 64, slices), spacing=(5.4, 5.4, 96.0 / slices))
    return write_ct_series(phantom.volume, tmp_path_factory.mktemp(name), **write_options)


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory) -> bytes:
    return zip_files(_series(tmp_path_factory, "small", 12))  # about 110 kB


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> bytes:
    return zip_files(_series(tmp_path_factory, "tiny", 6))  # under rural-clinic's 80 kB


@pytest.fixture
def tenants(tenant_url):
    with httpx.Client(base_url=tenant_url, timeout=300) as c:
        yield c


def gate_stats(tenant_config) -> dict:
    from ray import serve

    return serve.get_deployment_handle("TenantGate", tenant_config.name).stats.remote().result()


def wait_for(condition, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the gate"
        time.sleep(0.05)


def test_each_rejection_has_its_code_and_a_reason(tenants, tenant_keys, small_zip, tiny_zip):
    assert tenants.get("/healthz").status_code == 200  # liveness needs no key

    missing = tenants.post(SEGMENT, content=tiny_zip, headers=ZIP)
    assert missing.status_code == 401 and "API key is required" in missing.json()["error"]["reason"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert tenants.get("/v1/models").status_code == 401
    wrong = tenants.post(SEGMENT, content=tiny_zip, headers={**ZIP, "x-api-key": "msk_not-a-key"})
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["reason"]

    other_model = tenants.post(SEGMENT, content=tiny_zip, headers={**ZIP, **auth(tenant_keys["research-lab"])})
    assert other_model.status_code == 403 and "may not use model" in other_model.json()["error"]["reason"]
    no_stat = tenants.post(
        SEGMENT, params={"stat": "true"}, content=tiny_zip, headers={**ZIP, **auth(tenant_keys["rural-clinic"])}
    )
    assert no_stat.status_code == 403 and "STAT" in no_stat.json()["error"]["reason"]
    too_big = tenants.post(SEGMENT, content=small_zip, headers={**ZIP, **auth(tenant_keys["rural-clinic"])})
    assert too_big.status_code == 413 and "limit of 80000" in too_big.json()["error"]["reason"]

    good = tenants.post(SEGMENT, content=tiny_zip, headers={**ZIP, "x-api-key": tenant_keys["rural-clinic"]})
    assert good.status_code == 200, good.text


def test_results_are_readable_only_by_the_tenant_that_made_them(tenants, tenant_keys, tiny_zip):
    made = tenants.post(SEGMENT, content=tiny_zip, headers={**ZIP, **auth(tenant_keys["st-marys"])})
    assert made.status_code == 200, made.text
    summary = f"/v1/results/{made.json()['result_id']}"
    mask = f"{summary}/mask.nii.gz"
    for path in (summary, mask):
        assert tenants.get(path, headers=auth(tenant_keys["st-marys"])).status_code == 200
        assert tenants.get(path, headers=auth(tenant_keys["rural-clinic"])).status_code == 404
        assert tenants.get(path).status_code == 401


def test_rate_quota_is_exact_across_two_ingress_replicas(tenants, tenant_keys, tenant_config):
    # city-general may send 4 requests (its burst) and then one per 100 s. Empty bodies: each admitted
    # request fails fast with a 422 after taking its token, so the count of 422s is the count admitted.
    def send(_):
        return tenants.post(SEGMENT, content=b"", headers={**ZIP, **auth(tenant_keys["city-general"])})

    started = datetime.datetime.now(datetime.UTC)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(send, range(36)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [422] * 4 + [429] * 32
    retry_after = {int(r.headers["retry-after"]) for r in responses if r.status_code == 429}
    assert min(retry_after) >= 1 and max(retry_after) <= 100
    # This test's lines only: an earlier deployment of the tenant app in this session had replicas of its own.
    replicas = {
        line["replica"]
        for line in audit_lines(tenant_config)
        if line["tenant"] == "city-general"
        and datetime.datetime.fromisoformat(line["time"].replace("Z", "+00:00")) >= started
    }
    assert len(replicas) == 2, "both ingress replicas must have taken part for this test to mean anything"


def test_concurrency_quota_is_exact_and_given_back(tenant_url, tenants, tenant_keys, tenant_config):
    stalled = stall_uploads(tenant_url, tenant_keys["rural-clinic"], 2)
    wait_for(lambda: gate_stats(tenant_config)["in_flight"]["rural-clinic"] == 2)
    time.sleep(tenant_config.scheduling.lease_s + 1)  # live requests are renewed, not expired
    assert gate_stats(tenant_config)["in_flight"]["rural-clinic"] == 2

    third = tenants.post(SEGMENT, content=b"", headers={**ZIP, **auth(tenant_keys["rural-clinic"])})
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert "concurrency" in third.json()["error"]["reason"]

    stalled.pop().close()  # the client gives up: its slot comes back
    wait_for(lambda: gate_stats(tenant_config)["in_flight"]["rural-clinic"] == 1)
    fourth = tenants.post(SEGMENT, content=b"", headers={**ZIP, **auth(tenant_keys["rural-clinic"])})
    assert fourth.status_code == 422  # admitted; refused only for its empty body
    stalled.pop().close()
    wait_for(lambda: gate_stats(tenant_config)["in_flight"]["rural-clinic"] == 0)


def test_many_clients_hanging_up_at_once_give_every_count_back(tenant_url, tenant_keys, tenant_config):
    # Serve cancels a cancelled request's downstream calls still waiting to be routed; when many
    # cancellations land together, a give-back made as the request's child would be among them.
    stalled = stall_uploads(tenant_url, tenant_keys["st-marys"], 16)
    wait_for(lambda: gate_stats(tenant_config)["in_flight"]["st-marys"] == 16)
    for connection in stalled:
        connection.close()
    wait_for(lambda: gate_stats(tenant_config)["in_flight"]["st-marys"] == 0, timeout_s=30)


def test_a_stat_request_overtakes_queued_routine_work(tenants, tenant_keys, tenant_config, small_zip):
    headers = {**ZIP, **auth(tenant_keys["st-marys"])}
    finished = {}

    def send(name, stat=False):
        response = tenants.post(SEGMENT, params={"stat": str(stat).lower()}, content=small_zip, headers=headers)
        finished[name] = time.monotonic()
        return response

    with ThreadPoolExecutor(10) as pool:
        routine = [pool.submit(send, f"routine-{i}") for i in range(9)]
        wait_for(lambda: gate_stats(tenant_config)["queued"] >= 6)
        queued = gate_stats(tenant_config)["queued"]
        stat = pool.submit(send, "stat", True)
        responses = [f.result() for f in [*routine, stat]]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    after_stat = [name for name, t in finished.items() if t > finished["stat"]]
    # Of those queued when it came, at most the one that took the other slot beside it may finish first.
    assert len(after_stat) >= queued - 1, (queued, sorted(finished, key=finished.get))


def test_mixed_load_every_request_completes_or_gets_a_clear_4xx(
    tenants, tenant_keys, tenant_config, small_zip, tiny_zip
):
    kinds = {
        "routine": ({**auth(tenant_keys["st-marys"])}, {}, small_zip, {200}),
        "stat": ({**auth(tenant_keys["st-marys"])}, {"stat": "true"}, small_zip, {200}),
        "clinic": ({**auth(tenant_keys["rural-clinic"])}, {}, tiny_zip, {200, 429}),
        "clinic too big": ({**auth(tenant_keys["rural-clinic"])}, {}, small_zip, {413, 429}),
        "no key": ({}, {}, tiny_zip, {401}),
        "other model": ({**auth(tenant_keys["research-lab"])}, {}, tiny_zip, {403}),
        "over rate": ({**auth(tenant_keys["city-general"])}, {}, tiny_zip, {200, 429}),
    }
    plan = (
        ["routine"] * 6
        + ["stat"] * 2
        + ["clinic"] * 6
        + ["clinic too big"] * 2
        + ["no key"] * 2
        + ["other model"] * 2
        + ["over rate"] * 4
    )

    def send(kind):
        headers, params, body, _ = kinds[kind]
        try:
            return kind, tenants.post(SEGMENT, params=params, content=body, headers={**ZIP, **headers})
        except httpx.HTTPError as e:
            return kind, e

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(send, plan))
    assert len(outcomes) == len(plan)
    lost = [(kind, r) for kind, r in outcomes if not isinstance(r, httpx.Response)]
    assert not lost
    unexpected = [(kind, r.status_code, r.text) for kind, r in outcomes if r.status_code not in kinds[kind][3]]
    assert not unexpected
    assert all("retry-after" in r.headers for _, r in outcomes if r.status_code == 429)
    assert any(r.status_code == 429 for kind, r in outcomes if kind == "clinic")  # two at a time, six sent
    wait_for(
        lambda: (
            gate_stats(tenant_config)
            == {"in_flight": dict.fromkeys(tenant_config.tenants, 0), "holding": 0, "queued": 0}
        )
    )


def test_no_patient_data_reaches_any_log_or_error(tenants, tenant_keys, tenant_config, tmp_path_factory):

    patient = {
        "PatientName": "QXLEAKNAME^TESTPERSON",
        "PatientID": "QXLEAKID-77123",
        "PatientBirthDate": "19020304",
        "PatientSex": "O",
        "AccessionNumber": "QXACC99871",
    }
    uid = "1.2.826.0.1.3680043.8.498.4242424242424242"
    series = _series(tmp_path_factory, "phi", 6, patient=patient, study_instance_uid=uid)
    # File names inside a zip are a classic leak: name them after the patient.
    named = {p.with_name(f"{patient['PatientName']}-{patient['PatientID']}-{p.name}") for p in series}
    for src, dst in zip(series, sorted(named), strict=True):
        src.rename(dst)
    study = zip_files(sorted(named))
    key = auth(tenant_keys["st-marys"])

    good = tenants.post(SEGMENT, content=study, headers={**ZIP, **key})
    assert good.status_code == 200, good.text
    other = _series(tmp_path_factory, "phi-other", 6, patient=patient)
    bad_responses = [
        tenants.post(SEGMENT, content=study[:-30], headers={**ZIP, **key}),  # corrupt zip
        tenants.post(SEGMENT, content=zip_files(sorted(named) + other), headers={**ZIP, **key}),  # two series
        tenants.post(SEGMENT, content=study, headers=ZIP),  # no key
    ]
    assert all(400 <= r.status_code < 500 for r in bad_responses), [r.text for r in bad_responses]
    markers = [v for k, v in patient.items() if k != "PatientSex"] + ["QXLEAKNAME", "TESTPERSON", uid]
    for response in [good, *bad_responses]:
        assert not any(m in response.text for m in markers)

    lines = audit_lines(tenant_config)
    salt = (tenant_config.storage.root / "audit" / "salt").read_bytes()
    expected_hash = hmac.new(salt, uid.encode(), hashlib.sha256).hexdigest()
    line = next(line for line in lines if line["request_id"] == good.json()["result_id"])
    assert line["study_hash"] == expected_hash
    assert line["tenant"] == "st-marys" and line["model_version"] == "1.0.0" and line["status"] == 200
    assert {"upload", "queue", "preprocess", "model", "postprocess", "total"} <= set(line["timings_ms"])

    assert_no_markers_in_logs(markers, [*(tenant_config.storage.root / "audit").glob("*.log*")])


def test_cli_segment_sends_the_api_key_and_stat(tenant_url, tenant_keys, tmp_path_factory):
    series = _series(tmp_path_factory, "cli", 6)
    folder = str(series[0].parent)
    segment = ("segment", folder, "--url", tenant_url)
    with_flag = medserve(*segment, "--api-key", tenant_keys["st-marys"], "--stat")
    assert with_flag.returncode == 0, with_flag.stderr
    from_env = medserve(*segment, env={**os.environ, "MEDSERVE_API_KEY": tenant_keys["st-marys"]})
    assert from_env.returncode == 0, from_env.stderr
    refused = medserve(*segment, "--api-key", tenant_keys["rural-clinic"], "--stat")
    assert refused.returncode == 2 and "403" in refused.stderr
    missing = medserve(*segment, env={k: v for k, v in os.environ.items() if k != "MEDSERVE_API_KEY"})
    assert missing.returncode == 2 and "401" in missing.stderr


def test_tenant_key_prints_a_key_once_with_the_hash_for_the_config():
    result = medserve("tenant-key", "st-marys")
    key, hash_line = result.stdout.splitlines()
    assert key.startswith("msk_") and len(key) > 40
    assert hash_line.strip() == f"- {hash_api_key(key)}"
    assert "tenants.st-marys.api_key_hashes" in result.stderr


def test_a_bad_tenant_config_names_the_field(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "tenants:\n  st-marys:\n    name: St Mary's\n    api_key_hashes: [md5:abc]\n"
        "    models: ['*']\n    rate: {per_second: 1, burst: 2}\n    max_concurrent: 2\n"
    )
    with pytest.raises(ConfigError, match=r"tenants\.st-marys\.api_key_hashes\.0"):
        load_config(config)


def test_the_docs_tenant_example_is_a_valid_config(tmp_path):
    readme = (Path(__file__).parents[1] / "docs" / "tenants.md").read_text()
    example = readme.split("<!-- the block below is loaded by tests/test_tenants.py: keep it valid -->")[1]
    example = example.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "tenants.yaml").write_text(example)
    config = load_config(tmp_path / "tenants.yaml")
    assert set(config.tenants) == {"st-marys", "rural-clinic"}
    assert config.tenants["rural-clinic"].may_use("ct-phantom-organ") and not config.tenants["rural-clinic"].stat
