"""The router against a real nats-server: completion, decisions, restarts, late arrivals, studies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from conftest import expire_events
from services.router import service as router_service
from services.router.tests.helpers import (
    FAST,
    TARGETS,
    apply_config,
    of_type,
    published,
    running_router,
    send_image,
    send_series,
    stored_image,
    wait_for,
)
from shared import subjects
from shared.blobstore import LocalBlobStore
from shared.bus import Bus
from shared.events import Event, RouteDecided, RouteRequested, SeriesCompleted, StudyCompleted, make_event
from shared.manifest import read_manifest


@pytest.fixture
def store(data_dir: Path) -> LocalBlobStore:
    return LocalBlobStore(data_dir / "blobs")


def decided(events: list, batch_id: str | None = None) -> list[RouteDecided]:
    out = [RouteDecided.model_validate(e.payload) for e in of_type(events, "route.decided")]
    return [d for d in out if batch_id is None or d.batch_id == batch_id]


async def test_series_completes_and_is_routed(bus: Bus, nats_url: str, data_dir: Path,
                                              store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "ct-to-pacs": {"filter": "@Modality@ == 'CT' and float(tags.SliceThickness) < 2.0",
                       "targets": ["pacs", "archive"], "priority": "urgent"},
        "mr-only": {"filter": "@Modality@ == 'MR'", "targets": ["archive"]},
        "notify-head": {"filter": "'HEAD' in @SeriesDescription@.upper()", "action": "notification",
                        "notification_message": "head CT arrived"}}})
    async with running_router(nats_url, data_dir):
        sent = await send_series(bus, store, "1.2.3", "1.2.3.4", 5,
                                 {"SliceThickness": "1.0", "SeriesDescription": "Head axial"})
        # The same SOP instance again (a re-send): one manifest entry, the latest copy wins.
        again = await send_image(bus, store, "1.2.3", "1.2.3.4", "1.2.3.4.2",
                                 {"SliceThickness": "1.0", "SeriesDescription": "Head axial"}, content=b"newer")
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)

    [completed] = of_type(events, "series.completed")
    payload = SeriesCompleted.model_validate(completed.payload)
    assert payload.instance_count == 5
    assert completed.correlation_id == payload.batch_id
    assert completed.causation_id == again.event_id
    assert (payload.first_seq, payload.last_seq) == (sent[0].stream_seq, again.stream_seq)
    manifest = await read_manifest(store, payload.manifest_key)
    assert sorted(i.sop_uid for i in manifest.instances) == sorted(e.sop_uid or "" for e in sent)
    dup = next(i for i in manifest.instances if i.sop_uid == "1.2.3.4.2")
    assert dup.size == len(b"newer")

    dispatches = of_type(events, "dispatch.requested")
    assert sorted(d.payload["target"] for d in dispatches) == ["archive", "pacs"]
    assert all(d.payload["priority"] == "urgent" and d.payload["manifest_key"] == payload.manifest_key
               and d.correlation_id == payload.batch_id and d.causation_id == completed.event_id
               and d.task_id == d.payload["task_id"] for d in dispatches)
    [note] = of_type(events, "notification.requested")
    assert note.payload["message"] == "head CT arrived"
    [decision] = decided(events)
    assert decision.matched_rules == ["ct-to-pacs", "notify-head"]
    assert {t.task_id for t in decision.tasks} == {d.task_id for d in dispatches} | {note.task_id}
    assert not decision.discarded
    assert [e.rule for e in decision.evaluations] == ["ct-to-pacs", "mr-only", "notify-head"]
    # route.decided is the last event of the flow.
    flow = [e for e in events if e.correlation_id == payload.batch_id]
    assert flow[-1].type == "route.decided"
    # Urgent work lands on the urgent subject the dispatcher pulls first.
    info = await bus.js.stream_info(subjects.EVENTS_STREAM,
                                    subjects_filter=subjects.event_subject("dispatch.requested", "urgent"))
    assert sum((info.state.subjects or {}).values()) == 2


async def test_discard_rule_wins_and_fallback_only_when_nothing_matched(
        bus: Bus, nats_url: str, data_dir: Path, store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "a-research": {"filter": "@StudyDescription@.startswith('RESEARCH')", "action": "discard"},
        "b-ct": {"filter": "@Modality@ == 'CT'", "targets": ["pacs"]},
        "z-fallback": {"filter": "True", "fallback": True, "targets": ["archive"]}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "9.1", "9.1.1", 2, {"StudyDescription": "RESEARCH brain"})
        await send_series(bus, store, "9.2", "9.2.1", 2, {"Modality": "MR"})
        await send_series(bus, store, "9.3", "9.3.1", 2, {"Modality": "CT"})
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 3)

    by_series = {e.series_uid: RouteDecided.model_validate(e.payload) for e in of_type(events, "route.decided")}
    research, mr, ct = by_series["9.1.1"], by_series["9.2.1"], by_series["9.3.1"]
    assert research.discarded and research.matched_rules == ["a-research"] and not research.tasks
    assert [e.rule for e in research.evaluations] == ["a-research"]   # evaluation stopped
    assert mr.matched_rules == ["z-fallback"] and [t.target for t in mr.tasks] == ["archive"]
    assert ct.matched_rules == ["b-ct"] and [t.target for t in ct.tasks] == ["pacs"]
    assert "z-fallback" not in [e.rule for e in ct.evaluations]
    [discarded] = of_type(events, "series.discarded")
    assert discarded.series_uid == "9.1.1" and "a-research" in discarded.payload["reason"]
    assert len(of_type(events, "dispatch.requested")) == 2


async def test_rule_error_and_no_match(bus: Bus, nats_url: str, data_dir: Path, store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "thin": {"filter": "float(@SliceThickness@) < 2", "targets": ["pacs"]}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "7.1", "7.1.1", 3)   # no SliceThickness: float('') fails
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
    [failed] = of_type(events, "rule.failed")
    assert failed.payload["rule"] == "thin" and "float" in failed.payload["error"]
    [decision] = decided(events)
    assert decision.discarded and decision.reason == "no rule matched"
    assert decision.evaluations[0].missing_tags == ["SliceThickness"]
    assert len(of_type(events, "series.discarded")) == 1
    assert not of_type(events, "dispatch.requested")


async def test_late_instances_start_a_new_batch(bus: Bus, nats_url: str, data_dir: Path,
                                                store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": FAST, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "5.1", "5.1.1", 3)
        await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        await send_image(bus, store, "5.1", "5.1.1", "5.1.1.late")
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 2)
    first, second = [SeriesCompleted.model_validate(e.payload) for e in of_type(events, "series.completed")]
    assert (first.instance_count, second.instance_count) == (3, 1)
    assert first.batch_id != second.batch_id
    tasks = {e.payload["task_id"] for e in of_type(events, "dispatch.requested")}
    assert len(tasks) == 2


async def test_restart_mid_series_completes_once(bus: Bus, nats_url: str, data_dir: Path,
                                                 store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": {**FAST, "series_complete_seconds": 2}, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    async with running_router(nats_url, data_dir) as router:
        await send_series(bus, store, "3.1", "3.1.1", 3)
        # The three folded, the series still open, before the router stops (a fixed 0.5 s stood in
        # for the fold; a router slower than that stopped before it had any of them).
        deadline = time.monotonic() + 15
        while len(getattr(router.state.series.get("3.1.1"), "instances", {})) < 3:
            assert time.monotonic() < deadline, "the router did not fold the series"
            await asyncio.sleep(0.05)
        assert len(router.state.series) == 1
    # Router is down; more instances of the same series arrive.
    for i in range(4, 6):
        await send_image(bus, store, "3.1", "3.1.1", f"3.1.1.{i}")
    assert not of_type(await published(bus), "series.completed")
    async with running_router(nats_url, data_dir) as router:
        assert len(router.state.series) == 1 and len(router.state.series["3.1.1"].instances) == 5
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        await asyncio.sleep(1.5)   # give a wrongly duplicated decision the time to show up
    # A third router replays from the checkpoint: nothing is decided again.
    async with running_router(nats_url, data_dir) as router:
        await asyncio.sleep(2.5)
        assert not router.state.series and not router.state.pending
    events = await published(bus)
    [completed] = of_type(events, "series.completed")
    assert completed.payload["instance_count"] == 5
    assert len(of_type(events, "route.decided")) == 1
    assert len(of_type(events, "dispatch.requested")) == 1
    entry = await (await bus.js.key_value(subjects.ROUTER_STATE_BUCKET)).get("checkpoint")
    assert int((entry.value or b"0").decode()) > (completed.stream_seq or 0)


async def test_router_behind_the_stream_does_not_split_a_series(bus: Bus, nats_url: str, data_dir: Path,
                                                                store: LocalBlobStore) -> None:
    """A router that folds slower than the images arrived (here 0.15 s per event, 20 images stored at
    once, 1 s quiet period) must not take its own lag for quiet: measured with the wall clock, the
    series looked complete after each of its first instances and went out in pieces."""
    await apply_config(bus, {"settings": FAST, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    images = [await stored_image(store, "8.1", "8.1.1", f"8.1.1.{i}") for i in range(1, 21)]
    async with running_router(nats_url, data_dir) as router:
        apply = router.state.apply

        def slow_apply(event: Event) -> None:
            time.sleep(0.15)  # blocks the router's loop, as a slow round or a busy machine would
            apply(event)

        router.state.apply = slow_apply  # type: ignore[method-assign]
        await bus.publish_many(images)
        await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) >= 1, timeout=30)
        await asyncio.sleep(1.5)  # time for a wrongly split remainder to show up
    completed = of_type(await published(bus), "series.completed")
    assert [e.payload["instance_count"] for e in completed] == [20]


async def test_crash_between_completion_and_decision(bus: Bus, nats_url: str, data_dir: Path,
                                                     store: LocalBlobStore) -> None:
    """series.completed is stored but the router died before route.decided: the next one decides."""
    await apply_config(bus, {"settings": FAST, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    sent = await send_series(bus, store, "4.1", "4.1.1", 2)
    from services.router.state import batch_id_for
    batch_id = batch_id_for("series", "4.1.1", sent[0].stream_seq or 0)
    completed = make_event("series.completed", "router", SeriesCompleted(
        batch_id=batch_id, manifest_key="manifests/x.json", instance_count=2, first_seq=sent[0].stream_seq or 0,
        last_seq=sent[-1].stream_seq or 0, calling_aet="MODALITY", peer_host="127.0.0.1", tags={"Modality": "CT"}),
        correlation_id=batch_id, study_uid="4.1", series_uid="4.1.1")
    await bus.publish(completed)
    async with running_router(nats_url, data_dir):
        await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        await asyncio.sleep(1.5)
    events = await published(bus)
    assert len(of_type(events, "series.completed")) == 1   # not completed a second time
    [dispatch] = of_type(events, "dispatch.requested")
    assert dispatch.causation_id == completed.event_id and dispatch.correlation_id == batch_id


async def test_study_trigger_with_required_series(bus: Bus, nats_url: str, data_dir: Path,
                                                  store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["pacs"],
                     "study_required_series": "'Axial T2' and ('Sag T1 GRE' or 'Sag T1 TSE')"}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "6.1", "6.1.1", 2, {"Modality": "MR", "SeriesDescription": "Axial T2"})
        # The series completes and is left to the study rule; the study waits for its series.
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        assert not of_type(events, "study.completed") and not of_type(events, "series.discarded")
        await send_series(bus, store, "6.1", "6.1.2", 3, {"Modality": "MR", "SeriesDescription": "sag t1 tse"})
        events = await wait_for(bus, lambda ev: len(of_type(ev, "study.completed")) == 1
                                and any(d.trigger == "study" for d in decided(ev)))
    [study] = of_type(events, "study.completed")
    payload = StudyCompleted.model_validate(study.payload)
    assert payload.trigger == "required_series" and payload.series_uids == ["6.1.1", "6.1.2"]
    assert payload.instance_count == 5
    manifest = await read_manifest(store, payload.manifest_key)
    assert manifest.level == "study" and len(manifest.instances) == 5
    [study_decision] = [d for d in decided(events) if d.trigger == "study"]
    assert study_decision.matched_rules == ["mr-study"]
    [dispatch] = of_type(events, "dispatch.requested")
    assert dispatch.correlation_id == payload.batch_id and dispatch.series_uid is None


async def test_study_force_timeout_and_admin_request(bus: Bus, nats_url: str, data_dir: Path,
                                                     store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": {**FAST, "study_force_complete_seconds": 3}, "targets": TARGETS,
                             "rules": {
        "ct-study": {"filter": "@Modality@ == 'CT'", "trigger": "study", "targets": ["pacs"],
                     "study_required_series": "'never sent'", "study_force_action": "discard"},
        "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["archive"]}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "8.1", "8.1.1", 2, {"Modality": "CT"})
        await send_series(bus, store, "8.2", "8.2.1", 2, {"Modality": "MR"})
        await bus.publish(make_event("study.complete_requested", "user:admin", {"reason": "operator"},
                                     study_uid="8.2"))
        events = await wait_for(bus, lambda ev: len(of_type(ev, "study.completed")) == 2, timeout=20)
    by_study = {e.study_uid: StudyCompleted.model_validate(e.payload) for e in of_type(events, "study.completed")}
    assert by_study["8.2"].trigger == "forced" and by_study["8.2"].action == "proceed"
    assert by_study["8.1"].trigger == "force_timeout" and by_study["8.1"].action == "discard"
    events = await published(bus)
    [dispatch] = of_type(events, "dispatch.requested")
    assert dispatch.payload["target"] == "archive"
    [discarded] = [e for e in of_type(events, "series.discarded") if e.study_uid == "8.1"]
    assert discarded.payload["batch_id"] == by_study["8.1"].batch_id


async def test_router_says_when_its_checkpoint_expired_from_the_stream(bus: Bus, nats_url: str, data_dir: Path,
                                                                      store: LocalBlobStore) -> None:
    await apply_config(bus, {"settings": {**FAST, "series_complete_seconds": 600}, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    async with running_router(nats_url, data_dir):
        [first, *_] = await send_series(bus, store, "9.1", "9.1.1", 2)
        kv = await bus.js.key_value(subjects.ROUTER_STATE_BUCKET)
        deadline = time.monotonic() + 15
        while True:
            entry = await kv.get(subjects.ROUTER_CHECKPOINT_KEY)
            if int((entry.value or b"0").decode()) == first.stream_seq:
                break
            assert time.monotonic() < deadline, "checkpoint not saved"
            await asyncio.sleep(0.2)
    # The router stays stopped for longer than the stream keeps events (a second here).
    await expire_events(bus, first.stream_seq or 0)
    await bus.js.update_stream(subjects.events_stream_config())
    async with running_router(nats_url, data_dir):
        events = await wait_for(bus, lambda ev: any(e.payload.get("source") == "router"
                                                    for e in of_type(ev, "alert.raised")))
    [alert] = [e for e in of_type(events, "alert.raised") if e.payload["source"] == "router"]
    assert alert.payload["severity"] == "error"
    assert f"EVENTS sequence {first.stream_seq}" in alert.payload["message"]


async def test_an_idle_router_moves_its_checkpoint_to_the_streams_head(
        bus: Bus, nats_url: str, data_dir: Path, store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_service, "IDLE_CHECKPOINT_SECONDS", 0.2)
    await apply_config(bus, {"settings": FAST, "targets": TARGETS,
                             "rules": {"all": {"filter": "True", "targets": ["pacs"]}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "8.1", "8.1.1", 2)
        await wait_for(bus, lambda ev: len(of_type(ev, "dispatch.requested")) == 1)
        # Events the router does not fold (here alerts) move the stream on.
        for n in range(3):
            await bus.publish(make_event("alert.raised", "test", {"severity": "info", "source": "t", "message": f"{n}"}))
        head = await bus.last_seq(subjects.EVENTS_STREAM)
        kv = await bus.js.key_value(subjects.ROUTER_STATE_BUCKET)
        deadline = time.monotonic() + 15
        while int(((await kv.get(subjects.ROUTER_CHECKPOINT_KEY)).value or b"0").decode()) != head + 1:
            assert time.monotonic() < deadline, "the checkpoint stayed behind the head"
            await asyncio.sleep(0.1)
    # A restarted router replays nothing and decides nothing again.
    async with running_router(nats_url, data_dir) as router:
        await asyncio.sleep(1.5)
        assert not router.state.series and not router.state.pending
    assert len(of_type(await published(bus), "route.decided")) == 1


async def test_a_rerouted_series_is_not_left_to_study_rules(bus: Bus, nats_url: str, data_dir: Path,
                                                            store: LocalBlobStore) -> None:
    """A series discarded while no rule existed, rerouted once only a study rule matches it: no study
    decision follows a reroute (its study batch was dropped, or decided, long ago), so leaving the
    series to the study rules put it in 'routed' with no task: neither delivered nor discarded."""
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "9.1", "9.1.1", 2, {"Modality": "MR"})
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        [completed] = of_type(events, "series.completed")
        await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
            "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["pacs"]}}},
            running=["router"])
        batch_id = f"{completed.payload['batch_id']}~r1"  # what `caduceus reroute --series` asks
        await bus.publish(make_event("route.requested", "user:admin", RouteRequested(
            batch_id=batch_id, original_batch_id=completed.payload["batch_id"], completed_type="series.completed",
            completed=completed.payload), study_uid="9.1", series_uid="9.1.1", causation_id=completed.event_id))
        events = await wait_for(bus, lambda ev: len(decided(ev, batch_id)) == 1)
    [again] = decided(events, batch_id)
    assert again.discarded and not again.tasks
    assert [e.payload["batch_id"] for e in of_type(events, "series.discarded")][-1] == batch_id
    assert "--study" in again.reason


async def test_a_study_whose_series_were_left_to_study_rules_is_decided_when_those_rules_go(
        bus: Bus, nats_url: str, data_dir: Path, store: LocalBlobStore) -> None:
    """Its series were decided 'left to the study rules' (no task, not discarded); the study rule is
    then removed. The open study batch was dropped without a word: its images neither delivered nor
    discarded, and no study.completed for `caduceus reroute --study` to find."""
    await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {
        "mr-study": {"filter": "@Modality@ == 'MR'", "trigger": "study", "targets": ["pacs"],
                     "study_required_series": "'never sent'"}}})
    async with running_router(nats_url, data_dir):
        await send_series(bus, store, "9.2", "9.2.1", 2, {"Modality": "MR", "SeriesDescription": "Axial T2"})
        await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 1)
        await apply_config(bus, {"settings": FAST, "targets": TARGETS, "rules": {}}, running=["router"])
        events = await wait_for(bus, lambda ev: len(of_type(ev, "route.decided")) == 2)
    [study] = of_type(events, "study.completed")
    assert study.study_uid == "9.2" and study.payload["series_uids"] == ["9.2.1"]
    [discarded] = of_type(events, "series.discarded")
    assert discarded.payload["batch_id"] == study.payload["batch_id"]
    assert discarded.payload["reason"] == "no rule matched"
