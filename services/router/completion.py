"""When is a batch complete? Pure functions of a batch, the configuration and the time.

Series: after `settings.series_complete_seconds` without a new instance. A rule may shorten or
lengthen that with its own `series_complete_seconds`: the router uses the smallest override among
the enabled series rules whose filter matches the batch's first instance (mercure has only the
global value; per-rule values let a fast-lane rule complete its series early without changing
everybody else's). Without a matching override the global value applies.

Study (only when at least one enabled rule has trigger=study; otherwise study batches are dropped,
except one with series that were left to the study rules: it completes at once and is decided,
discarded for want of a rule, rather than leave those series undecided):
- the rules that matter are the enabled study rules whose filter matches the study's first
  instance ("relevant rules");
- a relevant rule with `study_required_series` waits for those series (mercure's
  "received_series" condition): the study completes as soon as all relevant requirement lists are
  satisfied when every relevant rule has one, or at the quiet period once they are all satisfied;
- otherwise the study completes after `settings.study_complete_seconds` without a new instance;
- a study still open `settings.study_force_complete_seconds` after its first instance is forced:
  action "proceed" if any relevant rule says proceed, else "discard" if any says discard, else
  "ignore" (no relevant rule at all counts as "proceed", which then discards for lack of a match);
- an admin's `study.complete_requested` completes it at once (trigger "forced", proceed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Literal

from services.router.state import Batch
from shared.config.model import CaduceusConfig, Rule
from shared.rule_order import enabled_rules, evaluate
from shared.rules import RuleSyntaxError
from shared.series_list import SeriesList, compile_series_list

StudyTrigger = Literal["quiet", "required_series", "forced", "force_timeout"]
ForceAction = Literal["proceed", "discard", "ignore"]


@lru_cache(maxsize=256)
def compiled_series_list(expression: str) -> SeriesList:
    return compile_series_list(expression)


def _matches(rule: Rule, tags: dict[str, str]) -> bool:
    return evaluate(rule, tags).matched


def series_quiet_seconds(batch: Batch, config: CaduceusConfig) -> float:
    tags = batch.first.received.tags
    overrides = [rule.series_complete_seconds for _, rule in enabled_rules(config, "series")
                 if rule.series_complete_seconds is not None and _matches(rule, tags)]
    return min(overrides) if overrides else config.settings.series_complete_seconds


def series_due_at(batch: Batch, config: CaduceusConfig) -> datetime:
    """When the series completes if nothing more arrives."""
    return batch.last_arrival + timedelta(seconds=series_quiet_seconds(batch, config))


@dataclass(frozen=True)
class StudyDue:
    trigger: StudyTrigger
    action: ForceAction = "proceed"


def study_due(batch: Batch, config: CaduceusConfig, now: datetime) -> StudyDue | None:
    if batch.force_requested:
        return StudyDue("forced")
    tags = batch.first.received.tags
    relevant = [rule for _, rule in enabled_rules(config, "study") if _matches(rule, tags)]
    received = batch.series_descriptions()
    requirements = [rule.study_required_series for rule in relevant if rule.study_required_series]
    satisfied = all(_satisfied(req, received) for req in requirements)
    settings = config.settings
    quiet = (now - batch.last_arrival).total_seconds() >= settings.study_complete_seconds
    if requirements and satisfied and len(requirements) == len(relevant):
        return StudyDue("required_series")
    if quiet and satisfied:
        return StudyDue("required_series" if requirements else "quiet")
    if (now - batch.first_arrival).total_seconds() >= settings.study_force_complete_seconds:
        return StudyDue("force_timeout", _force_action(relevant))
    return None


def _satisfied(expression: str, received: list[str]) -> bool:
    try:
        return compiled_series_list(expression).satisfied(received)
    except RuleSyntaxError:
        return False


def _force_action(relevant: list[Rule]) -> ForceAction:
    actions = {rule.study_force_action for rule in relevant}
    if not relevant or "proceed" in actions:
        return "proceed"
    return "discard" if "discard" in actions else "ignore"
