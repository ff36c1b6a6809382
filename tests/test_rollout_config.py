"""The ``rollouts`` config section (serve_app/config/rollout.py): every bad value refused naming its field and the
value; a rollout naming what the repository does not serve refused at start; the canary split and the shadow
fraction as a function of the study, sticky and within a few percent of the weight; the runs file bounded by its
compaction, its counts and windows exact, no record lost to replicas appending at once, an append reading only what
other replicas wrote. No cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serve_app.config import ConfigError, load_config
from serve_app.config.tenancy import AuditConfig
from serve_app.model_repository import ModelRepository
from serve_app.segmentation.rollouts import (
    RolloutLedger,
    Rollouts,
    check_rollouts,
    rollout_id,
    share_of,
    study_identity,
)
from serve_app.tenancy.audit import AuditLog


def _config(tmp_path, rollout: dict):
    path = tmp_path / "rollout.yaml"
    path.write_text("{}\n")
    return load_config(path, overrides={"storage.root": str(tmp_path / "storage"), "rollouts": {"organ": rollout}})


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"candidate": "1.1.0", "mode": "shadow", "fraction": 1.5}, r"rollouts\.organ\.fraction: .*fraction is 1\.5"),
        ({"candidate": "1.1.0", "mode": "shadow", "fraction": 0}, r"rollouts\.organ\.fraction: .*fraction is 0"),
        ({"candidate": "1.1.0", "mode": "canary", "weight": 150}, r"rollouts\.organ\.weight: .*weight is 150"),
        ({"candidate": "1.1.0", "mode": "canary", "weight": -1}, r"rollouts\.organ\.weight: .*weight is -1"),
        ({"candidate": "1.1.0", "mode": "blue-green"}, r"rollouts\.organ\.mode: .*'shadow' or 'canary'"),
        ({"mode": "shadow"}, r"rollouts\.organ\.candidate: Field required"),
        (
            {"candidate": "1.1.0", "mode": "shadow", "abort": {"min_mean_dice": 1.2}},
            r"rollouts\.organ\.abort\.min_mean_dice: .*min_mean_dice is 1\.2",
        ),
        (
            {"candidate": "1.1.0", "mode": "shadow", "abort": {"max_error_ratio": -0.1}},
            r"rollouts\.organ\.abort\.max_error_ratio: .*max_error_ratio is -0\.1",
        ),
        (
            {"candidate": "1.1.0", "mode": "shadow", "abort": {"agreement_window": 0}},
            r"rollouts\.organ\.abort\.agreement_window: .*greater than or equal to 1",
        ),
        ({"candidate": "1.1.0", "live": "1.1.0", "mode": "shadow"}, r"rollouts\.organ: .*both '1\.1\.0'"),
        ({"candidate": "1.1.0", "mode": "shadow", "fractoin": 0.5}, r"rollouts\.organ\.fractoin: Extra inputs"),
    ],
)
def test_a_bad_rollout_is_refused_naming_the_field_and_the_value(tmp_path, rollout, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, rollout)


def test_the_defaults_are_those_the_docs_state(tmp_path):
    config = _config(tmp_path, {"candidate": "1.1.0", "mode": "shadow"}).rollouts["organ"]
    assert (config.fraction, config.weight, config.live, config.max_shadow_in_flight) == (1.0, 10.0, None, 2)
    thresholds = config.abort
    assert (thresholds.min_mean_dice, thresholds.agreement_window, thresholds.min_studies) == (0.9, 50, 10)
    assert (thresholds.max_error_ratio, thresholds.error_window) == (0.1, 50)


def test_a_rollout_the_repository_cannot_serve_is_refused_at_start(tmp_path):
    repository = ModelRepository(load_config().model_repository)  # ct-phantom-organ, one version
    for rollout, message in [
        ({"candidate": "1.0.0", "mode": "shadow"}, r"rollouts\.organ: model 'organ' is not in the repository"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_rollouts(_config(tmp_path, rollout), repository)
    tiles = load_config(overrides={"rollouts": {"he-tile-tumour": {"candidate": "1.0.0", "mode": "canary"}}})
    with pytest.raises(ConfigError, match=r"rollouts\.he-tile-tumour\.mode: 'canary': a tile_classification .* shadow"):
        check_rollouts(tiles, repository)
    config = load_config(overrides={"rollouts": {"ct-phantom-organ": {"candidate": "9.9.9", "mode": "canary"}}})
    with pytest.raises(ConfigError, match=r"rollouts\.ct-phantom-organ\.candidate: version '9\.9\.9' .*versions: 1"):
        check_rollouts(config, repository)
    only = load_config(overrides={"rollouts": {"ct-phantom-organ": {"candidate": "1.0.0", "mode": "canary"}}})
    with pytest.raises(ConfigError, match=r"candidate: '1\.0\.0' is ct-phantom-organ's only version"):
        check_rollouts(only, repository)


def test_the_canary_split_is_within_five_percent_of_its_weight_and_sticky():
    for weight in (10, 30, 50):
        rollout = rollout_id("organ", _rollout_config(weight))
        studies = [f"dicom:1.2.826.0.1.3680043.8.498.{n}" for n in range(200)]
        candidate = [share_of(rollout, study) < weight / 100 for study in studies]
        assert abs(sum(candidate) / len(studies) * 100 - weight) <= 5, (weight, sum(candidate))
        assert candidate == [share_of(rollout, study) < weight / 100 for study in studies]  # the same study, again


def test_a_study_is_the_same_study_whatever_its_files_are_called(tmp_path):
    import numpy as np

    from serve_app.samples.phantoms import ct_phantom
    from serve_app.samples.study_files import write_ct_series

    phantom = ct_phantom(np.random.default_rng(3), shape=(24, 24, 8))
    series = write_ct_series(phantom.volume, tmp_path / "a")
    renamed = tmp_path / "b"
    renamed.mkdir()
    for i, path in enumerate(reversed(series)):
        (renamed / f"x{i}").write_bytes(path.read_bytes())
    assert study_identity(tmp_path / "a") == study_identity(renamed)
    assert study_identity(tmp_path / "a").startswith("dicom:")
    nifti = tmp_path / "c"
    nifti.mkdir()
    (nifti / "study.nii").write_bytes(b"\x5c\x01" + bytes(400))
    assert study_identity(nifti).startswith("files:") and study_identity(nifti) == study_identity(nifti)


def test_the_ledger_keeps_one_state_per_rollout_and_changes_a_running_one_once(tmp_path):
    ledger = RolloutLedger(tmp_path, "app", "organ")
    assert ledger.state("r1").state == "running"
    assert ledger.change("r1", "aborted", "too different").state == "aborted"
    assert ledger.change("r1", "promoted", "no") is None  # aborted stays aborted
    assert ledger.state("r1").reason == "too different"
    assert ledger.state("r2").state == "running"  # a new config section: a new rollout
    assert oct(ledger.state_path.stat().st_mode & 0o777) == "0o600"
    ledger.append("r1", {"role": "live", "outcome": "ok"})
    assert ledger.runs("r1") == [{"role": "live", "outcome": "ok"}] and ledger.runs("r2") == []


def _rollout_config(weight: float):
    from serve_app.config import RolloutConfig

    return RolloutConfig(candidate="1.1.0", mode="canary", weight=weight)


def _two_versions(tmp_path: Path) -> ModelRepository:
    embedded = load_config().model_repository / "ct-phantom-organ"
    for version in ("1.0.0", "1.1.0"):
        folder = tmp_path / "models" / "organ" / version
        shutil.copytree(embedded, folder)
        text = (folder / "model.yaml").read_text().replace("name: ct-phantom-organ", "name: organ")
        (folder / "model.yaml").write_text(text.replace('version: "1.0.0"', f'version: "{version}"'))
    return ModelRepository(tmp_path / "models")


def test_a_rollout_aborts_itself_once_its_window_disagrees_and_every_replica_sees_it(tmp_path):
    repository = _two_versions(tmp_path)
    rollout = {"candidate": "1.1.0", "mode": "shadow", "abort": {"min_studies": 3, "agreement_window": 4}}
    config = _config(tmp_path, rollout)
    audit = AuditLog(AuditConfig(), config.storage.root, "test")
    one, other = (Rollouts(config, repository, audit).of("organ") for _ in range(2))  # two ingress replicas
    assert (one.live.version, one.candidate.version) == ("1.0.0", "1.1.0")  # live: the newest other version
    assert one.route(None) == (one.live, "live") and one.shadows(None)
    for dice in (1.0, 0.5):  # two studies: too few to judge, whatever their agreement
        one.record({"role": "shadow", "outcome": "ok", "mean_dice": dice})
    assert other.state().state == "running"
    other.record({"role": "shadow", "outcome": "ok", "mean_dice": 0.6})  # mean 0.7 over 3 studies
    state = one.state()
    assert state.state == "aborted" and state.reason.startswith("mean Dice 0.700 over the last 3 shadowed studies")
    assert not one.shadows(None) and one.route(None) == (one.live, "live")
    report = one.report()
    assert (report.state, report.window_studies, report.mean_dice, report.counts.shadow) == ("aborted", 3, 0.7, 3)
    lines = [json.loads(line) for line in (config.storage.root / "audit" / "audit-test.log").read_text().splitlines()]
    assert [(line["event"], line["by"]) for line in lines] == [("aborted", "medserve")]


def test_a_canary_aborts_itself_on_errors_and_a_promotion_gives_every_study_to_the_candidate(tmp_path):
    repository = _two_versions(tmp_path)
    rollout = {"candidate": "1.1.0", "mode": "canary", "weight": 50, "abort": {"min_studies": 4}}
    config = _config(tmp_path, rollout)
    canary = Rollouts(config, repository, AuditLog(AuditConfig(), config.storage.root, "test")).of("organ")
    studies = [f"dicom:1.2.3.{n}" for n in range(40)]
    assert {canary.route(study)[1] for study in studies} == {"live", "canary"}
    assert [canary.route(study) for study in studies] == [canary.route(study) for study in studies]
    for outcome in ("ok", "error", "ok", "ok"):  # 25 %, over 10 %
        canary.record({"role": "canary", "outcome": outcome})
    assert canary.state().state == "aborted" and "of the candidate's last 4 runs failed" in canary.state().reason
    assert {canary.route(study)[1] for study in studies} == {"live"}

    promoted = Rollouts(_config(tmp_path, {**rollout, "weight": 10}), repository, canary.audit).of("organ")
    assert promoted.state().state == "running"  # another section: another rollout
    promoted.ledger.change(promoted.id, "promoted", "by hand")
    assert all(promoted.route(study) == (promoted.candidate, "live") for study in studies)


def test_a_tile_models_rollout_judges_the_slides_tumour_mask_dice_and_reports_its_heatmap_differences(tmp_path):
    import numpy as np

    from serve_app.results.agreement import heatmap_agreement

    embedded = load_config().model_repository / "he-tile-tumour"
    for version in ("1.0.0", "1.1.0"):
        folder = tmp_path / "models" / "he-tile-tumour" / version
        shutil.copytree(embedded, folder)
        text = (folder / "model.yaml").read_text()
        (folder / "model.yaml").write_text(text.replace('version: "1.0.0"', f'version: "{version}"'))
    repository = ModelRepository(tmp_path / "models")
    rollout = {"candidate": "1.1.0", "mode": "shadow", "abort": {"min_studies": 2, "agreement_window": 2}}
    path = tmp_path / "rollout.yaml"
    path.write_text("{}\n")
    overrides = {"storage.root": str(tmp_path / "storage"), "rollouts": {"he-tile-tumour": rollout}}
    config = load_config(path, overrides=overrides)
    check_rollouts(config, repository)
    tiles = Rollouts(config, repository, AuditLog(AuditConfig(), config.storage.root, "test")).of("he-tile-tumour")

    live = np.full((4, 5), np.nan, np.float32)
    live[1:3, 1:4] = [[0.9, 0.8, 0.1], [0.7, 0.2, 0.05]]  # 6 tissue tiles, 3 tumour
    same = heatmap_agreement(live, live.copy(), label="tumour", live_area_mm2=0.75, candidate_area_mm2=0.75)
    assert (same.mean_dice, same.heatmap_mean_abs_difference, same.tumour_area_difference_mm2) == (1.0, 0.0, 0.0)
    assert same.dice == {"tumour": 1.0} and same.tumour_area_relative_difference == 0.0
    shifted = live.copy()
    shifted[1:3, 1:4] = [[0.9, 0.3, 0.1], [0.4, 0.2, 0.05]]  # two tumour tiles lost
    worse = heatmap_agreement(live, shifted, label="tumour", live_area_mm2=0.75, candidate_area_mm2=0.25)
    assert worse.mean_dice == 0.5 and worse.heatmap_mean_abs_difference == round(0.8 / 6, 6)
    assert (worse.tumour_area_difference_mm2, worse.tumour_area_relative_difference) == (-0.5, round(-0.5 / 0.75, 6))
    nan = np.full_like(live, np.nan)  # a broken network's answer: no probability at all, so no tumour
    broken = heatmap_agreement(live, nan, label="tumour", live_area_mm2=0.75, candidate_area_mm2=0.0)
    assert broken.mean_dice == 0.0 and broken.heatmap_mean_abs_difference == round(float(np.nanmean(live)), 6)

    tiles.record({"role": "shadow", "outcome": "ok", "job_id": "j", "slide_index": 0, **same.model_dump()})
    report = tiles.report()
    assert (report.mean_dice, report.mean_heatmap_difference, report.mean_tumour_area_difference_mm2) == (1, 0, 0)
    assert report.mean_volume_difference_ml == {} and report.state == "running"
    tiles.record({"role": "shadow", "outcome": "ok", "job_id": "j", "slide_index": 1, **worse.model_dump()})
    state = tiles.state()  # mean tumour Dice 0.75 over 2 slides
    assert state.state == "aborted" and state.reason.startswith("mean Dice 0.750 over the last 2 shadowed studies")
    report = tiles.report()
    assert report.mean_tumour_area_difference_mm2 == -0.25 and report.mean_heatmap_difference == round(0.4 / 6, 6)


def test_the_runs_file_stays_bounded_and_its_counts_and_windows_stay_exact(tmp_path):
    from serve_app.segmentation.rollouts import COMPACT_FACTOR, Rollout

    repository = _two_versions(tmp_path)
    never = {"min_mean_dice": 0, "max_error_ratio": 1, "agreement_window": 5, "error_window": 7, "min_studies": 1}
    config = _config(tmp_path, {"candidate": "1.1.0", "mode": "shadow", "abort": never})
    audit = AuditLog(AuditConfig(), config.storage.root, "test")
    compacted = Rollouts(config, repository, audit).of("organ")
    # The same rollout over a ledger that never compacts: the whole history, to compare with.
    whole = Rollout(
        "organ",
        compacted.config,
        compacted.live,
        compacted.candidate,
        RolloutLedger(tmp_path / "whole", config.name, "organ"),
        audit,
    )
    bound = COMPACT_FACTOR * 7 + 1  # the records, and the totals line
    path = compacted.ledger.folder / f"runs-{compacted.id}.jsonl"
    kinds = [
        {"role": "live", "outcome": "ok"},
        {"role": "shadow", "outcome": "ok"},
        {"role": "shadow", "outcome": "error"},
        {"role": "shadow", "outcome": "dropped"},
        {"role": "canary", "outcome": "ok"},
        {"role": "canary", "outcome": "error"},
    ]
    for n in range(300):
        run = dict(kinds[(n * 7 + n // 5) % len(kinds)])
        if run == {"role": "shadow", "outcome": "ok"}:
            run |= {"mean_dice": round(0.5 + (n % 13) / 26, 3), "volume_difference_ml": {"organ": n % 11 - 5.0}}
        for rollout in (compacted, whole):
            rollout.record(dict(run))
        assert len(path.read_text().splitlines()) <= bound, n
    assert json.loads(path.read_text().splitlines()[0])["totals"]  # it was compacted
    assert len(whole.ledger.runs(whole.id)) == 300
    assert compacted.report() == whole.report()
    report = compacted.report()
    assert sum(report.counts.model_dump().values()) - report.counts.canary_errors == 300
    assert report.window_studies == 5 and compacted.state().state == "running"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_replicas_appending_at_once_lose_no_record_to_a_compaction(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.config.rollout import RolloutAbortConfig

    abort = RolloutAbortConfig(agreement_window=3, error_window=4)
    # One ledger per replica: each append opens its own lock file description, so flock excludes them as it
    # excludes processes.
    replicas = [RolloutLedger(tmp_path, "app", "organ", abort) for _ in range(4)]

    def append(replica: int) -> None:
        for n in range(150):
            role, outcome = [("live", "ok"), ("shadow", "ok"), ("canary", "error")][(replica + n) % 3]
            replicas[replica].append("r1", {"role": role, "outcome": outcome, "mean_dice": 1.0})

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(append, range(4)))
    totals, records = replicas[0].read("r1")
    assert totals == {("live", "ok"): 200, ("shadow", "ok"): 200, ("canary", "error"): 200}
    assert len(records) <= 4 * 4 and len((tmp_path / "rollouts" / "app" / "organ" / "runs-r1.jsonl").read_text()) < 2000


def test_an_append_reads_only_what_other_replicas_wrote_and_its_windows_are_every_replicas(tmp_path, monkeypatch):
    from serve_app.config.rollout import RolloutAbortConfig
    from serve_app.segmentation import rollouts

    # Every byte the appends read, counted (the real reads still happen: a spy, not a stand-in).
    read = []
    read_from = rollouts._read_from
    monkeypatch.setattr(rollouts, "_read_from", lambda *args: read.append(data := read_from(*args)) or data)
    abort = RolloutAbortConfig(agreement_window=3, error_window=4)
    one, other = (RolloutLedger(tmp_path, "app", "organ", abort) for _ in range(2))  # two ingress replicas
    appended = []

    def append(ledger: RolloutLedger, n: int):
        record = {"role": "shadow", "outcome": "ok" if n % 5 else "error", "mean_dice": n / 100}
        if n % 5 == 0:
            del record["mean_dice"]
        appended.append(record)
        return ledger.append("r1", record)

    for n in range(60):  # one replica alone: past its first look, it reads nothing, compactions included
        append(one, n)
    assert sum(map(len, read)) == 0
    for n in range(60, 200):  # two replicas in turn: each reads the other's lines, once, or a file it compacted
        windows = append(one if n % 2 else other, n)
        agreement = [r for r in appended if "mean_dice" in r][-3:]
        errors = appended[-4:]
        assert windows == (agreement, errors), n
    # Each line the other replica wrote, and each file it compacted (at most 7 records, every 9 appends or more):
    # under 2 lines an append, where reading the whole file (up to 17 lines) cost about 12.
    line = sum(len(json.dumps(r, separators=(",", ":"))) + 1 for r in appended) / len(appended)
    assert sum(map(len, read)) < 3 * line * 140
    totals, _ = one.read("r1")
    assert totals == {("shadow", "ok"): 160, ("shadow", "error"): 40}
