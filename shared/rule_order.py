"""Which rules a batch is evaluated against, and in which order (docs/rules.md, "Decision").

Shared by the router, which decides, and `caduceus rule test`, which shows what it would decide:
per trigger, the enabled rules in name order; a matching `discard` rule ends the evaluation;
`fallback` rules are evaluated only when no other rule matched (for a series, no study rule either). A rule that fails at run time (or
whose stored filter no longer compiles) does not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from shared.config.model import CaduceusConfig, Rule
from shared.rules import CompiledRule, RuleResult, RuleSyntaxError, compile_rule


def enabled_rules(config: CaduceusConfig, trigger: str) -> list[tuple[str, Rule]]:
    return [(name, rule) for name, rule in sorted(config.rules.items())
            if not rule.disabled and rule.trigger == trigger]


@lru_cache(maxsize=512)
def compiled(filter_expr: str) -> CompiledRule:
    return compile_rule(filter_expr)


def evaluate(rule: Rule, tags: dict[str, str]) -> RuleResult:
    try:
        return compiled(rule.filter).evaluate(tags)
    except RuleSyntaxError as exc:  # validated at config apply; an old stored rule may still fail
        return RuleResult(matched=False, error=f"syntax: {exc}")


@dataclass
class RuleOrder:
    evaluated: list[tuple[str, Rule, RuleResult]] = field(default_factory=list)  # in evaluation order
    matched: list[tuple[str, Rule]] = field(default_factory=list)  # matching rules other than discard
    discard_rule: str | None = None  # the matching discard rule that ended the evaluation

    def left_to_study_rules(self, config: CaduceusConfig, trigger: str) -> bool:
        """A series no series rule took is not discarded while study rules exist: they decide it later."""
        return (trigger == "series" and not self.matched and self.discard_rule is None
                and bool(enabled_rules(config, "study")))


def evaluate_in_order(config: CaduceusConfig, trigger: str, tags: dict[str, str],
                      study_tags: dict[str, str] | None = None) -> RuleOrder:
    """`study_tags`: for a series, the tags its study's decision will see (the study's first
    instance); without them the series' own."""
    order = RuleOrder()
    _evaluate_group(config, trigger, tags, False, order)
    taken = _taken_by_a_study_rule(config, trigger, tags if study_tags is None else study_tags)
    if not order.matched and order.discard_rule is None and not taken:
        _evaluate_group(config, trigger, tags, True, order)
    return order


def _taken_by_a_study_rule(config: CaduceusConfig, trigger: str, study_tags: dict[str, str]) -> bool:
    """A series whose study a study rule will take was matched (mercure evaluates all rules on each
    series): no series fallback for it. Judged on the tags the study decision sees, so that a
    series the study rule will not take (a PT series in a study whose first instance is CT, under
    `@Modality@ == 'PT'`) still gets its fallback."""
    return trigger == "series" and any(not rule.fallback and evaluate(rule, study_tags).matched
                                       for _, rule in enabled_rules(config, "study"))


def _evaluate_group(config: CaduceusConfig, trigger: str, tags: dict[str, str], fallback: bool,
                    order: RuleOrder) -> None:
    for name, rule in enabled_rules(config, trigger):
        if rule.fallback != fallback:
            continue
        result = evaluate(rule, tags)
        order.evaluated.append((name, rule, result))
        if not result.matched:
            continue
        if rule.action == "discard":
            order.discard_rule = name
            return
        order.matched.append((name, rule))
