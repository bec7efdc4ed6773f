"""What the configured rules would decide for a set of tags (`caduceus rule test` without --filter).

It follows the router's decision (docs/rules.md, "Decision"), per trigger: enabled rules in name
order; a matching `discard` rule discards the batch and ends the evaluation; `fallback` rules are
evaluated only when no other rule matched; nothing matched means discarded, except that a series
is left to the study decision while enabled study rules exist. A rule that fails at run time does
not match.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config.model import CaduceusConfig, Rule
from shared.rules import RuleResult, compile_rule


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
    rules = [(name, rule) for name, rule in sorted(config.rules.items()) if rule.trigger == trigger]
    lines: list[RuleLine] = []
    matched: list[tuple[str, Rule]] = []
    discarded_by = ""
    for fallback in (False, True):
        for name, rule in rules:
            if rule.fallback != fallback:
                continue
            if rule.disabled:
                lines.append(RuleLine(name, rule, None, "disabled"))
            elif discarded_by:
                lines.append(RuleLine(name, rule, None, f"not evaluated: rule {discarded_by} discarded the batch"))
            elif fallback and matched:
                lines.append(RuleLine(name, rule, None, "not evaluated: fallback, and another rule matched"))
            else:
                result = compile_rule(rule.filter).evaluate(tags)
                lines.append(RuleLine(name, rule, result))
                if result.matched and rule.action == "discard":
                    discarded_by = name
                elif result.matched:
                    matched.append((name, rule))
    return Preview(trigger, lines, *_decision(config, trigger, matched, discarded_by))


def _decision(config: CaduceusConfig, trigger: str, matched: list[tuple[str, Rule]],
              discarded_by: str) -> tuple[str, bool]:
    if discarded_by:
        return f"discarded by rule {discarded_by} (files kept, recoverable)", False
    if matched:
        return "; ".join(f"{rule.action} -> {', '.join(rule.targets + rule.modules) or '-'} (rule {name}, "
                         f"{rule.priority})" for name, rule in matched), True
    if trigger == "series" and any(r.trigger == "study" and not r.disabled for r in config.rules.values()):
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
