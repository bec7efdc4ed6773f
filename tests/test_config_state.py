"""Configuration: schema validation, the fold of config events, and planning changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shared.bus import Bus
from shared.config import state
from shared.config.model import CaduceusConfig, ConfigError
from shared.config.state import fold, plan_changes, read_all

VALID = {
    "settings": {"series_complete_seconds": 30},
    "targets": {"pacs": {"type": "dicom", "host": "127.0.0.1", "port": 104, "called_aet": "PACS",
                         "owner": "it", "description": "main archive"}},
    "rules": {"ct": {"filter": "@Modality@ == 'CT'", "targets": "pacs"},
              "rest": {"filter": "True", "action": "discard", "fallback": True}},
    "modules": {"anon": {"image": "caduceus/anon:1"}},
}


def test_valid_config_parses_and_normalises_single_target() -> None:
    config = CaduceusConfig.parse(VALID)
    assert config.rules["ct"].targets == ["pacs"]
    assert config.targets["pacs"].owner == "it"


@pytest.mark.parametrize(("change", "message"), [
    ({"rules": {"r": {"filter": "True", "targets": ["nowhere"]}}}, "unknown target 'nowhere'"),
    ({"rules": {"r": {"filter": "@Modality@ ==", "action": "discard"}}}, "rules.r.filter"),
    ({"rules": {"r": {"filter": "__import__('os')", "action": "discard"}}}, "rules.r.filter"),
    ({"rules": {"r": {"filter": "True", "action": "route"}}}, "needs at least one target"),
    ({"targets": {"t": {"type": "dicom", "host": "x"}}}, "targets.t.port"),
    ({"targets": {"t": {"type": "dicom", "host": "x", "port": 70000, "called_aet": "A"}}}, "targets.t.port"),
    ({"settings": {"series_complete_seconds": "soon"}}, "settings.series_complete_seconds"),
    ({"settings": {"no_such_setting": 1}}, "settings.no_such_setting"),
    ({"rules": {"r": {"filter": "True", "action": "process", "modules": ["ghost"]}}}, "unknown module 'ghost'"),
    ({"bogus": {}}, "unknown top-level key"),
    ({"rules": {"../evil": {"filter": "True", "action": "discard"}}}, "rules.../evil"),
    # Values the services could not schedule with or encode (inf, 1e308 and 10**20 used to pass):
    ({"settings": {"series_complete_seconds": float("inf")}}, "settings.series_complete_seconds"),
    ({"settings": {"study_force_complete_seconds": 1e308}}, "settings.study_force_complete_seconds"),
    ({"settings": {"dispatch_retry_wait_seconds": float("inf")}}, "settings.dispatch_retry_wait_seconds"),
    ({"settings": {"dispatch_retry_max_wait_seconds": 1e308}}, "settings.dispatch_retry_max_wait_seconds"),
    ({"settings": {"dispatch_retries": 10**20}}, "settings.dispatch_retries"),
    ({"settings": {"retention_days": float("inf")}}, "settings.retention_days"),
    ({"settings": {"retention_days": float("nan")}}, "settings.retention_days"),
    ({"settings": {"max_pdu": 2**32}}, "settings.max_pdu"),
    ({"rules": {"r": {"filter": "True", "action": "discard", "series_complete_seconds": float("inf")}}},
     "rules.r.series_complete_seconds"),
    ({"modules": {"anon": {"image": "x", "timeout_seconds": float("inf")}}}, "modules.anon.timeout_seconds"),
    # The EVENTS stream must keep events longer than anything may wait on it, plus a week.
    ({"settings": {"events_retention_days": 7}}, "settings.events_retention_days"),
    ({"settings": {"events_retention_days": float("inf")}}, "settings.events_retention_days"),
    ({"settings": {"events_retention_days": 20, "study_force_complete_seconds": 14 * 86400}},
     "an open study until it is forced complete (study_force_complete_seconds) can keep an event on the "
     "EVENTS stream for 14.0 days, and retention must leave 7 days beyond that; set it to at least 21.1"),
    ({"settings": {"dispatch_retries": 100, "dispatch_retry_max_wait_seconds": 86400}},
     "settings.events_retention_days: 90 days is too short: a dispatch task's retry waits (100 retries"),
    # Values a sender or peer would refuse at every association (found by an interoperability review).
    ({"settings": {"allowed_hosts": ["localhost"]}}, "'localhost' is not an IP address or CIDR network"),
    ({"settings": {"allowed_hosts": ["10.0.0.0/33"]}}, "'10.0.0.0/33' is not an IP address or CIDR network"),
    ({"settings": {"allowed_calling_aets": ["A" * 17]}}, "longer than 16 characters"),
    ({"settings": {"allowed_calling_aets": ["CT\\1"]}}, "other than a backslash"),
    ({"settings": {"ae_title": "   "}}, "settings.ae_title"),
    ({"settings": {"max_pdu": 1}}, "must be 0 (unlimited) or at least 4096"),
    # Large instances (services/receiver/spool.py): a threshold of 0 would spool every instance.
    ({"settings": {"spool_threshold_mb": 0}}, "settings.spool_threshold_mb"),
    ({"settings": {"spool_threshold_mb": 4097}}, "settings.spool_threshold_mb"),
    ({"settings": {"spool_memory_budget_mb": -1}}, "settings.spool_memory_budget_mb"),
    ({"settings": {"max_instance_mb": -1}}, "settings.max_instance_mb"),
    ({"settings": {"max_instance_mb": 10**6 + 1}}, "settings.max_instance_mb"),
    ({"targets": {"t": {"type": "dicom", "host": "x", "port": 104, "called_aet": "PACS\tX"}}},
     "targets.t.called_aet"),
])
def test_invalid_configs_are_rejected_with_a_pointed_message(change: dict, message: str) -> None:
    raw = {**VALID, **change}
    with pytest.raises(ConfigError) as err:
        CaduceusConfig.parse(raw)
    assert message in str(err.value)


def test_plan_creates_updates_deletes_and_is_empty_when_equal() -> None:
    config = CaduceusConfig.parse(VALID)
    created = plan_changes({}, config, actor="user:alice", comment="initial")
    assert {(e.type, e.config_kind, e.config_name) for e in created} == {
        ("config.item.created", "settings", "global"), ("config.item.created", "targets", "pacs"),
        ("config.item.created", "rules", "ct"), ("config.item.created", "rules", "rest"),
        ("config.item.created", "modules", "anon")}
    assert all(e.actor == "user:alice" and e.payload["comment"] == "initial" for e in created)
    state = fold(created)
    assert plan_changes(state, config, actor="user:alice") == []
    assert CaduceusConfig.from_items(state) == config

    changed = dict(VALID, rules={"ct": {"filter": "@Modality@ == 'MR'", "targets": "pacs"}})
    events = plan_changes(state, CaduceusConfig.parse(changed), actor="user:bob")
    assert {(e.type, e.config_name) for e in events} == {("config.item.updated", "ct"),
                                                         ("config.item.deleted", "rest")}
    state = fold(created + events)
    assert set(CaduceusConfig.from_items(state).rules) == {"ct"}


async def test_config_round_trips_through_the_stream(bus: Bus) -> None:
    config = CaduceusConfig.parse(VALID)
    await bus.publish_many(plan_changes({}, config, actor="user:alice"))
    events = await read_all(bus)
    assert len(events) == 5 and all(e.stream == "CONFIG" for e in events)
    assert CaduceusConfig.from_items(fold(events)) == config


def test_retention_long_enough_for_the_waits_is_accepted() -> None:
    raw = {**VALID, "settings": {"events_retention_days": 22, "study_force_complete_seconds": 14 * 86400}}
    config = CaduceusConfig.parse(raw)
    wait, why = config.longest_stream_wait_seconds()
    assert wait == 14 * 86400 + 900 and "study" in why
    # the defaults: a day for the off-peak window plus five retries capped at an hour each
    wait, why = CaduceusConfig.parse({}).longest_stream_wait_seconds()
    assert wait == 86400 + 60 + 120 + 240 + 480 + 960 and "retry" in why


def test_items_an_older_version_stored_still_fold() -> None:
    # Checks added later apply to what is applied, not to what the CONFIG stream already holds:
    # otherwise every service would fall back to an empty configuration after an upgrade.
    stored = {("settings", "settings"): {"allowed_hosts": ["localhost", "10.0.0.0/8"], "max_pdu": 1},
              ("targets", "t"): {"type": "dicom", "host": "x", "port": 104, "called_aet": "A" * 16}}
    config = CaduceusConfig.from_items(stored)
    assert config.settings.allowed_hosts == ["localhost", "10.0.0.0/8"] and config.settings.max_pdu == 1
    assert CaduceusConfig.parse({"settings": {"allowed_hosts": ["10.0.0.0/8", "::1"], "max_pdu": 4096}})


def test_tls_files_this_host_cannot_read_are_warned_about(tmp_path: Path) -> None:
    cert = tmp_path / "server.pem"
    cert.write_text("x")
    config = CaduceusConfig.parse({
        "settings": {"tls_certificate": str(cert), "tls_key": str(tmp_path / "gone.key")},
        "targets": {"pacs": {"host": "h", "port": 104, "called_aet": "PACS", "tls": {"ca": str(tmp_path)}}}})
    assert config.warnings() == [
        f"settings.tls_key: {tmp_path / 'gone.key'} is not a readable file on this host; it must be one where "
        "the receiver or dispatcher runs, or their TLS will not work",
        f"targets.pacs.tls.ca: {tmp_path} is not a readable file on this host; it must be one where "
        "the receiver or dispatcher runs, or their TLS will not work"]


def test_a_targets_max_associations_is_checked_and_a_larger_parallel_count_warned_about() -> None:
    target = {"host": "h", "port": 104, "called_aet": "PACS"}
    with pytest.raises(ConfigError, match="max_associations"):
        CaduceusConfig.parse({"targets": {"pacs": {**target, "max_associations": 0}}})
    config = CaduceusConfig.parse({"targets": {"pacs": {**target, "max_associations": 2, "parallel_associations": 4}}})
    assert config.targets["pacs"].max_associations == 2
    assert config.warnings() == ["targets.pacs: a task would open 4 parallel associations, but max_associations "
                                 "is 2: it opens at most that many"]
    assert CaduceusConfig.parse({"targets": {"pacs": target}}).targets["pacs"].max_associations is None


async def test_a_follower_whose_stream_check_loses_its_cancel_still_stops(
        bus: Bus, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.11's asyncio.wait_for (inside nats-py's requests) returns the reply instead of
    raising CancelledError when the reply arrives just as its task is cancelled; the follower's
    periodic stream check, a `while True` loop, then carried on and stop(), awaiting it, hung."""
    monkeypatch.setattr(state, "STREAM_CHECK_SECONDS", 0.05)
    await bus.declare_streams()
    follower = state.ConfigFollower(bus)
    await follower.start()
    checking = asyncio.Event()

    async def check_answered_as_cancelled() -> bool:
        checking.set()
        try:
            await asyncio.sleep(3600)   # waiting for the stream info...
        except asyncio.CancelledError:
            return False   # ...which arrived with the cancel: the cancel is lost
        return False

    monkeypatch.setattr(follower, "_replaced", check_answered_as_cancelled)
    await asyncio.wait_for(checking.wait(), 5)
    await asyncio.wait_for(follower.stop(), 5)
