"""What the configured rules would decide for a set of tags (`caduceus rule test` without --filter).

The rules are evaluated exactly as the router does (shared/rule_order.py); this module only
explains the result: which rules matched, which were disabled or not evaluated, and the decision.
A series is left to the study decision while enabled study rules exist (as the router does).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config.model import CaduceusConfig, Rule
from shared.rule_order import RuleOrder, evaluate_in_order
from shared.rules import RuleResult


@dataclass
class RuleLine:
    name: str
    rule: Rule
    result: RuleResult | None  # None: not evaluated (see note)
    note: str = ""


@dataclass
class Preview:
    trigger: str
    lines: list[RuleLine]
    decision: str
    creates_tasks: bool


def preview(config: CaduceusConfig, tags: dict[str, str], trigger: str) -> Preview:
    order = evaluate_in_order(config, trigger, tags)
    results = {name: result for name, _, result in order.evaluated}
    rules = [(name, rule) for name, rule in sorted(config.rules.items()) if rule.trigger == trigger]
    lines = [RuleLine(name, rule, results.get(name),
                      "" if name in results else _why_not_evaluated(rule, order.discard_rule))
             for fallback in (False, True) for name, rule in rules if rule.fallback == fallback]
    return Preview(trigger, lines, *_decision(config, trigger, order))


def _why_not_evaluated(rule: Rule, discard_rule: str | None) -> str:
    """The note for a rule the evaluation did not reach."""
    if rule.disabled:
        return "disabled"
    if discard_rule:
        return f"not evaluated: rule {discard_rule} discarded the batch"
    return "not evaluated: fallback, and another rule matched"


def _decision(config: CaduceusConfig, trigger: str, order: RuleOrder) -> tuple[str, bool]:
    matched = order.matched
    if order.discard_rule:
        return f"discarded by rule {order.discard_rule} (files kept, recoverable)", False
    if matched:
        return "; ".join(f"{rule.action} -> {', '.join(rule.targets + rule.modules) or '-'} (rule {name}, "
                         f"{rule.priority})" for name, rule in matched), True
    if order.left_to_study_rules(config, trigger):
        return "no series rule matched: left to the study decision", False
    return "no rule matched: discarded (files kept, recoverable)", False


def render(result: Preview) -> list[str]:
    out = [f"{result.trigger} rules:"]
    width = max((len(line.name) for line in result.lines), default=0)
    for line in result.lines:
        if line.result is None:
            state = line.note
        elif line.result.error:
            state = f"ERROR (no match): {line.result.error}"
        else:
            state = "MATCH" if line.result.matched else "no match"
        missing = line.result.missing_tags if line.result is not None else []
        out.append(f"  {line.name.ljust(width)}  {state}" + (f"  (missing: {', '.join(missing)})" if missing else ""))
    out.append(f"decision: {result.decision}")
    return out
