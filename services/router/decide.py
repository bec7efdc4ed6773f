"""Routing decisions: which rules match a completed batch, and the events that follow.

Semantics (mercure's, made explicit):
- only enabled rules of the batch's level (trigger series / study) take part, in name order;
- rules are evaluated on the tags of the batch's first instance;
- a matching `discard` rule stops the evaluation and discards the batch, whatever matched before
  it (no task is created);
- `fallback` rules are evaluated only when no other rule matched;
- when nothing matched the batch is discarded (`series.discarded`, reason "no rule matched"),
  except a series batch while enabled study rules exist: the study decision will handle it;
- a rule whose filter fails at run time (float('') ...) counts as not matched and gets a
  `rule.failed` event.

Every event id and task id is derived from the batch id, rule and target, so deciding a batch a
second time after a crash publishes exactly the same events (dropped by de-duplication). The list
ends with `route.decided`, whose arrival on the stream marks the batch as decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.config.model import CaduceusConfig, Rule
from shared.events import (
    DispatchRequested,
    Event,
    NotificationRequested,
    ProcessRequested,
    RouteDecided,
    RuleEvaluation,
    RuleFailed,
    SeriesCompleted,
    SeriesDiscarded,
    StudyCompleted,
    TaskRef,
    deterministic_event_id,
    make_event,
)
from shared.rule_order import evaluate_in_order

ACTOR = "router"


@dataclass
class _Batch:
    level: str
    batch_id: str
    manifest_key: str
    instance_count: int
    tags: dict[str, str]
    calling_aet: str
    peer_host: str
    action: str
    cause: Event
    envelope: dict[str, Any] = field(default_factory=dict)


def _batch(completed: Event) -> _Batch:
    envelope = {"correlation_id": None, "causation_id": completed.event_id,
                "study_uid": completed.study_uid}
    if completed.type == "series.completed":
        s = SeriesCompleted.model_validate(completed.payload)
        envelope["series_uid"] = completed.series_uid
        envelope["correlation_id"] = s.batch_id
        return _Batch("series", s.batch_id, s.manifest_key, s.instance_count, s.tags, s.calling_aet,
                      s.peer_host, "proceed", completed, envelope)
    st = StudyCompleted.model_validate(completed.payload)
    envelope["correlation_id"] = st.batch_id
    return _Batch("study", st.batch_id, st.manifest_key, st.instance_count, st.tags, st.calling_aet,
                  st.peer_host, st.action, completed, envelope)


def decide(completed: Event, config: CaduceusConfig, rerouted: bool = False,
           study_tags: dict[str, str] | None = None) -> list[Event]:
    """The events for a `series.completed` / `study.completed` event; `route.decided` is last.

    `rerouted`: the batch is decided again on request (`route.requested`). No study decision
    follows that, so a series no series rule takes is discarded rather than left to the study rules.
    `study_tags`: a series batch's study's first instance (what the study decision will see).
    """
    batch = _batch(completed)
    if batch.action != "proceed":
        return _forced_without_rules(batch)
    events: list[Event] = []
    evaluations: list[RuleEvaluation] = []
    order = evaluate_in_order(config, batch.level, batch.tags, study_tags if batch.level == "series" else None)
    for name, rule, result in order.evaluated:
        evaluations.append(RuleEvaluation(rule=name, matched=result.matched, error=result.error,
                                          missing_tags=result.missing_tags))
        if result.error:
            events.append(_event(batch, "rule.failed", RuleFailed(rule=name, filter=rule.filter,
                                                                  error=result.error), name))
    matched, discard_rule = order.matched, order.discard_rule
    matched_names = [name for name, _ in matched] + ([discard_rule] if discard_rule else [])
    left_to_study = order.left_to_study_rules(config, batch.level)
    if left_to_study and not rerouted:
        reason = "no series rule matched; left to the study rules"
        events.append(_decided(batch, evaluations, [], [], False, reason))
        return events
    if discard_rule is not None or not matched:
        reason = f"discarded by rule '{discard_rule}'" if discard_rule else "no rule matched"
        if left_to_study:
            reason = "no series rule matched (study rules decide whole studies: caduceus reroute --study)"
        events.append(_discarded(batch, reason))
        events.append(_decided(batch, evaluations, matched_names, [], True, reason))
        return events
    tasks: list[TaskRef] = []
    for name, rule in matched:
        for event, task in _tasks_for(batch, name, rule):
            events.append(event)
            tasks.append(task)
    reason = f"matched {', '.join(matched_names)}"
    events.append(_decided(batch, evaluations, matched_names, tasks, False, reason))
    return events


def _event(batch: _Batch, type_: str, payload: Any, *id_parts: str, task_id: str | None = None) -> Event:
    event = make_event(type_, ACTOR, payload, task_id=task_id, **batch.envelope)
    event.event_id = deterministic_event_id(type_, batch.batch_id, *id_parts)
    return event


def _task_id(batch: _Batch, rule: str, kind: str, target: str = "") -> str:
    return deterministic_event_id("task", batch.batch_id, rule, kind, target)


def _tasks_for(batch: _Batch, name: str, rule: Rule) -> list[tuple[Event, TaskRef]]:
    out: list[tuple[Event, TaskRef]] = []
    if rule.action == "route":
        for target in rule.targets:
            task_id = _task_id(batch, name, "dispatch", target)
            payload = DispatchRequested(task_id=task_id, rule=name, target=target,
                                        manifest_key=batch.manifest_key, instance_count=batch.instance_count,
                                        priority=rule.priority, calling_aet=batch.calling_aet,
                                        peer_host=batch.peer_host)
            out.append((_event(batch, "dispatch.requested", payload, name, target, task_id=task_id),
                        TaskRef(task_id=task_id, kind="dispatch", rule=name, target=target)))
    elif rule.action in ("process", "both"):
        # "both" = process, then send the results to the rule's targets (the processor does that).
        task_id = _task_id(batch, name, "process")
        targets = list(rule.targets) if rule.action == "both" else []
        process = ProcessRequested(task_id=task_id, rule=name, modules=list(rule.modules),
                                   manifest_key=batch.manifest_key, instance_count=batch.instance_count,
                                   targets=targets, priority=rule.priority)
        out.append((_event(batch, "process.requested", process, name, task_id=task_id),
                    TaskRef(task_id=task_id, kind="process", rule=name, modules=list(rule.modules))))
    elif rule.action == "notification":
        task_id = _task_id(batch, name, "notification")
        message = rule.notification_message or (
            f"rule '{name}' matched {batch.level} batch {batch.batch_id} ({batch.instance_count} instances)")
        out.append((_event(batch, "notification.requested",
                           NotificationRequested(task_id=task_id, rule=name, message=message), name,
                           task_id=task_id),
                    TaskRef(task_id=task_id, kind="notification", rule=name)))
    return out


def _discarded(batch: _Batch, reason: str) -> Event:
    return _event(batch, "series.discarded", SeriesDiscarded(batch_id=batch.batch_id,
                                                             manifest_key=batch.manifest_key, reason=reason))


def _decided(batch: _Batch, evaluations: list[RuleEvaluation], matched: list[str], tasks: list[TaskRef],
             discarded: bool, reason: str) -> Event:
    return _event(batch, "route.decided", RouteDecided(
        trigger="series" if batch.level == "series" else "study", batch_id=batch.batch_id,
        evaluations=evaluations, matched_rules=matched, tasks=tasks, discarded=discarded, reason=reason))


def _forced_without_rules(batch: _Batch) -> list[Event]:
    """A study forced by timeout whose relevant rules say discard / ignore: no rule evaluation."""
    reason = f"study incomplete at force timeout: {batch.action}"
    events = [_discarded(batch, reason)] if batch.action == "discard" else []
    events.append(_decided(batch, [], [], [], batch.action == "discard", reason))
    return events
