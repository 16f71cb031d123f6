"""The split of record (router/splitrecord.py), its copy in each process (router/split.py) and
``set_weight``: against a real SQLite registry, and a live router following the command."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from router.changes import TAG_PREFIX, lock_name, tracking_experiment_name
from router.config import ConfigError, Settings, settings_from_mapping
from router.errors import Conflict
from router.logschema import experiment_id
from router.metrics import RouterMetrics
from router.setweight import main as set_weight
from router.split import ChallengerSplit
from router.splitrecord import (
    SPLIT_ACTION,
    SPLIT_TAG,
    Split,
    SplitRecord,
    SplitTagInvalid,
    parse_tag,
    read_split,
    write_split,
)
from tests.conftest import FreshRegistry, RunningRouter
from tests.live_router import RouterDir, wait_until
from tests.metrics_text import scrape
from tests.synthlog import write_config

EID = experiment_id("m", "1", "2")


def _settings(**experiment: object) -> Settings:
    return settings_from_mapping(
        {"model": {"name": "m"}, "routing": {"challenger_weight": 0.1}, "experiment": experiment},
        env={},
    )


def _record(weight: float, epoch: int, eid: str = EID) -> SplitRecord:
    return SplitRecord(weight, eid, epoch, 0.1, 1_700_000_000.0 + epoch, "tester", "test")


def test_a_record_round_trips_and_a_bad_tag_is_named() -> None:
    record = _record(0.3, 2)
    assert parse_tag(record.to_tag()) == record
    assert parse_tag(None) is None
    for bad in (
        "not json",
        json.dumps({"challenger_weight": 0.3}),
        record.to_tag().replace("0.3", "1.5"),
    ):
        with pytest.raises(SplitTagInvalid, match=SPLIT_TAG):
            parse_tag(bad)


def test_the_process_follows_records_of_its_experiment_and_ignores_stale_reads() -> None:
    settings = _settings()
    metrics = RouterMetrics(CollectorRegistry())
    split = ChallengerSplit(settings, metrics)
    split.follow(EID, None)
    assert split.split == Split(0.1, "routing.challenger_weight")
    split.adopt(EID, _record(0.3, 2))
    assert (split.weight, split.split.epoch) == (0.3, 2)
    split.follow(EID, _record(0.2, 1).to_tag())  # a poll that read the registry before epoch 2
    split.follow(EID, None)
    assert (split.weight, split.split.epoch) == (0.3, 2)
    assert metrics.registry.get_sample_value("router_split_epoch") == 2
    split.follow(EID, "garbage")  # kept, and said
    assert split.weight == 0.3 and split.error is not None
    # Another experiment (a new challenger): its own default; another's record does not apply.
    other = experiment_id("m", "1", "3")
    split.follow(other, _record(0.3, 2).to_tag())
    assert split.split == Split(0.1, "routing.challenger_weight")
    # No challenger served: nothing goes to it.
    split.follow(experiment_id("m", "1", None), None)
    assert split.weight == 0.0 and split.split.source == "no_challenger"
    assert metrics.registry.get_sample_value("router_arm_weight", {"arm": "challenger"}) == 0.0


def test_a_ramp_starts_at_its_first_stage() -> None:
    settings = _settings(ramp=[0.05, 0.2, 0.5], ramp_stage_min_s=60)
    metrics = RouterMetrics(CollectorRegistry())
    split = ChallengerSplit(settings, metrics)
    split.follow(EID, None)
    assert split.split == Split(0.05, "experiment.ramp")
    assert split.describe()["ramp"] == {"stages": [0.05, 0.2, 0.5], "stage": 1}
    assert metrics.registry.get_sample_value("router_ramp_stage") == 1
    assert metrics.registry.get_sample_value("router_ramp_stages") == 3
    assert metrics.registry.get_sample_value("router_ramp_stage_min_seconds") == 60


@pytest.mark.parametrize(
    ("ramp", "key"),
    [
        ([0.2, 0.1], "experiment.ramp"),
        ([0.05, 1.0], "experiment.ramp[1]"),
        ([0.0, 0.5], "experiment.ramp[0]"),
        ("0.1", "experiment.ramp"),
    ],
)
def test_a_bad_ramp_is_refused_naming_the_key(ramp: object, key: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        _settings(ramp=ramp)
    with pytest.raises(ConfigError, match=r"^experiment.ramp_stage_min_s:"):
        _settings(ramp_stage_min_s=-1)


def test_a_ramp_needs_split_mode() -> None:
    with pytest.raises(ConfigError, match=r"^experiment\.ramp: needs routing\.mode split"):
        settings_from_mapping(
            {"model": {"name": "m"}, "routing": {"mode": "shadow"}, "experiment": {"ramp": [0.1]}},
            env={},
        )


def test_a_write_is_audited_and_compare_and_set(
    fresh_registry: FreshRegistry, tmp_path: Path
) -> None:
    registry = fresh_registry()
    settings = settings_from_mapping(
        {"model": {"name": registry.model_name, "tracking_uri": registry.tracking_uri}}, env={}
    )
    client = registry.client()
    assert read_split(client, settings, "1", "2") == Split(0.1, "routing.challenger_weight")
    record = write_split(
        client, settings, champion="1", challenger="2", weight=0.4, by="tester", reason="test"
    )
    assert (record.previous, record.challenger_weight, record.epoch) == (0.1, 0.4, 1)
    in_force = read_split(client, settings, "1", "2")
    assert (in_force.challenger_weight, in_force.source, in_force.epoch) == (0.4, "registry", 1)
    run = client.get_run(str(record.run_id))
    assert run.data.tags[f"{TAG_PREFIX}action"] == SPLIT_ACTION
    assert run.data.tags[f"{TAG_PREFIX}by"] == "tester"
    assert (run.data.params["from_weight"], run.data.params["to_weight"]) == ("0.1", "0.4")
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment_by_name(tracking_experiment_name(registry.model_name))
    assert experiment is not None and run.info.experiment_id == experiment.experiment_id
    # The split moved since it was read: nothing written.
    with pytest.raises(Conflict, match="the split moved"):
        write_split(
            client,
            settings,
            champion="1",
            challenger="2",
            weight=0.5,
            by="tester",
            reason="test",
            expected=Split(0.1, "routing.challenger_weight"),
        )
    # The aliases moved: nothing written either.
    with pytest.raises(Conflict, match="the aliases moved"):
        write_split(client, settings, champion="1", challenger="3", weight=0.5, by="t", reason="t")
    assert read_split(client, settings, "1", "2").epoch == 1
    assert not client.search_registered_models(f"name = '{lock_name(registry.model_name)}'")


@pytest.mark.usefixtures("cli_workdir")  # no MLFLOW_TRACKING_URI of the test's; ./mlruns in tmp
def test_set_weight_moves_a_live_router_within_a_poll(
    fresh_registry: FreshRegistry,
    running_router: RunningRouter,
    router_dir: RouterDir,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = fresh_registry()
    config = write_config(
        tmp_path / "config.yaml",
        {
            "model": {
                "name": registry.model_name,
                "tracking_uri": registry.tracking_uri,
                "poll_interval_s": 0.2,
            },
            "prediction_log": {"url": router_dir.log_url},
            "routing": {"challenger_weight": 0.1},
        },
    )
    with running_router(router_dir.settings(registry, model={"poll_interval_s": 0.2})) as client:
        assert set_weight(["--config", str(config), "0.35"]) == 0
        said = capsys.readouterr().out
        assert "challenger weight 0.1 -> 0.35" in said and "within model.poll_interval_s" in said
        wait_until(
            lambda: scrape(client).total("router_arm_weight", arm="challenger") == 0.35,
            "the router to follow set_weight",
        )
        split = client.get("/experiment").json()["split"]
    assert (split["challenger_weight"], split["source"], split["epoch"]) == (0.35, "registry", 1)
    assert set_weight(["--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["challenger_weight"], shown["source"]) == (0.35, "registry")


@pytest.mark.usefixtures("cli_workdir")
def test_set_weight_errors_are_one_line(
    fresh_registry: FreshRegistry, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = fresh_registry()
    registry.client().delete_registered_model_alias(registry.model_name, "challenger")
    config = write_config(
        tmp_path / "config.yaml",
        {"model": {"name": registry.model_name, "tracking_uri": registry.tracking_uri}},
    )
    assert set_weight(["--config", str(config), "0.2"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("set_weight: error: no experiment running") and "@challenger" in line
    with pytest.raises(SystemExit) as usage:
        set_weight(["--config", str(config), "1.5"])
    assert usage.value.code == 2
    capsys.readouterr()
    assert set_weight(["--config", str(tmp_path / "missing.yaml"), "0.2"]) == 2  # as every command
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("set_weight: configuration error:"), line
